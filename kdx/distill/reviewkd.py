"""ReviewKD: knowledge review with attention-based fusion and the hierarchical context loss (Chen et al., CVPR 2021).

Official source: megvii-research/mdistiller ``mdistiller/distillers/ReviewKD.py`` (``hcl_loss``, ``ABF``,
``ReviewKD.forward_train``). Written anew here; equal to the official code in float32 (tests).

Student features, shallow → deep, ``x_1..x_n`` (the last one the pooled vector as a ``1×1`` map) are
fused deep → shallow by one ABF per level: ``ABF_n`` (no fusion) maps ``x_n``; for ``i < n``, ``ABF_i``
fuses ``conv1(x_i)`` with the previous level's residual ``r_{i+1}`` upsampled (nearest) to ``shape_i``,
weighted per pixel by a two-channel sigmoid attention; each level outputs ``conv2(r_i)`` at ``out_shape_i``.
Loss: ``w · min(epoch/W, 1) · Σ_i HCL(out_i, t_i)`` (epoch counted from 1, :func:`kdx.distill.warmup_factor`)
with the teacher's features ``t_i``, where (:func:`hcl_loss`)

``HCL(s, t) = (MSE(s, t) + Σ_l 2^{-j(l)}·MSE(P_l s, P_l t)) / (1 + Σ_l 2^{-j(l)})``, ``P_l`` = adaptive
average pooling to ``l × l`` over ``l ∈ (4, 2, 1)`` with ``l < h`` (h = the student map's height), and
``j(l)`` = 1, 2, 3 for the first, second, third level actually used; MSE is the mean over all elements.

Features (mdistiller): student ``feats[1:] + [pooled_feat]`` (``preact_feats[1:]`` when
``STU_PREACT``; the official code passes all of ``feats`` and ``zip`` silently drops ``feats[0]``),
teacher ``preact_feats[1:] + [pooled_feat]`` always (pre-ReLU stage outputs; pooled = post-ReLU GAP).

Official CIFAR-100 hyper-parameters (``engine/cfg.py`` + ``configs/cifar100/reviewkd.yaml``, resnet32x4 →
resnet8x4): ``CE_WEIGHT 1.0``, ``REVIEWKD_WEIGHT 5.0`` (cfg default 1.0), ``WARMUP_EPOCHS 20``,
``SHAPES = OUT_SHAPES = [1, 8, 16, 32]`` (deep → shallow), ``IN_CHANNELS = OUT_CHANNELS = [64, 128, 256, 256]``
(shallow → deep), ``STU_PREACT False``, ``MAX_MID_CHANNEL 512``; SGD lr 0.05, wd 5e-4, 240 epochs, batch 64.

Quirks kept: the mid width is ``min(512, in_channels[-1])``: mdistiller reads ``MAX_MID_CHANNEL`` but never
uses it (here ``max_mid_channel=512``, official; another value is the fix). ``hcl_loss`` skips pooling levels
by the student's height only and halves the weight per level *used*. ABF compares only the width with
``out_shape`` before resizing and takes square sizes (``shape × shape``).

``distill=reviewkd`` (:class:`ReviewKDStrategy`): ``w_ce·CE + w_reviewkd·min(e/warmup, 1)·Σ HCL``. The chain's
channels and sizes (mdistiller's per-pair ``IN/OUT_CHANNELS``, ``SHAPES``, ``OUT_SHAPES``) are derived from the
tapped shapes (:func:`reviewkd_layout`): the teacher's n levels ``preact_feats[1:] + [pooled_feat]`` give
``OUT_*``; the student's deepest n of ``feats + [pooled_feat]`` (what the official ``zip`` keeps: ``feats[1:]``
when the student has as many stages as the teacher) give ``IN_CHANNELS``/``SHAPES``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.base import Strategy, warmup_factor
from kdx.errors import ConfigError


def hcl_loss(fstudent: Sequence[Tensor], fteacher: Sequence[Tensor]) -> Tensor:
    """Hierarchical context loss summed over the stage pairs (see the module docstring), in float32 at least."""
    total: Tensor | float = 0.0
    for fs, ft in zip(fstudent, fteacher):
        dtype = torch.promote_types(torch.promote_types(fs.dtype, ft.dtype), torch.float32)
        fs, ft = fs.to(dtype), ft.to(dtype)
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        weight, norm = 1.0, 1.0
        for size in (4, 2, 1):
            if size >= h:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            norm += weight
        total = total + loss / norm
    return total


class ABF(nn.Module):
    """Attention-based fusion block: conv1×1+BN → (fuse with the upsampled residual) → conv3×3+BN.

    Init as official: Kaiming-uniform (a=1) for both convs, PyTorch defaults for BN and ``att_conv``
    (a 1×1 conv ``2·mid → 2`` with bias, then sigmoid; only when ``fuse``).
    """

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False), nn.BatchNorm2d(mid_channel)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(out_channel)
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(2 * mid_channel, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: Tensor, residual: Optional[Tensor] = None, shape: Optional[int] = None,
        out_shape: Optional[int] = None,
    ) -> tuple[Tensor, Tensor]:
        """``(output, new residual)``: ``residual`` is resized (nearest) to ``shape × shape`` (x's size); the
        fused map to ``out_shape × out_shape`` when its width differs (None: kept)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, (shape, shape), mode="nearest")
            att = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * att[:, 0:1] + residual * att[:, 1:2]
        if out_shape is not None and x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


