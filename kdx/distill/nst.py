"""NST: neuron selectivity transfer (Huang & Wang, arXiv 1707.01219), as in mdistiller.

Official source: ``megvii-research/mdistiller``, ``mdistiller/distillers/NST.py`` (``nst_loss``,
``single_stage_nst_loss``, ``poly_kernel``), equal to ``HobbitLong/RepDistiller`` ``distiller_zoo/NST.py``
(``NSTLoss`` with its ``full_loss = True``, per-stage list summed by its loop). Written anew here.

Per stage, after the same height matching as AT (:func:`kdx.distill.at.match_height`), each channel's map
is flattened to [B, C, H·W] and L2-normalised over the positions (``F.normalize``, eps 1e-12). With the
polynomial kernel ``k(x, y) = ⟨x, y⟩²`` (degree 2, c = 0) the squared MMD between the channel sets is
``L = mean k(t, t') + mean k(s, s') − 2·mean k(s, t)``, each mean over the batch and all channel pairs;
``nst_loss`` is the **sum** over stages. Channel counts of student and teacher may differ.

Quirks kept from the official code: the teacher–teacher term is detached but the cross term is not
(mdistiller's teacher features carry no grad anyway); the mean over B includes 1/B (biased MMD
estimate, diagonal pairs included); square maps are assumed by the height matching.

Computed with autocast off, in at least float32 (bf16/fp16 inputs are promoted; float64 stays).

Official CIFAR-100 setting (``mdistiller/engine/cfg.py`` + ``configs/cifar100/nst.yaml``):
``loss = 1.0·CE + 50·nst_loss(feats_s[1:], feats_t[1:])`` (the post-ReLU residual-stage maps, stem
skipped; RepDistiller: ``feat[1:-1]``); no KD term, no warm-up; resnet32x4 → resnet8x4, 240 epochs,
SGD lr 0.05 (×0.1 at 150/180/210), momentum 0.9, wd 5e-4, batch 64.

``distill=nst`` (:class:`NST`): ``w_ce·CE + w_nst·nst_loss(feats_s[1:], feats_t[1:])`` (terms ``ce``, ``nst``);
the stage lists are zipped as in mdistiller, so extra stages of the network with more are dropped.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.at import match_height
from kdx.distill.feature_kd import FeatureKD


def poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    """``k[b, i, j] = ⟨b_i, a_j⟩²`` as [B, C_b, C_a] for channel vectors ``a`` [B, C_a, N], ``b`` [B, C_b, N].

    A batched matmul: the official code broadcasts to [B, C_b, C_a, N] and sums (same values up to
    float rounding, far less memory).
    """
    return torch.matmul(b, a.transpose(1, 2)).pow(2)


def nst_loss(g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> Tensor:
    """Sum over stages of the poly-kernel squared MMD between student and teacher channel maps [B, C, H, W]."""
    with torch.autocast(device_type=g_s[0].device.type, enabled=False):
        losses = []
        for f_s, f_t in zip(g_s, g_t):
            f_s = f_s.to(torch.promote_types(f_s.dtype, torch.float32))
            f_t = f_t.to(torch.promote_types(f_t.dtype, torch.float32))
            f_s, f_t = match_height(f_s, f_t)
            s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
            t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
            losses.append(poly_kernel(t, t).mean().detach() + poly_kernel(s, s).mean() - 2 * poly_kernel(s, t).mean())
        return sum(losses)


class NST(FeatureKD):
    """``distill=nst``: ``w_ce·CE + w_nst·nst_loss(feats_s[1:], feats_t[1:])``."""

    student_taps = teacher_taps = ("feats",)
    term = "nst"

    def __init__(self, w_ce: float = 1.0, w_nst: float = 50.0) -> None:
        super().__init__(w_ce, w_nst)

    def feature_loss(self, student, teacher):
        return nst_loss(student["feats"][1:], teacher["feats"][1:])
