"""Differentiable augmentation for synthesised images (what NAYER does with kornia), in plain torch.

``RandomCrop(H×W, padding=pad)`` (zero fill, per-sample offsets uniform in ``[0, 2·pad]``), then
``RandomHorizontalFlip(0.5)`` (per sample), then ``Normalize(mean, std)``. The crop and flip are one
gather (:func:`kdx.data.augment.apply_crop_flip`), so gradients flow back to every input pixel that
lands in the output. The random parameters come from a ``torch.Generator`` (resumable, per rank).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from kdx.data.augment import apply_crop_flip


def random_crop_flip_params(
    n: int, pad: int, flip: bool, generator: Optional[torch.Generator] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dy, flip)`` for ``n`` samples: offsets in ``[0, 2·pad]``, flip flags with p = 1/2 (CPU)."""
    hi = 2 * int(pad) + 1
    dx = torch.randint(hi, (n,), generator=generator)
    dy = torch.randint(hi, (n,), generator=generator)
    fl = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return dx, dy, fl


def normalize_float(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x − mean) / std`` per channel for float images in [0, 1] (differentiable)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def augment(
    x: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    pad: int = 4,
    flip: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Random crop (zero padding ``pad``) + horizontal flip + normalise, differentiable in ``x``."""
    if pad > 0 or flip:
        dx, dy, fl = random_crop_flip_params(x.shape[0], pad, flip, generator)
        x = apply_crop_flip(x, dx, dy, fl, pad)
    return normalize_float(x, mean, std)


__all__ = ["augment", "normalize_float", "random_crop_flip_params"]
