"""NKD, normalized KD (Yang et al., ICCV 2023): a target term and a normalized non-target term.

With ``y`` the label of each sample, ``t = softmax(z_t)``, ``log s = log_softmax(z_s)`` (no
temperature) and ``ẑ`` the logits with the target column removed ([B, C-1]):

- target term ``L_t = -(1/B) Σ_b t_y · log s_y`` (``t_y`` detached),
- non-target term ``L_nt = -γ·T²·(1/B) Σ_b Σ_{c≠y} softmax(ẑ_t/T)_c · log softmax(ẑ_s/T)_c``,
- ``L_NKD = L_t + L_nt``.

L_nt is a cross-entropy between the renormalised non-target distributions (it contains the
teacher's non-target entropy), so values of tens to hundreds are normal (γT² = 31.5 at T = 3,
γ = 3.5). The target column is removed by boolean-mask indexing (``ones.scatter_(1, y, 0)``), not
by subtracting a constant. A 2-D ``target`` (soft or one-hot labels) is reduced to its argmax.

Official source: yzd-v/cls_KD, branch 1.0, ``mmcls/models/dis_losses/nkd.py`` (``NKDLoss``; the
same code is in branch master ``mmcls/distillation/losses/nkd.py``); defaults temp 1.0, gamma 1.5.
CIFAR-100 (``configs/distillers/cifar100/res34_distill_res18_cifar.py``, the repository's only
CIFAR pair: mmcls ResNet-34 → ResNet-18): temp 3.0, gamma 3.5, added to the student head's CE
(weight 1.0); no warm-up. Schedule: ``configs/resnet/resnet18_8xb16_cifar100.py`` writes old-style
``optimizer`` (wd 5e-4) and ``lr_config`` (×0.2 at 60/120/160) keys that the mmengine runner of this
branch does not read, so the base schedule applies: SGD 0.1, momentum 0.9, wd 1e-4, ×0.1 at epochs
100/150, 200 epochs, 16 images per GPU (8 GPUs by the name). Only logits are read.

SDD's copy of NKD (shicaiwei123/SDD-CVPR2024) differs: see :func:`nkd_per_sample` ``drop_target``.

Strategy (``distill=nkd``, :class:`NKD`): ``w_ce·CE + L_NKD`` with T = 3, γ = 3.5, w_ce = 1 (the CIFAR config
above; the official loss has no weight of its own and no warm-up), logged as ``ce`` and ``nkd``. kdx runs it on
the DKD table's protocol (``experiment=cifar100/dkd/<pair> distill=nkd``), not on the mmcls schedule, which was
written for mmcls's ResNet-34 → ResNet-18 only. The CE is taken on the raw logits; a logit transform
(``distill/logit_transform=ls``) feeds only L_NKD.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.base import Strategy
from kdx.errors import ConfigError


def nkd_per_sample(
    logits_student: Tensor,
    logits_teacher: Tensor,
    target: Tensor,
    temperature: float = 1.0,
    gamma: float = 1.5,
    drop_target: bool = True,
) -> Tensor:
    """Per-sample ``L_t + L_nt`` [B] (float32, float64 stays); its mean is :func:`nkd_loss`.

    ``drop_target=False`` reproduces SDD-CVPR2024's NKD (``SDD_nkd.py``, ``nkd.py``), whose mask is
    built with ``scatter_(1, label, 1)`` and so keeps every class: its "non-target" term is then a
    full-distribution cross-entropy at T (the target class included).
    """
    z_s = logits_student.to(torch.promote_types(logits_student.dtype, torch.float32))
    z_t = logits_teacher.to(torch.promote_types(logits_teacher.dtype, torch.float32))
    label = (target.argmax(dim=1) if target.dim() > 1 else target).reshape(-1, 1)
    log_s_y = F.log_softmax(z_s, dim=1).gather(1, label).squeeze(1)
    t_y = F.softmax(z_t, dim=1).gather(1, label).squeeze(1).detach()
    if drop_target:
        n = z_s.shape[0]
        keep = torch.ones_like(z_s, dtype=torch.bool).scatter_(1, label, False)
        z_s, z_t = z_s[keep].reshape(n, -1), z_t[keep].reshape(n, -1)
    non_target = (F.softmax(z_t / temperature, dim=1) * F.log_softmax(z_s / temperature, dim=1)).sum(dim=1)
    return -t_y * log_s_y - gamma * temperature**2 * non_target


def nkd_loss(
    logits_student: Tensor, logits_teacher: Tensor, target: Tensor, temperature: float = 1.0, gamma: float = 1.5
) -> Tensor:
    """NKD ``L_t + L_nt`` averaged over the batch (no CE)."""
    return nkd_per_sample(logits_student, logits_teacher, target, temperature, gamma).mean()


class NKD(Strategy):
    """``w_ce·CE + L_NKD(T, γ)`` (see the module docstring)."""

    def __init__(
        self, temperature: float = 3.0, gamma: float = 3.5, w_ce: float = 1.0, teacher_transform=None,
        logit_transform=None,
    ) -> None:
        super().__init__(teacher_transform, logit_transform)
        if not temperature > 0:
            raise ConfigError(f"distill.temperature={temperature}: the NKD temperature must be > 0.")
        self.temperature, self.gamma, self.w_ce = temperature, gamma, w_ce

    def loss_terms(self, student, teacher, batch, epoch):
        z_s, z_t = self.transform_logits(student.logits, teacher.logits)
        ce = F.cross_entropy(student.logits.to(torch.promote_types(student.logits.dtype, torch.float32)), batch.y)
        return {"ce": self.w_ce * ce, "nkd": nkd_loss(z_s, z_t, batch.y, self.temperature, self.gamma)}
