"""ReviewKD (kdx.distill.reviewkd): hcl_loss, ABF fusion and the review chain.

Reference numbers come from megvii-research/mdistiller at a08d46f10d6102bd6e3f258ca5ac880b020ea259,
``mdistiller/distillers/ReviewKD.py`` (``hcl_loss``; ``ReviewKD.forward_train`` with stub student/teacher
modules returning the feature dicts built below), run on CPU with torch 2.14.1.
"""
from __future__ import annotations

import math

import pytest
import torch

from kdx.distill.base import warmup_factor
from kdx.distill.reviewkd import ABF, ReviewKD, hcl_loss


# ------------------------------------------------------------------------------------------------ hcl_loss
def test_hcl_hand_values():
    # 2×2 map (h = 2): pools 4 and 2 skipped (l ≥ h), pool 1 used with weight 1/2 → normaliser 1.5
    fs = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    # full MSE = (1+4+9+16)/4 = 7.5; 1×1 pooled: 2.5² = 6.25 → (7.5 + 0.5·6.25)/1.5 = 7.083…
    assert hcl_loss([fs], [torch.zeros_like(fs)]).item() == pytest.approx((7.5 + 3.125) / 1.5)
    # 4×4 map: pool 4 skipped, pools 2 (weight 1/2) and 1 (weight 1/4) used → normaliser 1.75
    checker = (torch.arange(4).view(4, 1) + torch.arange(4)) % 2 * 2.0 - 1  # ±1 checkerboard
    assert hcl_loss([checker.view(1, 1, 4, 4)], [torch.zeros(1, 1, 4, 4)]).item() == pytest.approx(1 / 1.75)
    halves = torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(4, 1)  # left +1, right −1: 2×2 pool keeps ±1
    assert hcl_loss([halves.view(1, 1, 4, 4)], [torch.zeros(1, 1, 4, 4)]).item() == pytest.approx(1.5 / 1.75)
    # 1×1 map: plain MSE
    assert hcl_loss([torch.full((2, 3, 1, 1), 2.0)], [torch.zeros(2, 3, 1, 1)]).item() == pytest.approx(4.0)


def test_hcl_invariants():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g)]
    b = [torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g)]
    assert hcl_loss(a, a).item() == 0.0
    # a sum over stages
    assert hcl_loss(a, b).item() == pytest.approx(hcl_loss(a[:1], b[:1]).item() + hcl_loss(a[1:], b[1:]).item())
    # a spatially constant difference gives the same MSE at every level: the weighted mean equals it
    assert hcl_loss([a[0] * 0 + 3.0], [a[0] * 0 + 1.0]).item() == pytest.approx(4.0)


def test_hcl_official_reference():
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 2, 2), (2, 6, 1, 1)]
    fs = [torch.randn(*s, generator=g) for s in shapes]
    ft = [torch.randn(*s, generator=g) for s in shapes]
    assert hcl_loss(fs, ft).item() == pytest.approx(5.484136581420898, rel=1e-6)
    per_level = [1.2212765216827393, 1.3634822368621826, 1.4146045446395874, 1.48477303981781]
    assert [hcl_loss([s], [t]).item() for s, t in zip(fs, ft)] == pytest.approx(per_level, rel=1e-6)


