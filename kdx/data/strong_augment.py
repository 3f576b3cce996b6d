"""MLKD's strong view on uint8 batches: crop + flip + RandAugment(2 ops) + Cutout, counter-based.

Official source: Jin-Ying/Multi-Level-Logit-Distillation @ 5ee473f, ``mdistiller/dataset/cifar100.py``
(``get_cifar100_train_transform_strong``, ``RandAugment``, ``augment_list``, ``Cutout``/``CutoutAbs``): the weak
view is ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()`` (kdx's :mod:`kdx.data.augment`); the strong
view is an independent ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()`` followed by ``RandAugment(2, 10)``
on the PIL image: two ops drawn uniformly *with replacement* from 14, each with magnitude ``v = lo + (hi-lo)·u``,
``u ~ U[0, 1)`` (the ``m = 10`` argument is unused), then Cutout of side ``v_c·W`` with ``v_c = 0.5·u``. Both views
are then ``ToTensor`` + ``Normalize`` (:func:`kdx.data.augment.normalize`).

Every random number of sample ``idx`` in ``epoch`` is ``hash_uniform32(seed, epoch, idx, stream)``
(:mod:`kdx.data.augment`), streams 10-19 (:data:`STREAMS`); ``u = h / 2**32`` in float64 and the op index is
``h mod 14``. So a resumed run sees the same views, and the ops are drawn per sample.

The ops follow Pillow's definitions on RGB uint8 (the official transform runs on PIL images; ranges ``[lo, hi)``):

=============  ==============  =================================================================================
op             range           definition here (Pillow's)
=============  ==============  =================================================================================
AutoContrast   --              per channel ``int(x·s - lo·s)`` with ``s = 255/(hi-lo)`` (identity if hi ≤ lo)
Brightness     [0.05, 0.95)    blend with black, ``int(f·x)`` (float32): only darkens, as official
Color          [0.05, 0.95)    blend with the grey image ``L = (19595R + 38470G + 7471B + 2¹⁵) >> 16``
Contrast       [0.05, 0.95)    blend with the constant ``int(mean(L) + 0.5)``
Equalize       --              Pillow's histogram equalisation LUT per channel (``step = (N - n_last) // 255``)
Identity       --              unchanged
Posterize      [4, 8)          keep the top ``int(v)`` bits
Rotate         [-30, 30)       ``img.rotate(v)``: counter-clockwise ``v``°, about ``(W/2, H/2)``, nearest, black fill
Sharpness      [0.05, 0.95)    blend with Pillow's SMOOTH filter (3×3 ``[1 1 1; 1 5 1; 1 1 1]/13``, border kept)
ShearX         [-0.3, 0.3)     output ``(x, y)`` takes input ``(x + v·y, y)`` (origin top-left), nearest, black
ShearY         [-0.3, 0.3)     output ``(x, y)`` takes input ``(x, y + v·x)``
Solarize       [0, 256)        ``x < v ? x : 255 - x``
TranslateX     [-0.3, 0.3)     output ``(x, y)`` takes input ``(x + v·W, y)``, nearest, black
TranslateY     [-0.3, 0.3)     output ``(x, y)`` takes input ``(x, y + v·H)``
Cutout         [0, 0.5)        side ``s = v·W``; centre ``c = W - (W-1)·u`` in ``(1, W]`` (the official
                               ``np.random.uniform(w)`` is ``uniform(low=w, high=1)``, a quirk kept);
                               ``x0 = int(max(0, c - s/2))``, ``x1 = int(min(W, x0 + s))``, same for y; pixels
                               ``x0..x1``, ``y0..y1`` *inclusive* (Pillow rectangle) set to (125, 123, 114)
=============  ==============  =================================================================================

Blends are Pillow's ``int(a + f·(b - a))`` in float32; the SMOOTH filter is computed exactly in integers. Nearest sampling
reproduces Pillow's ``Image.transform``: pixel centres, 16.16 fixed-point coefficients for rotate/shear, float for
pure translations. Every op, and Cutout, was checked equal, pixel for pixel, to the official op functions on
3,000 images (Pillow 13); the unit tests compare each op with Pillow. Deviations from the official pipeline are
only in the random numbers (hash streams instead of Python's ``random``/NumPy's global generators). Images must
be ``[B, 3, H, W]`` uint8; other sizes work (magnitudes scale with ``W``/``H`` as official).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kdx.data.augment import apply_crop_flip, hash_uniform32

#: hash streams: crop dx, crop dy, flip, op 1, op 2, magnitude 1, magnitude 2, cutout size, cutout x, cutout y
STREAMS = tuple(range(10, 20))
#: the official op list in order, with magnitude ranges ``(lo, hi)``
OPS = (
    ("auto_contrast", 0.0, 1.0), ("brightness", 0.05, 0.95), ("color", 0.05, 0.95), ("contrast", 0.05, 0.95),
    ("equalize", 0.0, 1.0), ("identity", 0.0, 1.0), ("posterize", 4.0, 8.0), ("rotate", -30.0, 30.0),
    ("sharpness", 0.05, 0.95), ("shear_x", -0.3, 0.3), ("shear_y", -0.3, 0.3), ("solarize", 0.0, 256.0),
    ("translate_x", -0.3, 0.3), ("translate_y", -0.3, 0.3),
)
CUTOUT_FILL = (125, 123, 114)


def _uniform(seed: int, epoch: int, idx: Tensor, stream: int) -> Tensor:
    return hash_uniform32(seed, epoch, idx, stream).to(torch.float64) / 2.0**32


def _bc(v: Tensor) -> Tensor:
    return v.reshape(-1, 1, 1, 1)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """Pillow ``Image.blend(degenerate, x, f)`` for ``f`` in [0, 1]: ``int(a + f·(b - a))`` in float32."""
    a = degenerate.to(torch.float32)
    f = _bc(factor.to(torch.float32))
    return (a + f * (x.to(torch.float32) - a)).to(torch.uint8)


def grayscale(x: Tensor) -> Tensor:
    """Pillow's RGB -> L: ``(19595·R + 38470·G + 7471·B + 32768) >> 16``, shape ``[B, 1, H, W]`` uint8."""
    r, g, b = x.to(torch.int64).unbind(1)
    return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).unsqueeze(1).to(torch.uint8)


