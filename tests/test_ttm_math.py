"""TTM / WTTM (kdx.distill.ttm): hand values, special cases, gradcheck, official values, half inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdx.distill.losses import kd_loss
from kdx.distill.ttm import ttm_loss, wttm_loss


def inputs(seed, b, c, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    t = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    return s, t


def test_hand_values():
    # z_t = [ln 4, 0] → t = [0.8, 0.2]; l = ½: √t = [2, 1]/√5, power sum 3/√5, p̃ = [2/3, 1/3].
    # z_s = [0, 0] → s = [½, ½]: KL = ⅔·ln(4/3) + ⅓·ln(2/3); WTTM = (3/√5)·KL.
    s = torch.zeros(1, 2, dtype=torch.float64)
    t = torch.tensor([[math.log(4), 0.0]], dtype=torch.float64)
    kl = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    assert ttm_loss(s, t, 0.5).item() == pytest.approx(kl, rel=1e-14)
    assert wttm_loss(s, t, 0.5).item() == pytest.approx(3 / math.sqrt(5) * kl, rel=1e-14)


def test_l_one_is_kd_at_temperature_one():
    s, t = inputs(30, 5, 7)
    kd = kd_loss(s, t, 1.0).item()
    assert ttm_loss(s, t, 1.0).item() == pytest.approx(kd, rel=1e-12)
    assert wttm_loss(s, t, 1.0).item() == pytest.approx(kd, rel=1e-12)  # power sum Σ t = 1


def test_power_transform_is_a_teacher_only_temperature():
    # t^l / Σ t^l = softmax(l·z_t): TTM is KL(softmax(z_t/T) ‖ softmax(z_s)) with T = 1/l and no T²
    s, t = inputs(31, 5, 7)
    for l in (0.1, 0.3, 2.0):
        q = F.softmax(l * t, dim=1)
        expected = (q * (q.log() - F.log_softmax(s, dim=1))).sum(1).mean()
        assert ttm_loss(s, t, l).item() == pytest.approx(expected.item(), rel=1e-10)
    assert ttm_loss(0.25 * t + 7.0, t, 0.25).item() == pytest.approx(0.0, abs=1e-12)  # student = matched target
    assert ttm_loss(s, t, 0.25).item() > 0.0


def test_wttm_weights():
    # uniform teacher: p̃ uniform and Σ t^l = C·C^(-l) = C^(1-l), so WTTM = C^(1-l)·TTM
    s, _ = inputs(32, 4, 6)
    uniform = torch.zeros(4, 6, dtype=torch.float64)
    assert wttm_loss(s, uniform, 0.3).item() == pytest.approx(6**0.7 * ttm_loss(s, uniform, 0.3).item(), rel=1e-12)
    # teacher rows that are permutations of one row share the power sum U: WTTM = U·TTM
    row = torch.tensor([2.0, -1.0, 0.5, 0.0, 3.0, -2.0], dtype=torch.float64)
    t = torch.stack([row[torch.randperm(6, generator=torch.Generator().manual_seed(i))] for i in range(4)])
    u = F.softmax(row, 0).pow(0.3).sum().item()
    assert wttm_loss(s, t, 0.3).item() == pytest.approx(u * ttm_loss(s, t, 0.3).item(), rel=1e-12)
    # otherwise the weights differ per sample (smoother teachers weigh more)
    _, t2 = inputs(33, 4, 6)
    weights = F.softmax(t2, 1).pow(0.3).sum(1)
    assert weights.min().item() > 1.0 and weights.std().item() > 0.01


def test_gradcheck_float64():
    s, t = inputs(34, 3, 5)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: ttm_loss(a, t, 0.3), (s,))
    assert torch.autograd.gradcheck(lambda a: wttm_loss(a, t, 0.3), (s,))


# Official values: zkxufo/TTM @ fe457b33a71ba27536ec04fe3d32c5b04963522f, distiller_zoo/ttm.py TTM(l)(s, t)
# and distiller_zoo/wttm.py WTTM(l)(s, t), on the float64 inputs of inputs(3, 4, 6) above
# (s[0, 0] = -0.6532463753362925).
@pytest.mark.parametrize(
    "l,ttm,wttm",
    [
        (0.1, 1.570095845821101, 5.803395387858531),
        (0.5, 3.02204211118094, 3.9916294850031298),
        (1.0, 3.388995168865255, 3.388995168865255),
    ],
)
def test_official_values(l, ttm, wttm):
    s, t = inputs(3, 4, 6)
    assert s[0, 0].item() == pytest.approx(-0.6532463753362925, rel=1e-15)
    assert ttm_loss(s, t, l).item() == pytest.approx(ttm, rel=1e-12)
    assert wttm_loss(s, t, l).item() == pytest.approx(wttm, rel=1e-12)
    assert wttm_loss(s.float(), t.float(), l).item() == pytest.approx(wttm, rel=1e-5)


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
@pytest.mark.parametrize("fn", [ttm_loss, wttm_loss])
@pytest.mark.parametrize("l", [0.1, 0.5])
def test_half_precision_inputs(dtype, rtol, fn, l):
    # student N(0, 2²); large-margin teacher: label logit +30, five classes -30, the rest N(-10, 2²)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 100, generator=g) * 2.0
    t = torch.randn(16, 100, generator=g) * 2.0 - 10.0
    y = torch.randint(0, 100, (16,), generator=g)
    t[torch.arange(16), y] = 30.0
    t[:, :5] = -30.0
    out = fn(s.to(dtype), t.to(dtype), l)
    assert out.dtype == torch.float32 and math.isfinite(out.item())
    assert out.item() == pytest.approx(fn(s.to(dtype).float(), t.to(dtype).float(), l).item(), rel=1e-6)
    assert out.item() == pytest.approx(fn(s, t, l).item(), rel=rtol)
