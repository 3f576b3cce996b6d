"""TTM and WTTM, transformed teacher matching (Zheng & Yang, ICLR 2024).

The teacher's probabilities are power-transformed, ``p̃_t = t^l / Σ_c t_c^l`` with ``t = softmax(z_t)``
(equal to ``softmax(l·z_t)``: a teacher temperature T = 1/l), and matched by a student WITHOUT
temperature, ``log s = log_softmax(z_s)``:

- ``L_TTM = (1/B) Σ_b KL(p̃_t,b ‖ s_b)`` (no T² factor),
- ``L_WTTM = (1/B) Σ_b U_l(t_b)·KL(p̃_t,b ‖ s_b)`` with the per-sample weight ``U_l(t) = Σ_c t_c^l``
  (the power sum, i.e. exp((1-l)·H_l(t)) with H_l the Rényi entropy of order l; ≥ 1 for l < 1, larger
  for smoother teachers). It is not normalised over the batch and not detached (the teacher runs
  under ``no_grad``).

With l = 1 both equal Hinton KD at T = 1. KL terms use ``F.kl_div`` (0·log 0 = 0). The power is taken
on the softmax as in the official code, so a teacher probability that underflows to 0 (a logit gap
beyond ~100 in float32) gives 0 rather than its tiny power.

Official source: zkxufo/TTM, ``distiller_zoo/ttm.py`` (``TTM``) and ``distiller_zoo/wttm.py``
(``WTTM``); combined in ``helper/loops.py`` as ``r·CE + a·L_add + b·L_main``
(``--distill ttm|wttm --ttm_l l -r 1 -b β -a 0``).

Official CIFAR-100 recipe (``train_student.py`` defaults, RepDistiller-style): batch 64, SGD 0.05
(0.01 for MobileNetV2/ShuffleV1/V2), momentum 0.9, wd 5e-4, ×0.1 at 150/180/210, 240 epochs, CE
weight r = 1. The only per-pair values in the repository are the README examples: vgg13 → vgg8 TTM
l = 0.1, β = 45; WTTM + CRD l = 0.2, a = 4 (WTTM), b = 0.8 (CRD). The paper lists T (= 1/l) and β of
every pair in its appendix A.4, which is not in the repository. Only logits are read.

Strategies (``distill=ttm`` :class:`TTM`, ``distill=wttm`` :class:`WTTM`): ``w_ce·CE + β·L`` (the official
``-a 0`` leaves out the additional KD term), logged as ``ce`` and ``ttm`` / ``wttm``. Defaults are the README's
examples, the only per-pair values in the repository: TTM l = 0.1, β = 45 (vgg13 → vgg8); WTTM l = 0.2,
β = 4 (its weight in the WTTM + CRD example); w_ce = 1. The CE is taken on the raw logits; a logit transform
(``distill/logit_transform=ls``) feeds only L.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.base import Strategy
from kdx.errors import ConfigError


def _kl_rows(logits_student: Tensor, logits_teacher: Tensor, l: float) -> tuple[Tensor, Tensor]:
    """Per-sample ``KL(p̃_t ‖ softmax(z_s))`` [B] and the power sums ``Σ_c t_c^l`` [B]."""
    z_s = logits_student.to(torch.promote_types(logits_student.dtype, torch.float32))
    z_t = logits_teacher.to(torch.promote_types(logits_teacher.dtype, torch.float32))
    powered = torch.softmax(z_t, dim=1).pow(l)
    power_sum = powered.sum(dim=1)
    p_t = powered / power_sum.unsqueeze(1)
    kl = F.kl_div(F.log_softmax(z_s, dim=1), p_t, reduction="none").sum(dim=1)
    return kl, power_sum


def ttm_loss(logits_student: Tensor, logits_teacher: Tensor, l: float) -> Tensor:
    """TTM: ``mean_b KL(softmax(z_t)^l / Σ ‖ softmax(z_s))`` (no CE, no T²)."""
    kl, _ = _kl_rows(logits_student, logits_teacher, l)
    return kl.mean()


def wttm_loss(logits_student: Tensor, logits_teacher: Tensor, l: float) -> Tensor:
    """WTTM: ``mean_b (Σ_c t_c^l)·KL(softmax(z_t)^l / Σ ‖ softmax(z_s))`` (no CE, no T²)."""
    kl, power_sum = _kl_rows(logits_student, logits_teacher, l)
    return (power_sum * kl).mean()


class TTM(Strategy):
    """``w_ce·CE + β·L_TTM(l)`` (see the module docstring)."""

    loss_fn = staticmethod(ttm_loss)
    term = "ttm"

    def __init__(
        self, l: float = 0.1, beta: float = 45.0, w_ce: float = 1.0, teacher_transform=None,  # noqa: E741
        logit_transform=None,
    ) -> None:
        super().__init__(teacher_transform, logit_transform)
        if not l > 0:
            raise ConfigError(f"distill.l={l}: the power of the teacher's probabilities (1/T) must be > 0.")
        self.l, self.beta, self.w_ce = l, beta, w_ce

    def loss_terms(self, student, teacher, batch, epoch):
        z_s, z_t = self.transform_logits(student.logits, teacher.logits)
        ce = F.cross_entropy(student.logits.to(torch.promote_types(student.logits.dtype, torch.float32)), batch.y)
        return {"ce": self.w_ce * ce, self.term: self.beta * self.loss_fn(z_s, z_t, self.l)}


class WTTM(TTM):
    """``w_ce·CE + β·L_WTTM(l)`` (see the module docstring)."""

    loss_fn = staticmethod(wttm_loss)
    term = "wttm"

    def __init__(
        self, l: float = 0.2, beta: float = 4.0, w_ce: float = 1.0, teacher_transform=None,  # noqa: E741
        logit_transform=None,
    ) -> None:
        super().__init__(l, beta, w_ce, teacher_transform, logit_transform)
