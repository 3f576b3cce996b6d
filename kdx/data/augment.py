"""Batched, counter-based augmentation for uint8 image batches.

The random parameters of sample ``idx`` in epoch ``epoch`` are an integer hash
of ``(seed, epoch, idx)`` -- no RNG state -- so they are identical on every
device, every run and after a resume.

Semantics: ``apply_crop_flip(x, *crop_flip_params(seed, epoch, idx, pad), pad)``
equals torchvision's ``RandomCrop(size=H, padding=pad)`` (zero fill) followed by
``RandomHorizontalFlip(p=0.5)``: the image is zero-padded by ``pad`` pixels on
every side, a window of the original size is cut at offset ``(dy, dx)``, each
offset uniform in ``[0, 2*pad]``, and the result is mirrored left-right with
probability 1/2.

Stored views (``teacher_cache=augmented``, :mod:`kdx.teachers.cache`): each
sample has ``V`` fixed views, view ``v`` with parameters
:func:`view_params` ``(v, idx)`` -- a function of ``(v, idx)`` only, so one
teacher-logit cache serves runs with any seed -- and in epoch ``e`` a run draws
view :func:`draw_view` ``(seed, e, idx, V)``, uniform over the ``V`` views.

The hash is murmur3's 32-bit finaliser evaluated in int64 tensors with every
intermediate kept below 2**63 (multiplications split into 16-bit halves), so no
signed overflow happens on any backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """``(a * c) mod 2**32`` for int64 ``a`` in ``[0, 2**32)`` without overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _fmix32_int(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _key(seed: int, epoch: int) -> int:
    """Fold a Python ``(seed, epoch)`` pair (any size, any sign) into 32 bits."""
    h = 0x2545F491
    for v in (int(seed), int(epoch)):
        v &= (1 << 64) - 1
        for part in (v & _M32, v >> 32):
            h = _fmix32_int((h ^ part) * 0x9E3779B1 & _M32)
    return h


def hash_uniform32(seed: int, epoch: int, idx: torch.Tensor, stream: int) -> torch.Tensor:
    """32-bit hash (int64 tensor in ``[0, 2**32)``) of ``(seed, epoch, idx, stream)``."""
    idx = torch.as_tensor(idx).to(torch.int64)
    k = _key(seed, epoch)
    h = _fmix32(_mul32((idx & _M32) ^ k, 0x9E3779B1) ^ ((idx >> 32) & _M32))
    return _fmix32(h ^ _fmix32_int((stream * 0x632BE5AB + 0x1B873593) & _M32))


def crop_flip_params(
    seed: int, epoch: int, idx: torch.Tensor, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets and flip flags for ``(seed, epoch, idx)``.

    Returns ``(dx, dy, flip)``: int64 offsets in ``[0, 2*pad]`` (column, row of
    the crop window's top-left corner in the padded image) and a bool flip
    flag, each of shape ``idx.shape`` on ``idx``'s device.
    """
    n = 2 * int(pad) + 1
    dx = hash_uniform32(seed, epoch, idx, 0) % n
    dy = hash_uniform32(seed, epoch, idx, 1) % n
    flip = (hash_uniform32(seed, epoch, idx, 2) >> 31) == 1
    return dx, dy, flip


#: the seed of the stored views; views use the "epochs" -1, -2, ... of this seed, which no run visits
VIEW_SEED = 0
_VIEW_STREAM = 3  # streams 0-2 are crop_flip_params'


def draw_view(seed: int, epoch: int, idx: torch.Tensor, views: int) -> torch.Tensor:
    """The stored view (int64 in ``[0, views)``) that sample ``idx`` uses in ``epoch`` of a run with ``seed``."""
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    return hash_uniform32(seed, epoch, idx, _VIEW_STREAM) % int(views)


def view_params(
    view: int | torch.Tensor, idx: torch.Tensor, pad: int, views: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop offsets and flip of stored view ``view`` of each sample, as :func:`crop_flip_params` returns them.

    ``view`` is one int (the same view for the whole batch) or a per-sample int64 tensor; then
    ``views`` (the number of views) is needed, and each of the ``views`` parameter sets is hashed
    once and picked per sample.
    """
    idx = torch.as_tensor(idx)
    if not isinstance(view, torch.Tensor):
        return crop_flip_params(VIEW_SEED, -1 - int(view), idx, pad)
    if views is None:
        raise ValueError("view_params: a per-sample view tensor needs the number of views")
    view = view.to(idx.device)
    dx, dy, flip = (torch.zeros_like(idx, dtype=torch.int64),) * 2 + (torch.zeros_like(idx, dtype=torch.bool),)
    for v in range(int(views)):
        vx, vy, vf = crop_flip_params(VIEW_SEED, -1 - v, idx, pad)
        m = view == v
        dx, dy, flip = torch.where(m, vx, dx), torch.where(m, vy, dy), torch.where(m, vf, flip)
    return dx, dy, flip


def apply_crop_flip(
    x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor, pad: int
) -> torch.Tensor:
    """Zero-pad by ``pad``, crop ``H x W`` at ``(dy, dx)``, mirror where ``flip``.

    ``x`` is ``[B, C, H, W]`` (any dtype); one gather, no loop over samples.
    """
    if x.ndim != 4:
        raise ValueError(f"expected [B, C, H, W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    dev = x.device
    dx, dy, flip = dx.to(dev), dy.to(dev), flip.to(dev)
    xp = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    rows = dy.view(b, 1) + torch.arange(h, device=dev).view(1, h)  # [B, H]
    cols = torch.arange(w, device=dev).view(1, w).expand(b, w)
    cols = torch.where(flip.view(b, 1), cols.flip(1), cols) + dx.view(b, 1)  # [B, W]
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    return xp[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float32 ``(x / 255 - mean) / std`` per channel.

    Bit-identical to ``transforms.Normalize(mean, std)(transforms.ToTensor()(img))``.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.to(torch.float32).div(255).sub(mean_t).div(std_t)
