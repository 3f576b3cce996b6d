"""MLKD strong view (kdx.data.strong_augment): determinism, per-sample draws, each op against Pillow."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from kdx.data import strong_augment as sa


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    """Random RGB images plus structured ones with a black band (like a padded crop) and a narrow-range one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    x[1] = torch.stack([(xx * 7) % 256, (yy * 5 + 3) % 256, ((xx + yy) * 3) % 256]).to(torch.uint8)
    x[1, :, :3] = 0
    x[2] = x[2] // 8 + 100
    return x


def _pil(x: torch.Tensor, i: int) -> Image.Image:
    return Image.fromarray(x[i].permute(1, 2, 0).numpy())


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


# Pillow calls that define each op (module docstring table); v is the op's magnitude
PILLOW = {
    "auto_contrast": lambda im, v: ImageOps.autocontrast(im),
    "brightness": lambda im, v: ImageEnhance.Brightness(im).enhance(v),
    "color": lambda im, v: ImageEnhance.Color(im).enhance(v),
    "contrast": lambda im, v: ImageEnhance.Contrast(im).enhance(v),
    "equalize": lambda im, v: ImageOps.equalize(im),
    "identity": lambda im, v: im,
    "posterize": lambda im, v: ImageOps.posterize(im, int(v)),
    "rotate": lambda im, v: im.rotate(v),
    "sharpness": lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
    "shear_x": lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "shear_y": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "solarize": lambda im, v: ImageOps.solarize(im, v),
    "translate_x": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0)),
    "translate_y": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1])),
}


@pytest.mark.parametrize("k", range(len(sa.OPS)))
def test_each_op_equals_pillow(k):
    name, lo, hi = sa.OPS[k]
    x = _images()
    v = lo + (hi - lo) * torch.rand(x.shape[0], generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    got = sa.rand_augment(x, torch.full((x.shape[0], 1), k), v.view(-1, 1))
    want = torch.stack([_to_tensor(PILLOW[name](_pil(x, i), float(v[i]))) for i in range(x.shape[0])])
    assert got.dtype == torch.uint8 and got.shape == x.shape
    assert torch.equal(got, want), (name, (got.int() - want.int()).abs().max())


def test_hand_values_of_pointwise_ops():
    x = torch.tensor([0b10110111, 200, 100, 201], dtype=torch.uint8).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    one = torch.ones(1, dtype=torch.float64)
    assert sa.posterize(x, 4.9 * one)[0, 0, 0].tolist() == [0b10110000, 192, 96, 192]  # keep 4 high bits
    assert sa.solarize(x, 128 * one)[0, 0, 0].tolist() == [255 - 0b10110111, 55, 100, 54]  # x >= 128 -> 255 - x
    assert sa.brightness(x, 0.5 * one)[0, 0, 0].tolist() == [91, 100, 50, 100]  # int(x / 2)
    # autocontrast per channel: lo = 100, hi = 201 -> int((x - 100)·255/101)
    assert sa.auto_contrast(x)[0, 0, 0].tolist() == [209, 252, 0, 255]  # 83·255/101 = 209.55


def test_cutout_square_and_fill():
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    v = torch.tensor([0.25, 0.0], dtype=torch.float64)
    u = torch.tensor([0.5, 0.5], dtype=torch.float64)
    out = sa.cutout(x, v, u, torch.tensor([0.0, 0.5], dtype=torch.float64))
    # sample 0: side 8; centre x = 32 - 31·0.5 = 16.5 -> x0 = int(12.5) = 12, x1 = int(20.0) = 20;
    # centre y = 32 - 31·0 = 32 -> y0 = 28, y1 = int(min(32, 36)) = 32, clipped at 31; bounds inclusive
    box = torch.zeros(32, 32, dtype=torch.bool)
    box[28:32, 12:21] = True
    for c, ink in enumerate(sa.CUTOUT_FILL):
        assert torch.equal(out[0, c] == ink, box)
    assert torch.equal(out[1], x[1])  # v = 0: unchanged


def test_same_key_same_view_regardless_of_batch():
    x = _images(4)
    a = sa.strong_view(x, seed=3, epoch=7, idx=torch.tensor([10, 11, 12, 13]))
    b = sa.strong_view(x, seed=3, epoch=7, idx=torch.tensor([10, 11, 12, 13]))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    c = sa.strong_view(x[[2, 0]], seed=3, epoch=7, idx=torch.tensor([12, 10]))
    assert torch.equal(c, a[[2, 0]])


def test_draws_per_sample_and_per_epoch():
    idx = torch.arange(2000)
    p = sa.strong_params(0, 1, idx)
    q = sa.strong_params(0, 2, idx)
    counts = torch.bincount(p["ops"].flatten(), minlength=len(sa.OPS))
    assert counts.min() > 200 and counts.max() < 380  # 4000 draws over 14 ops, ~286 each
    assert (p["ops"][:, 0] != p["ops"][:, 1]).any()  # two independent ops per sample
    assert (p["ops"] != q["ops"]).float().mean() > 0.8  # another epoch, other ops (13/14 expected)
    assert not torch.equal(sa.strong_params(1, 1, idx)["mags"], p["mags"])  # another seed
    lo = torch.tensor([o[1] for o in sa.OPS], dtype=torch.float64)[p["ops"]]
    hi = torch.tensor([o[2] for o in sa.OPS], dtype=torch.float64)[p["ops"]]
    assert ((p["mags"] >= lo) & (p["mags"] < hi)).all()
    assert ((p["cutout"] >= 0) & (p["cutout"] < 0.5)).all()
    assert p["dx"].min() == 0 and p["dx"].max() == 8 and 0.45 < p["flip"].float().mean() < 0.55
    # the strong view's crop is independent of the weak view's (kdx.data.augment streams 0-2)
    from kdx.data.augment import crop_flip_params
    assert (crop_flip_params(0, 1, idx, 4)[0] != p["dx"]).float().mean() > 0.8


def test_ops_applied_in_order():
    x = _images(3)[:2]
    ops = torch.tensor([[11, 6], [6, 11]])  # solarize then posterize vs posterize then solarize
    mags = torch.tensor([[100.0, 4.0], [4.0, 100.0]], dtype=torch.float64)
    got = sa.rand_augment(x, ops, mags)
    one = torch.ones(1, dtype=torch.float64)
    assert torch.equal(got[0], sa.posterize(sa.solarize(x[:1], 100 * one), 4 * one)[0])
    assert torch.equal(got[1], sa.solarize(sa.posterize(x[1:], 4 * one), 100 * one)[0])


def test_rejects_non_rgb_uint8():
    with pytest.raises(ValueError):
        sa.rand_augment(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.int64),
                        torch.zeros(1, 1, dtype=torch.float64))
