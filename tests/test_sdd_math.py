"""SDD (kdx.distill.sdd): region logits, region weights, SDD-KD/DKD/NKD; hand values, reductions to the base
losses, gradcheck, official values, half-precision inputs."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdx.distill.losses import dkd_loss, kd_loss
from kdx.distill.nkd import nkd_loss, nkd_per_sample
from kdx.distill.sdd import multi_scale_logits, region_weights, sdd_dkd_loss, sdd_kd_loss, sdd_nkd_loss


def multi_inputs(seed, b=6, c=5, n=5, scale=3.0):
    """Region logits [B, C, N]; labels: the teacher's global argmax for the first half, wrong for the rest."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, n, generator=g, dtype=torch.float64) * scale
    t = torch.randn(b, c, n, generator=g, dtype=torch.float64) * scale
    y = t[:, :, 0].argmax(1)
    y[b // 2:] = (y[b // 2:] + 1) % c
    return s, t, y


def rows(x):
    """[B, C, N] → [N·B, C], region-major."""
    return x.permute(2, 0, 1).reshape(-1, x.shape[1])


# ---------------------------------------------------------------- region logits


def test_region_order_and_pooling_hand_values():
    # one channel holding 0..15 on a 4×4 map, identity classifier: cells are plain means.
    # global 7.5; 2×2 quadrants (row-major) 2.5, 4.5, 10.5, 12.5; then the 16 pixels in row-major order.
    x = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    out = multi_scale_logits(x, nn.Identity(), (1, 2, 4))
    assert out.shape == (1, 1, 21)
    assert out[0, 0].tolist() == [7.5, 2.5, 4.5, 10.5, 12.5] + [float(v) for v in range(16)]
    assert multi_scale_logits(x, nn.Identity(), (1, 2)).shape == (1, 1, 5)
    assert multi_scale_logits(x, nn.Identity(), (1,))[0, 0].tolist() == [7.5]


def test_scales_pool_the_4x4_grid_not_the_map():
    # 6×6 map: the 4×4 adaptive bins cover rows {0,1}, {1,2}, {3,4}, {4,5}; the 2×2 cell (0, 0) averages
    # the first two bins, i.e. rows 0, 1, 2 with weights 1, 2, 1 (same for columns) / 16. Pooling the map
    # directly to 2×2 would weigh rows 0..2 equally.
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(40), dtype=torch.float64)
    out = multi_scale_logits(x, nn.Identity(), (1, 2))
    w = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    cell = (x[:, :, :3, :3] * w[:, None] * w[None, :]).sum((2, 3)) / 16
    assert torch.allclose(out[:, :, 1], cell, rtol=1e-12, atol=0)
    assert not torch.allclose(out[:, :, 1], F.adaptive_avg_pool2d(x, 2)[:, :, 0, 0], atol=1e-3)
    # a 2×2 map is up-sampled: the 4×4 cell (r, c) is pixel (r // 2, c // 2)
    x2 = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(41), dtype=torch.float64)
    cells = multi_scale_logits(x2, nn.Identity(), (1, 2, 4))[:, :, 5:].reshape(2, 3, 4, 4)
    assert torch.equal(cells, x2.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_global_cell_is_the_ordinary_logit_on_8x8_maps():
    g = torch.Generator().manual_seed(42)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    fc = nn.Linear(4, 7).double()
    out = multi_scale_logits(x, fc, (1, 2, 4))
    assert out.shape == (3, 7, 21)
    assert torch.allclose(out[:, :, 0], fc(x.mean((2, 3))), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scales", [(2, 4), (1, 4, 2), (1, 3), (), (1, 1, 2), (1, 2, 8)])
def test_invalid_scales(scales):
    with pytest.raises(ValueError):
        multi_scale_logits(torch.zeros(1, 1, 4, 4), nn.Identity(), scales)


# Official values: shicaiwei123/SDD-CVPR2024 @ e412036c6b7b67d8ed25418d2dedad223ab49a71,
# mdistiller/models/cifar/utils.py SPP(M='[1,2,4]') followed by the reshape/fc/permute lines of
# mdistiller/models/cifar/resnet.py ResNet_SDD.forward (202-209). Inputs: g = Generator().manual_seed(5);
# fc = Linear(3, 4) in float64 with weight randn(4, 3) then bias randn(4) from g; then x = randn(2, 3, hw, hw)
# from g for hw = 8, 7, 2 in that order. Values: out[1, :, k] for k = 0, 1, 5, 20 and out.sum().
OFFICIAL_REGIONS = {
    8: (53.4876822044306, {
        0: [0.23055217029080396, -0.3473706312295453, 1.1171534662516065, 0.9180994672295552],
        1: [0.05271083338828958, 0.122265857998901, 1.3675302950858244, 1.1540482557851326],
        5: [0.19820474101637506, -0.2311776140523334, 1.4477600425649135, 1.1653055934687198],
        20: [0.26776575432036354, 0.9604098024641179, 2.5198258437602328, 2.068360646687383]}),
    7: (35.850508179433966, {
        0: [-0.00029047878503693503, 0.2787695766822528, 0.6675431847074527, 0.6818329633977709],
        1: [-0.1878103737282494, 0.36829829258357605, 0.2626368605345979, 0.4093716092779319],
        5: [-0.6565087367253771, 0.584739643301071, -0.28074191303427554, 0.056956812599471496],
        20: [-0.31509194457934053, 1.0490172701533238, 1.4014803866058188, 1.2962349026727593]}),
    2: (2.669110153328841, {
        0: [0.8860989442427698, -1.8681446273149593, 0.7294095069036799, 0.4510580860108203],
        1: [-0.030426807342620404, -2.7766458942978507, -2.1405498401403484, -1.676099161435176],
        5: [-0.030426807342620404, -2.7766458942978507, -2.1405498401403484, -1.676099161435176],
        20: [0.9434680356369909, -2.5732679519111117, 1.9022265884936194, 1.1867808000807987]}),
}


def test_official_region_logits():
    g = torch.Generator().manual_seed(5)
    fc = nn.Linear(3, 4).double()
    with torch.no_grad():
        fc.weight.copy_(torch.randn(4, 3, generator=g, dtype=torch.float64))
        fc.bias.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    for hw in (8, 7, 2):
        x = torch.randn(2, 3, hw, hw, generator=g, dtype=torch.float64)
        with torch.no_grad():
            out = multi_scale_logits(x, fc, (1, 2, 4))
        total, cells = OFFICIAL_REGIONS[hw]
        assert out.shape == (2, 4, 21) and out.sum().item() == pytest.approx(total, rel=1e-12)
        for k, values in cells.items():
            assert out[1, :, k].tolist() == pytest.approx(values, rel=1e-12, abs=1e-15)


def test_region_logits_gradcheck_float64():
    g = torch.Generator().manual_seed(43)
    x = torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    fc = nn.Linear(2, 2).double()
    assert torch.autograd.gradcheck(lambda a, w: multi_scale_logits(a, lambda f: f @ w.T, (1, 2, 4)),
                                    (x, fc.weight.detach().clone().requires_grad_(True)), fast_mode=True)


# ---------------------------------------------------------------- region weights and losses


def test_region_weights_hand_values():
    # B = 3, C = 3, N = 2 (global, one region); teacher argmaxes (global, region) and labels:
    # sample 0: y = 0, (0, 1): global right, region wrong → complementary, weight 2
    # sample 1: y = 2, (0, 1): both wrong                 → consistent, 1
    # sample 2: y = 1, (0, 1): global wrong, region right → complementary, 2
    # rows are region-major: [global 0, global 1, global 2, region 0, region 1, region 2]
    onehot = torch.eye(3, dtype=torch.float64)
    t = torch.stack([onehot[[0, 1]].T, onehot[[0, 1]].T, onehot[[0, 1]].T])  # [3, C, N]: column n is cell n
    w = region_weights(t, torch.tensor([0, 2, 1]))
    assert w.tolist() == [1.0, 1.0, 1.0, 2.0, 1.0, 2.0]
    assert region_weights(t, torch.tensor([0, 2, 1]), complementary_weight=3.0).tolist() == [1, 1, 1, 3, 1, 3]


def test_sdd_kd_hand_composition():
    # Σ_r w_r·KD(row r) / (N·B) with KD(row) = T²·KL of that row (kd_loss on one row)
    s, t, y = multi_inputs(44)
    w = region_weights(t, y)
    assert set(w.tolist()) == {1.0, 2.0}
    rs, rt = rows(s), rows(t)
    per_row = torch.stack([kd_loss(rs[i:i + 1], rt[i:i + 1], 4.0) for i in range(rs.shape[0])])
    expected = (w * per_row).sum() / rs.shape[0]
    assert sdd_kd_loss(s, t, y, 4.0).item() == pytest.approx(expected.item(), rel=1e-12)


def test_consistent_teacher_gives_the_plain_mean_over_regions():
    # every cell of the teacher equals its global logit: all rows consistent, weights 1
    s, t, y = multi_inputs(45)
    t = t[:, :, :1].expand_as(t).contiguous()
    assert region_weights(t, y).tolist() == [1.0] * 30
    assert sdd_kd_loss(s, t, y, 4.0).item() == pytest.approx(kd_loss(rows(s), rows(t), 4.0).item(), rel=1e-12)
    tckd_nckd = dkd_loss(rows(s), rows(t), y.repeat(5), 1.0, 8.0, 4.0)
    assert sdd_dkd_loss(s, t, y, 1.0, 8.0, 4.0).item() == pytest.approx(tckd_nckd.item(), rel=1e-12)


def test_single_scale_reduces_to_the_base_losses():
    s, t, y = multi_inputs(46, n=1)
    s0, t0 = s[:, :, 0], t[:, :, 0]
    assert sdd_kd_loss(s, t, y, 4.0).item() == pytest.approx(kd_loss(s0, t0, 4.0).item(), rel=1e-12)
    assert sdd_dkd_loss(s, t, y, 1.0, 8.0, 4.0).item() == pytest.approx(
        dkd_loss(s0, t0, y, 1.0, 8.0, 4.0).item(), rel=1e-12
    )
    assert sdd_nkd_loss(s, t, y, 3.0, 3.5, fix_non_target_mask=True).item() == pytest.approx(
        nkd_loss(s0, t0, y, 3.0, 3.5).item(), rel=1e-12
    )
    # the official SDD-NKD keeps the target class in its "non-target" term
    official = nkd_per_sample(s0, t0, y, 4.0, 8.0, drop_target=False).mean()
    assert sdd_nkd_loss(s, t, y, 4.0, 8.0).item() == pytest.approx(official.item(), rel=1e-12)
    assert abs(official.item() - nkd_loss(s0, t0, y, 4.0, 8.0).item()) > 1.0


def test_nan_elements_and_non_finite_totals():
    s, t, y = multi_inputs(47)
    # a class with a -inf logit on both sides: its KL elements are 0·(-inf) = NaN, set to 0 → as if absent
    s_inf, t_inf = s.clone(), t.clone()
    drop = [c for c in range(5) if c not in y.tolist()][0]
    s_inf[:, drop], t_inf[:, drop] = -math.inf, -math.inf
    keep = [c for c in range(5) if c != drop]
    y_kept = torch.tensor([keep.index(v) for v in y.tolist()])
    assert sdd_kd_loss(s_inf, t_inf, y, 4.0).item() == pytest.approx(
        sdd_kd_loss(s[:, keep], t[:, keep], y_kept, 4.0).item(), rel=1e-12
    )
    # a student target probability of exactly 0 makes TCKD infinite: the official code returns a constant 0
    s_zero = s.clone()
    s_zero[torch.arange(6), y, :] = -1e5  # softmax(-1e5/4) of the target is exactly 0 in float64
    s_zero.requires_grad_(True)
    out = sdd_dkd_loss(s_zero, t, y, 1.0, 8.0, 4.0)
    assert out.item() == 0.0 and not out.requires_grad


def test_gradcheck_float64():
    s, t, y = multi_inputs(48, b=2, c=3, n=5)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: sdd_kd_loss(a, t, y, 4.0), (s,))
    assert torch.autograd.gradcheck(lambda a: sdd_dkd_loss(a, t, y, 1.0, 8.0, 4.0), (s,))
    assert torch.autograd.gradcheck(lambda a: sdd_nkd_loss(a, t, y, 4.0, 8.0), (s,))
    assert torch.autograd.gradcheck(lambda a: sdd_nkd_loss(a, t, y, 3.0, 3.5, fix_non_target_mask=True), (s,))


# Official values: shicaiwei123/SDD-CVPR2024 @ e412036c6b7b67d8ed25418d2dedad223ab49a71 (the `.cuda()` calls
# dropped to run on CPU), mdistiller/distillers/KD.py sdd_kd_loss(s, t, 4.0, y), SDD_DKD.py
# multi_dkd(s, t, y, 1.0, 8.0, 4.0), SDD_nkd.py multi_nkd_loss(s, t, y, T, γ), on multi_inputs(4) above
# (float64, B = 6, C = 5, N = 5; s[0, 0, 0] = 2.6611095010756887, y = [2, 4, 1, 0, 0, 1]).
def test_official_values():
    s, t, y = multi_inputs(4)
    assert s[0, 0, 0].item() == pytest.approx(2.6611095010756887, rel=1e-15) and y.tolist() == [2, 4, 1, 0, 0, 1]
    assert sdd_kd_loss(s, t, y, 4.0).item() == pytest.approx(12.169647407580264, rel=1e-12)
    assert sdd_dkd_loss(s, t, y, 1.0, 8.0, 4.0).item() == pytest.approx(87.92314440658086, rel=1e-12)
    assert sdd_nkd_loss(s, t, y, 4.0, 8.0).item() == pytest.approx(337.4966788873754, rel=1e-12)
    assert sdd_nkd_loss(s, t, y, 1.0, 1.5).item() == pytest.approx(9.895670321586131, rel=1e-12)
    assert sdd_kd_loss(s.float(), t.float(), y, 4.0).item() == pytest.approx(12.169647407580264, rel=1e-5)


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
def test_half_precision_inputs(dtype, rtol):
    # region logits: student N(0, 2²); teacher N(0, 2²) with the label logit at +30 in every cell
    g = torch.Generator().manual_seed(1)
    s = torch.randn(8, 100, 5, generator=g) * 2.0
    t = torch.randn(8, 100, 5, generator=g) * 2.0
    y = torch.randint(0, 100, (8,), generator=g)
    t[torch.arange(8), y, :] = 30.0
    t[:, :5, 2:] = -30.0
    losses = [lambda a, b: sdd_kd_loss(a, b, y, 4.0), lambda a, b: sdd_dkd_loss(a, b, y, 1.0, 8.0, 4.0),
              lambda a, b: sdd_nkd_loss(a, b, y, 4.0, 8.0)]
    for fn in losses:
        out = fn(s.to(dtype), t.to(dtype))
        assert out.dtype == torch.float32 and math.isfinite(out.item())
        assert out.item() == pytest.approx(fn(s.to(dtype).float(), t.to(dtype).float()).item(), rel=1e-6)
        assert out.item() == pytest.approx(fn(s, t).item(), rel=rtol)
