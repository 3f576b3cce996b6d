"""PKT: probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as in mdistiller.

Official source: ``megvii-research/mdistiller``, ``mdistiller/distillers/PKT.py`` (``pkt_loss``), equal to
``HobbitLong/RepDistiller`` ``distiller_zoo/PKT.py`` (``PKT.cosine_similarity_loss``) and to the authors'
``passalis/probabilistic_kt``. Written anew here.

For pooled features ``f`` [B, D]: ``n_i = f_i / (‖f_i‖₂ + eps)`` (NaNs then set to 0), cosine kernel
``K = (n·nᵀ + 1) / 2`` (in [0, 1], diagonal included), and the conditional distributions
``P = K / rowsum(K)``. The loss is ``mean_{i,j} P_t[i,j] · log((P_t[i,j] + eps) / (P_s[i,j] + eps))``.

Quirks kept from the official code: ``eps`` (1e-7) is added to the norm (not a max with it) and inside the
log on both sides; the KL is a **mean over all B² entries** (= KL summed over rows / B²), so its scale
shrinks with the batch size — the official weight 30000 compensates; self-pairs (the diagonal, kernel 1)
are part of each distribution; the teacher is not detached here (mdistiller computes it under no_grad).

Computed with autocast off, in at least float32 (bf16/fp16 inputs are promoted; float64 stays).

Official CIFAR-100 setting (``mdistiller/engine/cfg.py`` + ``configs/cifar100/pkt.yaml``):
``loss = 1.0·CE + 30000·pkt_loss(pooled_s, pooled_t)`` with ``pooled_feat`` the globally average-pooled
last feature map [B, C] (RepDistiller: ``feat[-1]``); no KD term, no warm-up; resnet32x4 → resnet8x4,
240 epochs, SGD lr 0.05 (×0.1 at 150/180/210), momentum 0.9, wd 5e-4, batch 64.

``distill=pkt`` (:class:`PKT`): ``w_ce·CE + w_pkt·pkt_loss(pooled_s, pooled_t)`` (terms ``ce``, ``pkt``), the
``pooled_feat`` tap of each network (its widths may differ).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdx.distill.feature_kd import FeatureKD


def pkt_similarity(f: Tensor, eps: float = 1e-7) -> Tensor:
    """Row-stochastic [B, B] matrix of the cosine kernel ``(cos + 1) / 2`` of features [B, D]."""
    f = f.to(torch.promote_types(f.dtype, torch.float32))
    n = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    n = torch.where(torch.isnan(n), torch.zeros_like(n), n)
    k = (n @ n.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


def pkt_loss(f_s: Tensor, f_t: Tensor, eps: float = 1e-7) -> Tensor:
    """``mean_{i,j} P_t log((P_t + eps) / (P_s + eps))`` over the B×B entries, features [B, D_s], [B, D_t]."""
    with torch.autocast(device_type=f_s.device.type, enabled=False):
        p_s, p_t = pkt_similarity(f_s, eps), pkt_similarity(f_t, eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


class PKT(FeatureKD):
    """``distill=pkt``: ``w_ce·CE + w_pkt·pkt_loss(pooled_s, pooled_t, eps)``."""

    student_taps = teacher_taps = ("pooled_feat",)
    term = "pkt"

    def __init__(self, w_ce: float = 1.0, w_pkt: float = 30000.0, eps: float = 1e-7) -> None:
        super().__init__(w_ce, w_pkt)
        self.eps = float(eps)

    def feature_loss(self, student, teacher):
        return pkt_loss(student["pooled_feat"][0], teacher["pooled_feat"][0], self.eps)
