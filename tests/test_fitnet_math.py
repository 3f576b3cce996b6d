"""FitNet (kdx/distill/fitnet.py): hint regressor shapes and layers, hint loss by hand, invariants,
float64 gradients, the official mdistiller values, and bf16 autocast."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kdx.distill.fitnet import HintRegressor, fitnet_loss

B = 4


def rnd(seed, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def seeded_regressor(s_shape, t_shape, use_relu=True, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return HintRegressor(s_shape, t_shape, use_relu=use_relu)


# ----------------------------------------------------------------------------- (a) hand-derived values
def test_fitnet_loss_by_hand():
    # (1 − 0)² + (−1 − 1)² + (2 − 2)² + (0 − 3)² = 1 + 4 + 0 + 9 = 14 over 4 elements → 3.5
    f_s = torch.tensor([1.0, -1.0, 2.0, 0.0]).view(1, 1, 2, 2)
    f_t = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 1, 2, 2)
    assert fitnet_loss(f_s, f_t).item() == pytest.approx(3.5, rel=1e-7)


@pytest.mark.parametrize(
    "s_shape, t_shape, kind, kernel, out_hw",
    [
        ((B, 3, 4, 4), (B, 5, 4, 4), nn.Conv2d, (1, 1), (4, 4)),  # same size: 1×1 conv
        ((B, 3, 8, 8), (B, 5, 4, 4), nn.Conv2d, (3, 3), (4, 4)),  # student 2× larger: 3×3 stride 2 pad 1
        ((B, 3, 2, 2), (B, 5, 4, 4), nn.ConvTranspose2d, (4, 4), (4, 4)),  # student 2× smaller: 4×4 transposed
        ((B, 3, 6, 6), (B, 5, 4, 4), nn.Conv2d, (3, 3), (4, 4)),  # larger, not 2×: valid conv 1+6−4 = 3
        ((3, 7, 5), (5, 4, 4), nn.Conv2d, (4, 2), (4, 4)),  # C×H×W shapes, non-square: kernel (1+7−4, 1+5−4)
    ],
)
def test_regressor_layers(s_shape, t_shape, kind, kernel, out_hw):
    reg = HintRegressor(s_shape, t_shape)
    assert type(reg.conv) is kind and tuple(reg.conv.kernel_size) == kernel
    assert reg.conv.bias is not None and isinstance(reg.bn, nn.BatchNorm2d) and reg.bn.num_features == 5
    if kind is nn.Conv2d and kernel == (3, 3) and s_shape[-1] == 8:
        assert reg.conv.stride == (2, 2) and reg.conv.padding == (1, 1)
    if kind is nn.ConvTranspose2d:
        assert reg.conv.stride == (2, 2) and reg.conv.padding == (1, 1)
    out = reg(torch.randn(2, *s_shape[-3:]))
    assert out.shape == (2, 5, *out_hw)
    assert list(reg.state_dict()) == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                      "bn.running_var", "bn.num_batches_tracked"]


def test_regressor_rejects_smaller_student_not_half():
    with pytest.raises(NotImplementedError):
        HintRegressor((B, 3, 3, 3), (B, 5, 4, 4))


def test_regressor_by_hand_eval_mode():
    # same size, 1 channel: conv 1×1 weight 2, bias −1; BN in eval with running mean 0.5, var 4, γ 3, β 0.25:
    # x = [0, 1, −2, 3] → conv 2x − 1 = [−1, 1, −5, 5] → BN 3·(v − 0.5)/√(4 + 1e-5) + 0.25
    #   = 3·[−1.5, 0.5, −5.5, 4.5]/√4.00001 + 0.25 ≈ [−2.0, 1.0, −8.0, 7.0]; ReLU → [0, 1.0, 0, 7.0]
    reg = HintRegressor((1, 1, 2, 2), (1, 1, 2, 2))
    with torch.no_grad():
        reg.conv.weight.fill_(2.0)
        reg.conv.bias.fill_(-1.0)
        reg.bn.running_mean.fill_(0.5)
        reg.bn.running_var.fill_(4.0)
        reg.bn.weight.fill_(3.0)
        reg.bn.bias.fill_(0.25)
    reg.eval()
    x = torch.tensor([0.0, 1.0, -2.0, 3.0]).view(1, 1, 2, 2)
    pre = [3 * v / (4 + 1e-5) ** 0.5 + 0.25 for v in (-1.5, 0.5, -5.5, 4.5)]
    assert torch.allclose(reg(x).flatten(), torch.tensor([max(p, 0.0) for p in pre]), rtol=1e-6)
    reg.use_relu = False
    assert torch.allclose(reg(x).flatten(), torch.tensor(pre), rtol=1e-6)


# ----------------------------------------------------------------------------- (b) invariants
def test_fitnet_loss_invariants():
    a, b = rnd(1, B, 3, 4, 4), rnd(2, B, 3, 4, 4)
    assert fitnet_loss(a, a.clone()).item() == 0.0
    assert fitnet_loss(a, b).item() == pytest.approx(fitnet_loss(b, a).item(), rel=1e-7)
    assert fitnet_loss(3 * a, 3 * b).item() == pytest.approx(9 * fitnet_loss(a, b).item(), rel=1e-5)
    # mean, not sum: repeating the batch leaves it unchanged
    assert fitnet_loss(torch.cat([a, a]), torch.cat([b, b])).item() == pytest.approx(fitnet_loss(a, b).item(), rel=1e-6)


# ----------------------------------------------------------------------------- (c) float64 gradients
def test_gradcheck_float64():
    a = rnd(3, 2, 2, 3, 3, dtype=torch.float64).requires_grad_()
    b = rnd(4, 2, 2, 3, 3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(fitnet_loss, (a, b))
    for s_hw in (3, 6, 2):  # same size, 2× larger, 2× smaller (teacher 3×3 / 3×3 / 4×4)
        t_hw = 4 if s_hw == 2 else 3
        reg = seeded_regressor((2, 2, s_hw, s_hw), (2, 3, t_hw, t_hw)).double()
        x = rnd(5, 2, 2, s_hw, s_hw, dtype=torch.float64).requires_grad_()
        t = rnd(6, 2, 3, t_hw, t_hw, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda v: fitnet_loss(reg(v), t), (x,))


# ----------------------------------------------------------------------------- (d) official reference values
# megvii-research/mdistiller a08d46f10d6102bd6e3f258ca5ac880b020ea259, mdistiller/distillers/_common.py ConvReg
# and FitNet.forward_train's F.mse_loss: torch.manual_seed(0) then ConvReg(s_shape, t_shape, use_relu) (train mode,
# BN batch statistics); f_s = randn(s_shape, Generator seed 1), f_t = randn(t_shape, Generator seed 2);
# value = F.mse_loss(conv_reg(f_s), f_t) (torch 2.14.1, CPU). The same seed gives identical initial weights here.
OFFICIAL = [
    ((B, 3, 4, 4), (B, 5, 4, 4), True, 1.3994067907333374),
    ((B, 3, 4, 4), (B, 5, 4, 4), False, 1.8737449645996094),
    ((B, 3, 8, 8), (B, 5, 4, 4), True, 1.484807014465332),
    ((B, 3, 8, 8), (B, 5, 4, 4), False, 1.9381415843963623),
    ((B, 3, 2, 2), (B, 5, 4, 4), True, 1.4653536081314087),
    ((B, 3, 2, 2), (B, 5, 4, 4), False, 2.060872793197632),
    ((B, 3, 6, 6), (B, 5, 4, 4), True, 1.413813591003418),
    ((B, 3, 6, 6), (B, 5, 4, 4), False, 1.940426230430603),
]


@pytest.mark.parametrize("s_shape, t_shape, use_relu, expected", OFFICIAL)
def test_official_values(s_shape, t_shape, use_relu, expected):
    reg = seeded_regressor(s_shape, t_shape, use_relu)
    loss = fitnet_loss(reg(rnd(1, *s_shape)), rnd(2, *t_shape))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- (e) bf16 autocast
def test_bf16_autocast_finite_and_close():
    s_shape, t_shape = (16, 32, 16, 16), (16, 64, 8, 8)  # student 2× larger, realistic post-ReLU hints
    reg = seeded_regressor(s_shape, t_shape)
    f_s, f_t = rnd(7, *s_shape).relu(), 3.0 * rnd(8, *t_shape).relu()
    ref = fitnet_loss(reg(f_s), f_t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reg(f_s)
        loss = fitnet_loss(out, f_t.bfloat16())
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)  # measured 2e-5
