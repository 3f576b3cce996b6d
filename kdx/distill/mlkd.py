"""MLKD: Multi-Level Logit Distillation (Jin et al., CVPR 2023), exactly as the official code sums it.

Official source: Jin-Ying/Multi-Level-Logit-Distillation @ 5ee473f -- ``mdistiller/distillers/KD_ours.py``
(class ``KD_ours``; there is no ``MLKD.py``), trainer ``AugTrainer`` ("ours") in ``mdistiller/engine/trainer.py``,
views from ``get_cifar100_train_transform_strong`` in ``mdistiller/dataset/cifar100.py``.

Two views of each image (weak: crop+flip; strong: crop+flip+RandAugment(2 ops)+Cutout, see
:mod:`kdx.data.strong_augment`); student and teacher see both. With ``w = kd_weight``, temperatures
``𝒯 = (T, 3, 5, 2, 6)`` (``T = temperature``, in this order), ``s/t`` student/teacher logits, ``w/s`` the view:

* ``KD(s, t, τ) = τ²·(1/B)Σ_b KL(softmax(t_b/τ) ‖ softmax(s_b/τ))``;
* class correlation ``CC(s, t, τ) = ‖P_tᵀP_t - P_sᵀP_s‖²_F / C`` and batch correlation
  ``BC(s, t, τ) = ‖P_tP_tᵀ - P_sP_sᵀ‖²_F / B``, with ``P = softmax(logits/τ)`` of shape ``[B, C]``;
* confidence masks from the teacher's weak view at temperature 1, ``p = softmax(t_w)``: the sample mask
  ``max_c p_bc ≤ median_b`` and the class mask ``Σ_b p_bc ≤ median_c`` (``np.percentile(·, 50)``, linear
  interpolation). The official code multiplies a *scalar* batch loss by the mask and takes the mean, so a mask
  acts only as the batch-level factor ``m = mean(mask)`` (``m_B`` for samples, ``m_C`` for classes), never per
  sample.

The official total (terms returned by :func:`mlkd_loss`, keys in brackets, all weighted):

    [ce]             ce_weight·(CE(s_w, y) + CE(s_s, y))
    [kd_weak]        Σ_{τ∈𝒯} w·m_B·KD(s_w, t_w, τ)
    [kd_strong]      Σ_{τ∈(T,3,5)} w·KD(s_s, t_s, τ)
    [kd_weak_repeat] Σ_{τ∈(2,6)} w·KD(s_w, t_w, τ)      -- quirk: in the official "strong" sum the τ = 2, 6
                                                           terms use the weak logits, unmasked (counted twice)
    [cc]             Σ_{τ∈𝒯} w·m_C·CC(s_w, t_w, τ)
    [bc]             Σ_{τ∈𝒯} w·m_B·BC(s_w, t_w, τ)

Quirks kept: the official code also builds ``loss_cc_strong`` and ``loss_bc_strong`` and never adds them (not
computed here); the logged ``loss_kd`` is ``kd_weak + kd_strong + kd_weak_repeat``. The masks have no gradient.
Inputs may be bf16/fp16; everything is computed in float32 (float64 for float64 student logits).

Official CIFAR-100 recipe (``configs/cifar100/ours/*.yaml`` over ``mdistiller/engine/cfg.py``): T = 4,
ce_weight 0.1, kd_weight 0.9 (the ``KD`` defaults; no yaml overrides them), SGD momentum 0.9, weight decay 5e-4,
batch 64, lr ×0.1 after epochs 150/180/210; lr 0.025 and 240 epochs for res56→res20, res110→res32,
res32x4→res8x4, vgg13→vgg8, wrn40_2→wrn_16_2, wrn40_2→wrn_40_1; lr 0.01 and 480 epochs for res50→MobileNetV2,
vgg13→MobileNetV2, wrn40_2→ShuffleV1; lr 0.01 and 960 epochs for res32x4→ShuffleV1/ShuffleV2 (still decayed at
150/180/210). Only logits are read; the student is trained and evaluated on its weak-view logits. (The six
240-epoch configs said 480 epochs until the repository's last commit, Sep. 2024; the paper's numbers are from that
time.) Logit standardisation (``logit_transform``, the LS repository's MLKD+LS, sunshangquan/logit-standardization-KD
``mdistiller/distillers/MLKD.py``): both sides' logits of both views go through it in the KD terms only; the CE, the
correlation terms and the masks keep the raw logits.

Strategies: :class:`MLKD` (``distill=mlkd``, views ``("strong",)``) returns the terms of :func:`mlkd_loss`.
:class:`MLKDWeak` (``distill=mlkd_weak``, no extra view) is the single-view variant other papers run,
``MLKD_NOAUG`` of zju-SWJ/RLD @ 8b6cf60 (``mdistiller/distillers/MLKD_NOAUG.py``, standard mdistiller trainer and
crop+flip loader): every strong-view part is dropped, i.e. ``w_ce·CE(s_w, y)`` once, ``kd_weak``, ``cc`` and ``bc``
(no ``kd_strong``, no ``kd_weak_repeat``); its recipes are the standard protocol (240 epochs, lr 0.05, 0.01 for
MobileNetV2/ShuffleNets).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.base import Strategy
from kdx.distill.losses import kd_loss


def _at_least_f32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def class_correlation_loss(logits_s: Tensor, logits_t: Tensor, temperature: float) -> Tensor:
    """``‖P_tᵀP_t - P_sᵀP_s‖²_F / C`` with ``P = softmax(logits/τ)`` (official ``cc_loss``, reduced)."""
    p_s = F.softmax(logits_s / temperature, dim=1)
    p_t = F.softmax(logits_t / temperature, dim=1)
    return ((p_t.t() @ p_t - p_s.t() @ p_s) ** 2).sum() / logits_t.shape[1]


def batch_correlation_loss(logits_s: Tensor, logits_t: Tensor, temperature: float) -> Tensor:
    """``‖P_tP_tᵀ - P_sP_sᵀ‖²_F / B`` with ``P = softmax(logits/τ)`` (official ``bc_loss``, reduced)."""
    p_s = F.softmax(logits_s / temperature, dim=1)
    p_t = F.softmax(logits_t / temperature, dim=1)
    return ((p_t @ p_t.t() - p_s @ p_s.t()) ** 2).sum() / logits_t.shape[0]


def confidence_factors(logits_teacher_weak: Tensor) -> tuple[Tensor, Tensor]:
    """``(m_B, m_C)``: fraction of samples whose max probability, and of classes whose summed probability, is
    at most its median (teacher's weak view, temperature 1); detached scalars (float32, or float64)."""
    with torch.no_grad():
        p = F.softmax(_at_least_f32(logits_teacher_weak), dim=1)
        conf = p.max(dim=1).values
        cls = p.sum(dim=0)
        m_b = (conf <= torch.quantile(conf, 0.5)).to(p.dtype).mean()
        m_c = (cls <= torch.quantile(cls, 0.5)).to(p.dtype).mean()
    return m_b, m_c


def mlkd_loss(
    logits_student_weak: Tensor,
    logits_student_strong: Tensor,
    logits_teacher_weak: Tensor,
    logits_teacher_strong: Tensor,
    target: Tensor,
    temperature: float = 4.0,
    ce_weight: float = 0.1,
    kd_weight: float = 0.9,
    logit_transform: Optional[Callable[[Tensor], Tensor]] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(total, terms)``: the official MLKD loss and its weighted parts (module docstring); ``total`` is the
    sum of ``terms`` added in the official order. Logits ``[B, C]`` of both views, ``target`` ``[B]``.
    ``logit_transform`` (e.g. LS) is applied to the inputs of the KD terms only (None: identity)."""
    s_w, s_s = _at_least_f32(logits_student_weak), _at_least_f32(logits_student_strong)
    t_w, t_s = _at_least_f32(logits_teacher_weak), _at_least_f32(logits_teacher_strong)
    m_b, m_c = confidence_factors(t_w)
    k_sw, k_ss, k_tw, k_ts = (s_w, s_s, t_w, t_s) if logit_transform is None else (
        logit_transform(s_w), logit_transform(s_s), logit_transform(t_w), logit_transform(t_s))
    temps = (temperature, 3.0, 5.0, 2.0, 6.0)
    w = kd_weight
    terms = {
        "ce": ce_weight * (F.cross_entropy(s_w, target) + F.cross_entropy(s_s, target)),
        "kd_weak": sum(w * (kd_loss(k_sw, k_tw, tau) * m_b) for tau in temps),
        "kd_strong": sum(w * kd_loss(k_ss, k_ts, tau) for tau in temps[:3]),
        "kd_weak_repeat": sum(w * kd_loss(k_sw, k_tw, tau) for tau in temps[3:]),
        "cc": sum(w * (class_correlation_loss(s_w, t_w, tau) * m_c) for tau in temps),
        "bc": sum(w * (batch_correlation_loss(s_w, t_w, tau) * m_b) for tau in temps),
    }
    loss_kd = terms["kd_weak"] + (terms["kd_strong"] + terms["kd_weak_repeat"])
    total = terms["ce"] + loss_kd + terms["cc"] + terms["bc"]
    return total, terms


class MLKD(Strategy):
    """``distill=mlkd``: the official loss on the weak batch and its strong view (terms of :func:`mlkd_loss`)."""

    views = ("strong",)

    def __init__(self, temperature: float = 4.0, w_ce: float = 0.1, w_kd: float = 0.9, teacher_transform=None,
                 logit_transform=None) -> None:
        super().__init__(teacher_transform, logit_transform)
        self.temperature, self.w_ce, self.w_kd = float(temperature), float(w_ce), float(w_kd)

    def loss_terms(self, student, teacher, batch, epoch):
        _, terms = mlkd_loss(student.logits, student.views["strong"], teacher.logits, teacher.views["strong"],
                             batch.y, self.temperature, self.w_ce, self.w_kd, self.logit_transform)
        return terms


class MLKDWeak(MLKD):
    """``distill=mlkd_weak``: MLKD without the strong view (RLD's ``MLKD_NOAUG``; module docstring)."""

    views = ()

    def loss_terms(self, student, teacher, batch, epoch):
        s_w, t_w = student.logits, teacher.logits
        _, terms = mlkd_loss(s_w, s_w, t_w, t_w, batch.y, self.temperature, self.w_ce, self.w_kd, self.logit_transform)
        ce = self.w_ce * F.cross_entropy(_at_least_f32(s_w), batch.y)
        return {"ce": ce, "kd_weak": terms["kd_weak"], "cc": terms["cc"], "bc": terms["bc"]}