def test_hcl_gradcheck(one_thread):
    fs = [torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)]
    ft = [torch.randn(1, 1, 8, 8, dtype=torch.float64), torch.randn(2, 2, 2, 2, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *s: hcl_loss(list(s), ft), tuple(fs))


def test_hcl_low_precision_inputs():
    g = torch.Generator().manual_seed(1)
    fs = [torch.randn(4, 16, 8, 8, generator=g) * 3, torch.randn(4, 32, 1, 1, generator=g)]
    ft = [torch.randn(4, 16, 8, 8, generator=g) * 3, torch.randn(4, 32, 1, 1, generator=g)]
    ref = hcl_loss(fs, ft)
    for dt in (torch.bfloat16, torch.float16):
        out = hcl_loss([f.to(dt) for f in fs], [f.to(dt) for f in ft])
        assert out.dtype == torch.float32 and torch.isfinite(out)
        assert out.item() == pytest.approx(ref.item(), rel=1e-2)


# ------------------------------------------------------------------------------------------------ ABF
def test_abf_fusion_by_hand():
    # conv1 = identity, BN in eval with default statistics (x / √(1+1e-5)); att_conv = 0 → both weights 1/2
    abf = ABF(2, 2, 3, fuse=True).eval()
    with torch.no_grad():
        abf.conv1[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        abf.att_conv[0].weight.zero_()
        abf.att_conv[0].bias.zero_()
    x = torch.randn(1, 2, 4, 4)
    res = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2).repeat(1, 2, 1, 1)
    out, fused = abf(x, res, shape=4, out_shape=4)
    up = res.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest 2×2 → 4×4
    assert torch.allclose(fused, 0.5 * x / math.sqrt(1 + 1e-5) + 0.5 * up, atol=1e-6)
    assert out.shape == (1, 3, 4, 4)
    # out_shape differing from the width resizes the fused map (nearest) before conv2
    out8, fused8 = abf(x, res, shape=4, out_shape=8)
    assert fused8.shape == (1, 2, 8, 8) and torch.equal(fused8[:, :, ::2, ::2], fused)


def test_abf_structure_and_init():
    torch.manual_seed(0)
    plain, fusing = ABF(8, 4, 6, fuse=False), ABF(8, 4, 6, fuse=True)
    assert plain.att_conv is None
    assert fusing.att_conv[0].weight.shape == (2, 8, 1, 1) and fusing.att_conv[0].bias is not None
    assert isinstance(fusing.att_conv[1], torch.nn.Sigmoid)
    assert plain.conv1[0].bias is None and plain.conv2[0].weight.shape == (6, 4, 3, 3)
    # Kaiming-uniform with a = 1: bound = √(6 / ((1 + 1)·fan_in)) = √(3 / fan_in)
    bound = math.sqrt(3 / 36)
    w = plain.conv2[0].weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


# ------------------------------------------------------------------------------------------------ chain
IN, OUT, SHAPES = [4, 6, 8, 8], [5, 7, 9, 9], [1, 2, 4, 8]


def _features(in_ch, out_ch, s_sizes, t_sizes):
    """The feature dicts of the official reference runs (Generator seed 4, B = 2)."""
    g = torch.Generator().manual_seed(4)
    sf = [torch.randn(2, 3, s_sizes[0], s_sizes[0], generator=g)]
    sf += [torch.randn(2, c, s, s, generator=g) for c, s in zip(in_ch[:-1], s_sizes)]
    sp = torch.randn(2, in_ch[-1], generator=g)
    tf = [torch.randn(2, 3, t_sizes[0], t_sizes[0], generator=g)]
    tf += [torch.randn(2, c, s, s, generator=g) for c, s in zip(out_ch[:-1], t_sizes)]
    tp = torch.randn(2, out_ch[-1], generator=g)
    return sf, sp, tf, tp


def test_review_chain_structure():
    rk = ReviewKD(IN, OUT, SHAPES, SHAPES)
    assert [abf.att_conv is None for abf in rk.abfs] == [True, False, False, False]  # abfs[0]: deepest
    assert [abf.conv1[0].in_channels for abf in rk.abfs] == IN[::-1]
    assert [abf.conv2[0].out_channels for abf in rk.abfs] == OUT[::-1]
    assert {abf.conv1[0].out_channels for abf in rk.abfs} == {8}  # mid = min(512, in_channels[-1])
    big = ReviewKD([64, 128, 1024], [64, 128, 2048], [1, 8, 16], [1, 8, 16])
    assert big.abfs[0].conv1[0].out_channels == 512
    assert ReviewKD([64, 1024], [64, 2048], [1, 8], [1, 8], max_mid_channel=256).abfs[0].conv1[0].out_channels == 256
    with pytest.raises(ValueError):
        ReviewKD(IN, OUT[:3], SHAPES, SHAPES)


def test_review_chain_official_reference(one_thread):
    # official: ReviewKD(cfg: IN/OUT_CHANNELS above, SHAPES = OUT_SHAPES = [1, 2, 4, 8], REVIEWKD_WEIGHT 5,
    # WARMUP_EPOCHS 20, STU_PREACT False) built under torch.manual_seed(0); forward_train(epoch=3)
    sf, sp, tf, tp = _features(IN, OUT, [8, 4, 2], [8, 4, 2])
    torch.manual_seed(0)
    rk = ReviewKD(IN, OUT, SHAPES, SHAPES)
    out = rk(sf + [sp[:, :, None, None]])  # all of feats + pooled: the stem feats[0] is dropped, as official
    assert [o.shape[1:] for o in out] == [t.shape[1:] for t in tf[1:]] + [(9, 1, 1)]
    loss = 5.0 * warmup_factor(3, 20) * hcl_loss(out, tf[1:] + [tp[:, :, None, None]])
    loss.backward()
    assert loss.item() == pytest.approx(4.134389400482178, rel=1e-6)
    assert rk.abfs[1].conv1[0].weight.grad.sum().item() == pytest.approx(0.10244183987379074, rel=1e-5)
    assert rk.abfs[1].att_conv[0].weight.grad.sum().item() == pytest.approx(0.13229382038116455, rel=1e-5)
    torch.manual_seed(0)
    again = ReviewKD(IN, OUT, SHAPES, SHAPES)(sf[1:] + [sp[:, :, None, None]])
    assert all(torch.equal(a, b) for a, b in zip(out, again))


def test_review_chain_official_reference_with_resizing(one_thread):
    # official: OUT_SHAPES = [1, 4, 8, 16] (teacher maps twice the student's), STU_PREACT True
    # (student preact_feats = 0.5 · feats here), weight 1, epoch 30 (warm-up over); built under manual_seed(0)
    out_shapes = [1, 4, 8, 16]
    sf, sp, tf, tp = _features(IN, OUT, [8, 4, 2], [16, 8, 4])
    torch.manual_seed(0)
    rk = ReviewKD(IN, OUT, SHAPES, out_shapes)
    out = rk([f * 0.5 for f in sf[1:]] + [sp[:, :, None, None]])
    loss = warmup_factor(30, 20) * hcl_loss(out, tf[1:] + [tp[:, :, None, None]])
    loss.backward()
    assert loss.item() == pytest.approx(5.545425891876221, rel=1e-6)
    assert rk.abfs[1].conv1[0].weight.grad.sum().item() == pytest.approx(0.25544196367263794, rel=1e-5)
    assert rk.abfs[1].att_conv[0].weight.grad.sum().item() == pytest.approx(-0.061664365231990814, rel=1e-5)


def test_review_chain_needs_enough_features():
    with pytest.raises(ValueError):
        ReviewKD(IN, OUT, SHAPES, SHAPES)([torch.zeros(2, 8, 1, 1)])
