"""OFD (kdx/distill/ofd.py): the BN margin against a scipy-free closed form and a numerical integral, the partial
L2 by hand, the stage weighting and pooling, connector init, invariants, float64 gradients, the official
mdistiller / overhaul-distillation values, and bf16 autocast."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from kdx.distill.ofd import OFDConnectors, ofd_loss, ofd_margin, ofd_stages_loss

B = 4


def rnd(seed, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def closed_form_margin(gamma: float, beta: float) -> float:
    """E[x | x < 0] for x ~ N(β, γ²) with Φ(z) = ½·erfc(−z/√2) (no scipy); −3|γ| when Φ(−β/|γ|) ≤ 0.001."""
    s, m = abs(gamma), beta
    cdf = 0.5 * math.erfc(m / s / math.sqrt(2))
    if cdf <= 0.001:
        return -3 * s
    return m - s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf


# ----------------------------------------------------------------------------- (a) hand-derived values
def test_margin_by_hand():
    # β = 0: E[x | x < 0] = −|γ|·φ(0)/Φ(0) = −|γ|·√(2/π) = −0.7978845608·|γ|
    m = ofd_margin(torch.tensor([1.0, -2.0]), torch.tensor([0.0, 0.0]))
    assert torch.allclose(m, torch.tensor([-math.sqrt(2 / math.pi), -2 * math.sqrt(2 / math.pi)]), rtol=1e-6)
    # γ = −2, β = 1: Φ(−0.5) = 0.3085375387, φ(0.5) = 0.3520653268 → 1 − 2·0.3520653268/0.3085375387 = −1.2821555407
    assert ofd_margin(torch.tensor([-2.0]), torch.tensor([1.0])).item() == pytest.approx(-1.2821555407, abs=1e-6)
    # γ = 0.5, β = 2: Φ(−4) = 3.2e-5 ≤ 0.001 → −3·0.5
    assert ofd_margin(torch.tensor([0.5]), torch.tensor([2.0])).item() == -1.5


def test_margin_closed_form_and_integral():
    w = torch.tensor([1.0, -2.0, 0.5, 1.0, 0.3, 2.0, 1.5, 0.7])
    b = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.9, 6.1, 4.6, -3.0])
    m = ofd_margin(w, b)
    assert m.dtype == torch.float32 and m.shape == (8,) and not m.requires_grad
    expected = torch.tensor([closed_form_margin(g, c) for g, c in zip(w.tolist(), b.tolist())])
    assert torch.allclose(m, expected, rtol=1e-6)
    # where the truncated formula is used it is the mean of the negative part: a trapezoid integral in float64
    for gamma, beta in [(1.0, 0.0), (2.0, 1.0), (0.3, 0.9), (0.7, -3.0)]:
        x = torch.linspace(beta - 14 * gamma, 0.0, 400001, dtype=torch.float64)
        p = torch.exp(-0.5 * ((x - beta) / gamma) ** 2)
        mean_neg = (torch.trapezoid(x * p, x) / torch.trapezoid(p, x)).item()
        assert ofd_margin(torch.tensor([gamma]), torch.tensor([beta])).item() == pytest.approx(mean_neg, rel=1e-5)


def test_margin_rejects_zero_weight():
    with pytest.raises(ValueError):
        ofd_margin(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))


def test_ofd_loss_by_hand():
    # one channel, margin m = −1; sample 0 covers every case (s = source, t = target):
    #   s=2,  t=−3: t ≤ m, s > m → (2 + 1)² = 9      s=−2, t=−3: t ≤ m, s ≤ m → 0
    #   s=0,  t=−½: m < t ≤ 0, s > t → ½² = 0.25     s=−1, t=−½: m < t ≤ 0, s ≤ t → 0
    #   s=−1, t=2:  t > 0 → 3² = 9                   s=3,  t=2:  t > 0 → 1²  = 1      sum 19.25
    # sample 1 is all zeros (t = 0: m < t ≤ 0 but s = t → 0), so mean over the batch = 19.25/2 = 9.625
    s = torch.tensor([[2.0, -2.0, 0.0], [-1.0, -1.0, 3.0]]).view(1, 1, 2, 3)
    t = torch.tensor([[-3.0, -3.0, -0.5], [-0.5, 2.0, 2.0]]).view(1, 1, 2, 3)
    s, t = torch.cat([s, torch.zeros_like(s)]), torch.cat([t, torch.zeros_like(t)])
    assert ofd_loss(s, t, torch.tensor([-1.0])).item() == pytest.approx(9.625, rel=1e-7)


def test_positive_margin_quirk():
    # mdistiller's three masks with m = ½ > 0, s = 1, t = 0.2: (1 − ½)²·[t ≤ m] + (1 − 0.2)²·[t > 0] = 0.25 + 0.64;
    # the original max form would give (1 − ½)² = 0.25. Margins from ofd_margin are always negative.
    loss = ofd_loss(torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 0.2), torch.tensor([0.5]))
    assert loss.item() == pytest.approx(0.89, rel=1e-6)


def test_stages_weighting_and_pooling_by_hand():
    # three stages with per-stage losses L0, L1, L2: total L0/4 + L1/2 + L2; the teacher map of stage 1 is 4×4,
    # pooled (2×2 means) to the 2×2 source
    src = [rnd(1, 2, 3, 2, 2), rnd(2, 2, 3, 2, 2), rnd(3, 2, 3, 1, 1)]
    tgt = [rnd(4, 2, 3, 2, 2), rnd(5, 2, 3, 4, 4), rnd(6, 2, 3, 1, 1)]
    mgs = [torch.tensor([-0.3, -0.6, -1.0])] * 3
    pooled = tgt[1].view(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))
    parts = [ofd_loss(src[0], tgt[0], mgs[0]), ofd_loss(src[1], pooled, mgs[1]), ofd_loss(src[2], tgt[2], mgs[2])]
    expected = parts[0] / 4 + parts[1] / 2 + parts[2]
    assert ofd_stages_loss(src, tgt, mgs).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError):
        ofd_stages_loss(src, tgt[1:], mgs)


def test_connectors_layers_and_init():
    conn = OFDConnectors([64, 8], [256, 16], kernel_size=1)
    conv, bn = conn.connectors[0]
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and conv.bias is None
    assert conv.weight.shape == (256, 64, 1, 1) and conv.padding == (0, 0)
    # N(0, 2/(k·k·C_t)): std √(2/256) = 0.0884 on 16384 weights (sampling error ≈ 0.6 %)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.03)
    assert conv.weight.mean().abs().item() < 0.003
    assert torch.equal(bn.weight, torch.ones(256)) and torch.equal(bn.bias, torch.zeros(256))
    conn3 = OFDConnectors([8], [16], kernel_size=3)
    assert conn3.connectors[0][0].padding == (1, 1)
    outs = conn3([torch.randn(2, 8, 5, 5)])
    assert outs[0].shape == (2, 16, 5, 5)
    assert list(conn3.state_dict())[:2] == ["connectors.0.0.weight", "connectors.0.1.weight"]
    with pytest.raises(ValueError):
        OFDConnectors([8, 8], [16])


# ----------------------------------------------------------------------------- (b) invariants
def test_zero_where_source_below_nonpositive_target():
    t = -rnd(1, B, 3, 4, 4).abs()  # t ≤ 0
    s = t - rnd(2, B, 3, 4, 4).abs()  # s ≤ t
    for margin in ([-0.1, -1.0, -5.0], [0.0, -0.5, -0.05]):
        assert ofd_loss(s, t, torch.tensor(margin)).item() == 0.0
    x = rnd(3, B, 3, 4, 4)
    assert ofd_loss(x, x.clone(), torch.tensor([-0.1, -1.0, -5.0])).item() == 0.0


def test_equals_original_max_form_for_negative_margins():
    # clovaai/overhaul-distillation: t' = max(t, m); Σ (s − t')²·[s > t' ∨ t' > 0], then / B
    s, t = rnd(4, B, 3, 4, 4), rnd(5, B, 3, 4, 4)
    m = torch.tensor([-0.2, -0.7, -1.5]).view(1, 3, 1, 1)
    tp = torch.max(t, m)
    original = (((s - tp) ** 2) * ((s > tp) | (tp > 0))).sum() / B
    assert ofd_loss(s, t, m).item() == pytest.approx(original.item(), rel=1e-5)


def test_margin_scale_equivariance():
    # E[kx | kx < 0] = k·E[x | x < 0] for k > 0
    w, b = torch.tensor([1.0, -0.4, 0.8]), torch.tensor([0.3, -0.2, 1.1])
    assert torch.allclose(ofd_margin(3 * w, 3 * b), 3 * ofd_margin(w, b), rtol=1e-6)
    assert bool((ofd_margin(w, b) < 0).all())


# ----------------------------------------------------------------------------- (c) float64 gradients
def test_gradcheck_float64():
    s = rnd(1, 2, 3, 3, 3, dtype=torch.float64).requires_grad_()
    t = rnd(2, 2, 3, 3, 3, dtype=torch.float64).requires_grad_()
    m = torch.tensor([-0.3, -0.8, -1.2], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: ofd_loss(a, b, m), (s, t))
    srcs = [rnd(3, 2, 3, 2, 2, dtype=torch.float64).requires_grad_(), rnd(4, 2, 3, 1, 1, dtype=torch.float64)]
    srcs[1].requires_grad_()
    tgts = [rnd(5, 2, 3, 4, 4, dtype=torch.float64), rnd(6, 2, 3, 1, 1, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda a, b: ofd_stages_loss([a, b], tgts, [m, m]), tuple(srcs))


# ----------------------------------------------------------------------------- (d) official reference values
# megvii-research/mdistiller a08d46f10d6102bd6e3f258ca5ac880b020ea259, mdistiller/distillers/OFD.py (torch 2.14.1,
# scipy 1.17.1, CPU). Margins: OFD.init_ofd_modules on one BatchNorm2d with weight w, bias b → self.margins[0];
# clovaai/overhaul-distillation 76344a84a7ce23c894f41a2e05b866c9b73fd85a CIFAR-100/distiller.py get_margin_from_BN
# gives the same float32 numbers.
OFFICIAL_MARGINS = [-0.7978845834732056, -1.2821555137634277, -1.5, -1.2875999212265015, -0.08492960035800934,
                    -0.5592193007469177, -0.4176955819129944]


def test_official_margins():
    w = torch.tensor([1.0, -2.0, 0.5, 1.0, 0.3, 2.0, 1.5])
    b = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.9, 6.1, 4.6])  # the last three lie near the Φ = 0.001 switch
    assert torch.allclose(ofd_margin(w, b), torch.tensor(OFFICIAL_MARGINS), rtol=1e-6, atol=0)
    # 64 channels: g = Generator seed 9; w = 0.2 + rand(64)·2·(±1 where rand(64) > 0.3 else −1), b = 2·randn(64)
    g = torch.Generator().manual_seed(9)
    w = 0.2 + torch.rand(64, generator=g) * 2 * torch.where(torch.rand(64, generator=g) > 0.3, 1, -1)
    b = torch.randn(64, generator=g) * 2
    m = ofd_margin(w, b)
    assert m.sum().item() == pytest.approx(-96.15753173828125, rel=1e-6)
    assert int((m == -3 * w.abs()).sum()) == 3


def test_official_feat_loss():
    # OFD.py feat_loss(randn(4,3,3,3; seed 10), randn(4,3,3,3; seed 11), margin [-0.5, -0.2, 0.3] as 1×3×1×1)
    s, t = rnd(10, B, 3, 3, 3), rnd(11, B, 3, 3, 3)
    assert ofd_loss(s, t, torch.tensor([-0.5, -0.2, 0.3])).item() == pytest.approx(40.18986892700195, rel=1e-5)
    # overhaul-distillation distillation_loss(s, t, [-0.5, -0.2, -1.0]) / 4 (its sum, divided by the batch)
    assert ofd_loss(s, t, torch.tensor([-0.5, -0.2, -1.0])).item() == pytest.approx(48.79047393798828, rel=1e-5)


@pytest.mark.parametrize("kernel_size, expected", [(1, 288.1861267089844), (3, 288.45355224609375)])
def test_official_stages_loss(kernel_size, expected):
    # OFD.py: teacher BNs (C_t = 5, 6, 7) with weight 0.5 + rand(C), bias randn(C), drawn in that order after
    # torch.manual_seed(0); torch.manual_seed(1) then OFD.init_ofd_modules(tea_channels [5, 6, 7], stu_channels
    # [2, 3, 4], bns, kernel_size) (train mode); OFD.ofd_loss(self, f_s, f_t) with f_s[i] = randn(4, C_s, h, h; seed
    # 20 + i), h = 8, 4, 2 and f_t[i] = randn(4, C_t, h, h; seed 30 + i) + 0.5, h = 8, 8, 2 (stage 1 pooled 8 → 4).
    s_ch, t_ch, s_hw, t_hw = [2, 3, 4], [5, 6, 7], [8, 4, 2], [8, 8, 2]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        bns = [(0.5 + torch.rand(c), torch.randn(c)) for c in t_ch]
        torch.manual_seed(1)
        conn = OFDConnectors(s_ch, t_ch, kernel_size=kernel_size)
    f_s = [rnd(20 + i, B, c, h, h) for i, (c, h) in enumerate(zip(s_ch, s_hw))]
    f_t = [rnd(30 + i, B, c, h, h) + 0.5 for i, (c, h) in enumerate(zip(t_ch, t_hw))]
    loss = ofd_stages_loss(conn(f_s), f_t, [ofd_margin(w, b) for w, b in bns])
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- (e) bf16 autocast
def test_bf16_autocast_finite_and_close():
    s_ch, t_ch = [16, 32], [32, 64]
    with torch.random.fork_rng():
        torch.manual_seed(2)
        conn = OFDConnectors(s_ch, t_ch)
    f_s = [rnd(40, 16, 16, 8, 8), rnd(41, 16, 32, 4, 4)]
    f_t = [2 * rnd(42, 16, 32, 8, 8) - 0.5, 3 * rnd(43, 16, 64, 8, 8) - 1.0]  # stage 1 pooled 8 → 4
    margins = [ofd_margin(1 + rnd(44, c).abs(), rnd(45, c)) for c in t_ch]
    ref = ofd_stages_loss(conn(f_s), f_t, margins)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ofd_stages_loss(conn(f_s), [f.bfloat16() for f in f_t], margins)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)  # measured 1.3e-5
