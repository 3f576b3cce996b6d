"""SP: similarity-preserving KD (Tung & Mori, ICCV 2019), as in mdistiller.

Official source: ``megvii-research/mdistiller``, ``mdistiller/distillers/SP.py`` (``sp_loss``,
``similarity_loss``), equal to ``HobbitLong/RepDistiller`` ``distiller_zoo/SP.py`` (``Similarity``, which
returns the per-stage list that its loop sums). Written anew here.

Per stage, with ``F`` the features flattened to [B, D]: ``G = row_normalize(F·Fᵀ)`` (``F.normalize`` over
dim 1, eps 1e-12) and ``L = ‖G_t − G_s‖²_F / B²``; ``sp_loss`` is the **sum** over the given stages.

Notes on the official code: the Gram matrix is normalised row-wise (as in the paper); the official
function returns a 1-element tensor (``.view(-1, 1).sum(0)``), this one a 0-d scalar of the same value.
Student and teacher dimensions ``D`` may differ (only B×B matrices are compared). The loss is invariant to
a global positive scale of either input, not to a per-sample one (column scales survive the row norm).

Computed with autocast off, in at least float32 (bf16/fp16 inputs are promoted; float64 stays).

Official CIFAR-100 setting (``mdistiller/engine/cfg.py`` + ``configs/cifar100/sp.yaml``):
``loss = 1.0·CE + 3000·sp_loss([feats_s[-1]], [feats_t[-1]])`` — one stage only, the last residual
stage's post-ReLU map (RepDistiller: ``feat[-2]``, the same tensor); no KD term, no warm-up; resnet32x4 →
resnet8x4, 240 epochs, SGD lr 0.05 (×0.1 at 150/180/210), momentum 0.9, wd 5e-4, batch 64.

``distill=sp`` (:class:`SP`): ``w_ce·CE + w_sp·sp_loss([feats_s[-1]], [feats_t[-1]])`` (terms ``ce``, ``sp``): each
network's own last ``feats`` entry, whatever the two networks' numbers of stages.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.feature_kd import FeatureKD


def similarity_matrix(f: Tensor) -> Tensor:
    """Row-normalised Gram matrix [B, B] of the per-sample flattened features (in at least float32)."""
    flat = f.reshape(f.shape[0], -1).to(torch.promote_types(f.dtype, torch.float32))
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> Tensor:
    """Sum over stages of ``‖G_t − G_s‖²_F / B²`` for lists of features [B, ...]."""
    with torch.autocast(device_type=g_s[0].device.type, enabled=False):
        losses = []
        for f_s, f_t in zip(g_s, g_t):
            bsz = f_s.shape[0]
            losses.append((similarity_matrix(f_t) - similarity_matrix(f_s)).pow(2).sum() / (bsz * bsz))
        return sum(losses)


class SP(FeatureKD):
    """``distill=sp``: ``w_ce·CE + w_sp·sp_loss([feats_s[-1]], [feats_t[-1]])``."""

    student_taps = teacher_taps = ("feats",)
    term = "sp"

    def __init__(self, w_ce: float = 1.0, w_sp: float = 3000.0) -> None:
        super().__init__(w_ce, w_sp)

    def feature_loss(self, student, teacher):
        return sp_loss([student["feats"][-1]], [teacher["feats"][-1]])
