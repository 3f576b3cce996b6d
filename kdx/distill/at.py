"""AT: attention transfer (Zagoruyko & Komodakis, ICLR 2017), as in mdistiller.

Official source: ``megvii-research/mdistiller``, ``mdistiller/distillers/AT.py`` (``at_loss``,
``single_stage_at_loss``), itself equal to ``HobbitLong/RepDistiller`` ``distiller_zoo/AT.py``
(``Attention``, which returns the per-stage list that its training loop sums). Written anew here.

For a feature map ``f`` [B, C, H, W] the attention map is ``a(f) = normalize_2(mean_c f^p)`` flattened to
[B, H·W] (L2 over the positions, ``F.normalize``'s eps 1e-12). Per stage,
``L = mean_{b, hw} (a(f_s) − a(f_t))²`` and ``at_loss`` is the **sum** over stages.

Quirks kept from the official code:

- the reduction is the mean of the squared difference over batch *and* positions (the paper's loss is a
  per-sample p-norm of the difference, not squared; ``β/2`` with β = 1000 is folded into the weight);
- spatial sizes are matched by comparing heights only: the map with the larger height is
  ``adaptive_avg_pool2d``-ed to ``(h, h)`` with ``h`` the smaller height, i.e. square maps are assumed
  (pooling is on the raw features, before ``f^p``);
- ``f^p`` is signed for odd ``p`` (the maps are post-ReLU in mdistiller, so this never shows).

Computed with autocast off, in at least float32 (bf16/fp16 inputs are promoted; float64 stays).

Official CIFAR-100 setting (``mdistiller/engine/cfg.py`` + ``configs/cifar100/at.yaml``):
``loss = 1.0·CE + 1000·at_loss(feats_s[1:], feats_t[1:], p=2)``, no KD term, no warm-up; teacher
resnet32x4, student resnet8x4, 240 epochs, SGD lr 0.05 (×0.1 at 150/180/210), momentum 0.9, wd 5e-4,
batch 64. ``feats[1:]`` are the post-ReLU outputs of the residual stages (the stem ``feats[0]`` is skipped).

``distill=at`` (:class:`AT`): ``w_ce·CE + w_at·at_loss(feats_s[1:], feats_t[1:], p)`` (terms ``ce``, ``at``);
the stage lists are zipped as in mdistiller, so extra stages of the network with more are dropped.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.feature_kd import FeatureKD


def match_height(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the map with the larger height to ``(h, h)``, ``h`` the smaller height (official rule)."""
    h_s, h_t = f_s.shape[2], f_t.shape[2]
    if h_s > h_t:
        f_s = F.adaptive_avg_pool2d(f_s, (h_t, h_t))
    elif h_s < h_t:
        f_t = F.adaptive_avg_pool2d(f_t, (h_s, h_s))
    return f_s, f_t


def attention_map(f: Tensor, p: float = 2) -> Tensor:
    """``normalize(mean_c f^p)`` as [B, H·W]: each row has unit L2 norm (or is 0 for an all-zero map)."""
    return F.normalize(f.pow(p).mean(dim=1).reshape(f.shape[0], -1), dim=1)


def at_loss(g_s: Sequence[Tensor], g_t: Sequence[Tensor], p: float = 2) -> Tensor:
    """Sum over stages of ``mean (a(f_s) − a(f_t))²`` for lists of maps [B, C, H, W] (channels may differ)."""
    with torch.autocast(device_type=g_s[0].device.type, enabled=False):
        losses = []
        for f_s, f_t in zip(g_s, g_t):
            f_s = f_s.to(torch.promote_types(f_s.dtype, torch.float32))
            f_t = f_t.to(torch.promote_types(f_t.dtype, torch.float32))
            f_s, f_t = match_height(f_s, f_t)
            losses.append((attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean())
        return sum(losses)


class AT(FeatureKD):
    """``distill=at``: ``w_ce·CE + w_at·at_loss(feats_s[1:], feats_t[1:], p)``."""

    student_taps = teacher_taps = ("feats",)
    term = "at"

    def __init__(self, w_ce: float = 1.0, w_at: float = 1000.0, p: float = 2) -> None:
        super().__init__(w_ce, w_at)
        self.p = p

    def feature_loss(self, student, teacher):
        return at_loss(student["feats"][1:], teacher["feats"][1:], self.p)