class ReviewKD(nn.Module):
    """The student-side review chain: one :class:`ABF` per level, fused deep → shallow.

    ``in_channels``/``out_channels``: per level, shallow → deep (student / teacher widths, the last the
    pooled vector's); ``shapes``/``out_shapes``: per level, deep → shallow (as mdistiller's cfg).
    ``abfs[0]`` is the deepest block (the official state-dict layout); built shallow → deep as official.
    """

    def __init__(
        self, in_channels: Sequence[int], out_channels: Sequence[int], shapes: Sequence[int],
        out_shapes: Sequence[int], max_mid_channel: int = 512,
    ) -> None:
        super().__init__()
        n = len(in_channels)
        if not len(out_channels) == len(shapes) == len(out_shapes) == n:
            raise ValueError("in_channels, out_channels, shapes and out_shapes need one entry per level")
        mid = min(max_mid_channel, in_channels[-1])
        blocks = [ABF(c, mid, out_channels[i], i < n - 1) for i, c in enumerate(in_channels)]
        self.abfs = nn.ModuleList(blocks[::-1])
        self.shapes, self.out_shapes = list(shapes), list(out_shapes)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """Fused student features, shallow → deep, from the student's ``feats`` (shallow → deep, the last the
        pooled map ``B×C×1×1``); only the last ``len(in_channels)`` entries are used, like official ``zip``."""
        n = len(self.abfs)
        if len(feats) < n:
            raise ValueError(f"ReviewKD needs {n} student features, got {len(feats)}")
        x = list(feats)[::-1][:n]
        out, res = self.abfs[0](x[0], out_shape=self.out_shapes[0])
        results = [out]
        for f, abf, shape, out_shape in zip(x[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:]):
            out, res = abf(f, res, shape, out_shape)
            results.insert(0, out)
        return results


class Layout(NamedTuple):
    """The chain's configuration in mdistiller's order: channels shallow → deep, sizes deep → shallow."""

    in_channels: list[int]
    out_channels: list[int]
    shapes: list[int]
    out_shapes: list[int]


def _levels(shapes: Sequence[Sequence[int]], setting: str) -> list[tuple[int, int]]:
    """``(channels, size)`` of each ``B×C×H×W`` map (H = W) or ``B×C`` vector (size 1)."""
    out = []
    for shape in shapes:
        if len(shape) == 2:
            out.append((int(shape[1]), 1))
        elif len(shape) == 4 and shape[2] == shape[3]:
            out.append((int(shape[1]), int(shape[2])))
        else:
            raise ConfigError(f"ReviewKD needs square B×C×H×W maps (or the B×C pooled vector), got {tuple(shape)} "
                              f"from {setting}.")
    return out


def reviewkd_layout(
    teacher_shapes: dict[str, list], student_shapes: dict[str, list], stu_preact: bool = False
) -> Layout:
    """mdistiller's ``IN_CHANNELS``, ``OUT_CHANNELS``, ``SHAPES``, ``OUT_SHAPES`` from the tapped shapes
    (``{set: [shape, ...]}``): teacher ``preact_feats[1:] + pooled_feat``; the student's deepest n levels of
    ``feats`` (``preact_feats`` with ``stu_preact``) ``+ pooled_feat``, n = the teacher's level count."""
    s_set = "preact_feats" if stu_preact else "feats"
    teacher = _levels([*teacher_shapes["preact_feats"][1:], teacher_shapes["pooled_feat"][0]], "teacher.model.taps")
    student = _levels([*student_shapes[s_set], student_shapes["pooled_feat"][0]], "model.taps")
    n = len(teacher)
    if len(student) < n:
        raise ConfigError(f"ReviewKD pairs the teacher's {n} levels (preact_feats[1:] + pooled_feat) with the "
                          f"student's deepest ones, but the student has only {len(student)} ({s_set} + pooled_feat): "
                          "set teacher.model.taps / model.taps so that the student has at least as many.")
    student = student[-n:]
    return Layout([c for c, _ in student], [c for c, _ in teacher], [h for _, h in student][::-1],
                  [h for _, h in teacher][::-1])


class ReviewKDStrategy(Strategy):
    """``distill=reviewkd``: ``w_ce·CE + w_reviewkd·min(epoch/warmup, 1)·HCL(ABF chain(student), teacher)``."""

    student_taps: tuple[str, ...] = ("feats", "pooled_feat")
    teacher_taps = ("preact_feats", "pooled_feat")

    def __init__(self, w_ce: float = 1.0, w_reviewkd: float = 5.0, warmup: int = 20, stu_preact: bool = False,
                 max_mid_channel: int = 512) -> None:
        super().__init__()
        self.w_ce, self.w_reviewkd, self.warmup = float(w_ce), float(w_reviewkd), int(warmup)
        self.stu_preact, self.max_mid_channel = bool(stu_preact), int(max_mid_channel)
        if self.stu_preact:
            self.student_taps = ("preact_feats", "pooled_feat")
        self.review: Optional[ReviewKD] = None

    def build_feature_modules(self, teacher_shapes, student_shapes) -> None:
        self.layout = reviewkd_layout(teacher_shapes, student_shapes, self.stu_preact)
        self.review = ReviewKD(*self.layout, max_mid_channel=self.max_mid_channel)

    @staticmethod
    def levels(out, maps: str, first: int) -> list[Tensor]:
        """``out.taps[maps][first:]`` and the pooled feature as a ``B×C×1×1`` map."""
        return [*out.taps[maps][first:], out.taps["pooled_feat"][0][:, :, None, None]]

    def loss_terms(self, student, teacher, batch, epoch):
        if self.review is None:
            raise RuntimeError("ReviewKDStrategy has no ABF chain yet: kdx.build.build calls build_feature_modules.")
        fused = self.review(self.levels(student, self.student_taps[0], 0))
        hcl = hcl_loss(fused, self.levels(teacher, "preact_feats", 1))
        return {
            "ce": self.w_ce * F.cross_entropy(student.logits, batch.y),
            "reviewkd": self.w_reviewkd * warmup_factor(epoch, self.warmup) * hcl,
        }