def auto_contrast(x: Tensor) -> Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True).to(torch.float64)
    hi = x.amax(dim=(2, 3), keepdim=True).to(torch.float64)
    # a tensor numerator: ``255.0 / t`` is computed as ``255·(1/t)``, which rounds differently from Pillow
    scale = torch.full_like(hi, 255.0) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    levels = torch.arange(256, dtype=torch.float64, device=x.device).view(1, 1, 256)
    lut = (levels * scale.flatten(2) + (-lo * scale).flatten(2)).trunc().clamp(0, 255).to(torch.uint8)
    lut = torch.where((hi > lo).flatten(2), lut, levels.to(torch.uint8))  # [B, C, 256]
    return lut.gather(2, x.flatten(2).to(torch.int64)).view_as(x)


def brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(torch.zeros_like(x), x, factor)


def color(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(grayscale(x).expand_as(x), x, factor)


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = grayscale(x).to(torch.float64).mean(dim=(1, 2, 3))
    return _blend(_bc((mean + 0.5).floor()).expand_as(x), x, factor)


def sharpness(x: Tensor, factor: Tensor) -> Tensor:
    h, w = x.shape[2:]
    xi = x.to(torch.int32)
    s = 4 * xi[:, :, 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            s = s + xi[:, :, dy:dy + h - 2, dx:dx + w - 2]
    # round(s/13) in integers: s/13 is never within 1/26 of a half, so Pillow's float32 kernel rounds the same
    smooth = ((2 * s + 13) // 26).to(torch.uint8)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


def equalize(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    flat = x.reshape(b * c, h * w).to(torch.int64)
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    last = torch.where(hist > 0, torch.arange(256, device=x.device), -1).amax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, last)) // 255
    cum = torch.cumsum(hist, dim=1) - hist  # pixels below each level
    lut = ((step // 2 + cum) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))
    return lut.gather(1, flat).reshape(b, c, h, w).to(torch.uint8)


def posterize(x: Tensor, v: Tensor) -> Tensor:
    bits = v.floor().clamp(min=1).to(torch.int64)
    mask = (255 - ((1 << (8 - bits)) - 1)).to(torch.uint8)
    return x & _bc(mask)


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    return torch.where(x.to(torch.float64) < _bc(threshold), x, 255 - x)


def _gather(x: Tensor, src_x: Tensor, src_y: Tensor) -> Tensor:
    """``out[b, :, y, x] = x[b, :, src_y, src_x]`` (int64 ``[B, H, W]``), 0 where the source is outside."""
    b, c, h, w = x.shape
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    flat = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).reshape(b, 1, h * w).expand(b, c, h * w)
    out = x.reshape(b, c, h * w).gather(2, flat).reshape(b, c, h, w)
    return torch.where(inside.unsqueeze(1), out, torch.zeros_like(out))


def affine(x: Tensor, coeffs: Tensor) -> Tensor:
    """Pillow ``Image.transform(size, AFFINE, (a, b, c, d, e, f))``, nearest, black fill, 16.16 fixed point.

    Output pixel ``(x, y)`` samples the input at ``(a·x' + b·y' + c, d·x' + e·y' + f)`` with ``x' = x + 1/2``,
    ``y' = y + 1/2``, floored; ``coeffs`` is float64 ``[B, 6]``.
    """
    b, _, h, w = x.shape
    a0, a1, a2, a3, a4, a5 = coeffs.to(torch.float64).unbind(1)

    def fix(v: Tensor) -> Tensor:
        return (v * 65536.0 + 0.5).floor().to(torch.int64).reshape(b, 1, 1)

    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    xx = fix(a2 + a0 * 0.5 + a1 * 0.5) + xs * fix(a0) + ys * fix(a1)
    yy = fix(a5 + a3 * 0.5 + a4 * 0.5) + xs * fix(a3) + ys * fix(a4)
    return _gather(x, xx >> 16, yy >> 16)


def rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Pillow ``img.rotate(v)``: counter-clockwise about ``(W/2, H/2)``, same size, nearest, black fill."""
    b, _, h, w = x.shape
    rows = []
    for deg in degrees.tolist():
        ang = -math.radians(deg % 360.0)
        cs, sn = round(math.cos(ang), 15), round(math.sin(ang), 15)
        cx, cy = w / 2, h / 2
        rows.append([cs, sn, cs * -cx + sn * -cy + cx, -sn, cs, -sn * -cx + cs * -cy + cy])
    out = affine(x, torch.tensor(rows, dtype=torch.float64, device=x.device).reshape(b, 6))
    return torch.where(_bc(degrees % 360.0 == 0), x, out)


def shear_x(x: Tensor, v: Tensor) -> Tensor:
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    return affine(x, torch.stack([one, v, zero, zero, one, zero], dim=1))


def shear_y(x: Tensor, v: Tensor) -> Tensor:
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    return affine(x, torch.stack([one, zero, zero, v, one, zero], dim=1))


def _translate(x: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """Pillow's pure-translation path: source ``floor(x + 1/2 + dx)`` (float64), nearest, black fill."""
    b, _, h, w = x.shape
    xs = torch.arange(w, device=x.device, dtype=torch.float64).view(1, 1, w)
    ys = torch.arange(h, device=x.device, dtype=torch.float64).view(1, h, 1)
    src_x = (xs + 0.5 + dx.view(b, 1, 1)).floor().expand(b, h, w).to(torch.int64)
    src_y = (ys + 0.5 + dy.view(b, 1, 1)).floor().expand(b, h, w).to(torch.int64)
    return _gather(x, src_x, src_y)


def translate_x(x: Tensor, v: Tensor) -> Tensor:
    return _translate(x, v * x.shape[3], torch.zeros_like(v))


def translate_y(x: Tensor, v: Tensor) -> Tensor:
    return _translate(x, torch.zeros_like(v), v * x.shape[2])


def cutout(x: Tensor, v: Tensor, u_x: Tensor, u_y: Tensor, fill: tuple[int, ...] = CUTOUT_FILL) -> Tensor:
    """Official ``Cutout(img, v)`` with its centre draws ``u_x, u_y`` in [0, 1) (module docstring); ``v ≤ 0``: no-op."""
    b, c, h, w = x.shape
    size = v * w

    def span(u: Tensor, n: int) -> tuple[Tensor, Tensor]:
        lo = (n - (n - 1) * u - size / 2).clamp(min=0).floor()
        return lo, torch.minimum(lo + size, torch.full_like(lo, float(n))).floor()

    x0, x1 = span(u_x, w)
    y0, y1 = span(u_y, h)
    cols = torch.arange(w, device=x.device, dtype=torch.float64).view(1, 1, w)
    rows = torch.arange(h, device=x.device, dtype=torch.float64).view(1, h, 1)
    box = (cols >= x0.view(b, 1, 1)) & (cols <= x1.view(b, 1, 1)) & (rows >= y0.view(b, 1, 1))
    box = box & (rows <= y1.view(b, 1, 1)) & (v > 0).view(b, 1, 1)
    ink = torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    return torch.where(box.unsqueeze(1), ink, x)


_FUNCS = {
    "auto_contrast": lambda x, v: auto_contrast(x), "brightness": brightness, "color": color, "contrast": contrast,
    "equalize": lambda x, v: equalize(x), "identity": lambda x, v: x, "posterize": posterize, "rotate": rotate,
    "sharpness": sharpness, "shear_x": shear_x, "shear_y": shear_y, "solarize": solarize,
    "translate_x": translate_x, "translate_y": translate_y,
}


def strong_params(seed: int, epoch: int, idx: Tensor, pad: int = 4) -> dict[str, Tensor]:
    """The strong view's random choices for each sample: crop ``dx, dy`` (int64 in [0, 2·pad]), ``flip`` (bool),
    ``ops`` (int64 ``[B, 2]``, indices into :data:`OPS`), ``mags`` (float64 ``[B, 2]``), ``cutout`` (float64
    ``[B]`` in [0, 0.5)) and the Cutout centre draws ``cut_ux, cut_uy`` (float64 in [0, 1))."""
    idx = torch.as_tensor(idx)
    s = STREAMS
    ops = torch.stack([hash_uniform32(seed, epoch, idx, s[3]), hash_uniform32(seed, epoch, idx, s[4])], 1) % len(OPS)
    lo = torch.tensor([o[1] for o in OPS], dtype=torch.float64, device=idx.device)[ops]
    hi = torch.tensor([o[2] for o in OPS], dtype=torch.float64, device=idx.device)[ops]
    u = torch.stack([_uniform(seed, epoch, idx, s[5]), _uniform(seed, epoch, idx, s[6])], 1)
    return {
        "dx": hash_uniform32(seed, epoch, idx, s[0]) % (2 * pad + 1),
        "dy": hash_uniform32(seed, epoch, idx, s[1]) % (2 * pad + 1),
        "flip": (hash_uniform32(seed, epoch, idx, s[2]) >> 31) == 1,
        "ops": ops,
        "mags": lo + (hi - lo) * u,
        "cutout": _uniform(seed, epoch, idx, s[7]) * 0.5,
        "cut_ux": _uniform(seed, epoch, idx, s[8]),
        "cut_uy": _uniform(seed, epoch, idx, s[9]),
    }


def rand_augment(x: Tensor, ops: Tensor, mags: Tensor) -> Tensor:
    """Apply op ``ops[b, k]`` with magnitude ``mags[b, k]`` to sample ``b``, ``k = 0, 1, ...`` in order."""
    if x.ndim != 4 or x.shape[1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 [B, 3, H, W], got {x.dtype} {tuple(x.shape)}")
    ops, mags = ops.to(x.device), mags.to(x.device)
    for k in range(ops.shape[1]):
        out = x.clone()
        for i, (name, _, _) in enumerate(OPS):
            sel = (ops[:, k] == i).nonzero().flatten()
            if sel.numel():
                out[sel] = _FUNCS[name](x[sel], mags[sel, k])
        x = out
    return x


def strong_view(x: Tensor, seed: int, epoch: int, idx: Tensor, pad: int = 4) -> Tensor:
    """The official strong view of uint8 ``x`` ``[B, 3, H, W]`` for samples ``idx`` in ``epoch`` (uint8 out)."""
    p = strong_params(seed, epoch, torch.as_tensor(idx).to(x.device), pad)
    x = apply_crop_flip(x, p["dx"], p["dy"], p["flip"], pad)
    x = rand_augment(x, p["ops"], p["mags"])
    return cutout(x, p["cutout"], p["cut_ux"], p["cut_uy"])
