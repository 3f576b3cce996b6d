"""CTKD (kdx.distill.ctkd): temperature module, gradient reversal, λ schedule, KD/DKD with a tensor τ."""
from __future__ import annotations

import math

import pytest
import torch

from kdx.distill.ctkd import (
    GlobalTemperature,
    GradientReversal,
    ctkd_lambda,
    dkd_loss_learnable_t,
    kd_loss_learnable_t,
)
from kdx.distill.losses import kd_loss


def _inputs(seed: int, b: int = 4, c: int = 6, teacher_scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, c, generator=g) * 2
    zt = torch.randn(b, c, generator=g) * teacher_scale
    y = torch.randint(0, c, (b,), generator=g)
    return zs, zt, y


def _theta_grad(loss_fn, lam: float, dtype=torch.float64) -> tuple[float, float]:
    """(loss, ∂loss/∂θ as seen by θ) through GlobalTemperature at θ = 1."""
    m = GlobalTemperature().to(dtype)
    loss = loss_fn(m(lam))
    loss.backward()
    return loss.item(), m.global_t.grad.item()


def _fd_theta(loss_fn, theta: float = 1.0, h: float = 1e-6) -> float:
    """Central finite difference of the loss w.r.t. θ (float64), τ = 1 + 20σ(θ)."""
    def at(th: float) -> float:
        return loss_fn(1 + 20 * torch.sigmoid(torch.tensor(th, dtype=torch.float64))).item()
    return (at(theta + h) - at(theta - h)) / (2 * h)


# ---------------------------------------------------------------- (a) hand-derived values
def test_temperature_at_init_and_grl_scales_gradient():
    m = GlobalTemperature()
    # τ = 1 + 20·σ(1) = 1 + 20/(1 + e^-1)
    assert m(0.0).item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-7)
    x = torch.tensor([2.0], requires_grad=True)
    (3.0 * GradientReversal.apply(x, -0.5)).sum().backward()
    assert x.grad.item() == -1.5  # d(3x)/dx = 3, times λ = -0.5
    assert GradientReversal.apply(x, -0.5).item() == 2.0  # forward is the identity


def test_lambda_schedule_hand_values():
    # cosine: λ(e) = -1 + (1 + cos(π·min(e,10)/10))/2
    assert ctkd_lambda(0) == 0.0
    assert ctkd_lambda(5) == pytest.approx(-0.5, abs=1e-15)
    assert ctkd_lambda(1) == pytest.approx((math.cos(math.pi / 10) + 1) / 2 - 1, abs=1e-15)
    assert ctkd_lambda(10) == ctkd_lambda(240) == -1.0
    # linear quirk: λ(e) = -min(e, 9)/10, never reaching -1
    assert ctkd_lambda(3, cosine=False) == pytest.approx(-0.3, abs=1e-15)
    assert ctkd_lambda(15, cosine=False) == pytest.approx(-0.9, abs=1e-15)


def test_kd_hand_two_classes():
    zs = torch.zeros(1, 2, dtype=torch.float64)
    zt = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    # T = 1: p_t = (3/4, 1/4), p_s = (1/2, 1/2)
    want1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss_learnable_t(zs, zt, torch.tensor([1.0])).item() == pytest.approx(want1, rel=1e-12)
    # T = 2: p_t = (√3, 1)/(1 + √3); times T² = 4
    a = math.sqrt(3) / (1 + math.sqrt(3))
    want2 = 4 * (a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a)))
    assert kd_loss_learnable_t(zs, zt, torch.tensor([2.0])).item() == pytest.approx(want2, rel=1e-12)


def test_dkd_hand_three_classes():
    zs = torch.zeros(1, 3, dtype=torch.float64)
    zt = torch.tensor([[0.0, math.log(2.0), 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    # T = 1, target 0: p_t = (1/4, 1/2, 1/4) -> b_t = (1/4, 3/4); p_s uniform -> b_s = (1/3, 2/3)
    tckd = 0.25 * math.log(0.25 * 3) + 0.75 * math.log(0.75 * 1.5)
    # non-target: q_t = (2/3, 1/3), q_s = (1/2, 1/2)
    nckd = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    got = dkd_loss_learnable_t(zs, zt, y, 1.5, 2.0, torch.tensor([1.0]))
    assert got.item() == pytest.approx(1.5 * tckd + 2.0 * nckd, rel=1e-12)


# ---------------------------------------------------------------- (b) invariants
def test_identical_logits_zero_loss_and_zero_temperature_gradient():
    zs, _, y = _inputs(3)
    zs = zs.double()
    for fn in (lambda t: kd_loss_learnable_t(zs, zs, t), lambda t: dkd_loss_learnable_t(zs, zs, y, 1.0, 2.0, t)):
        loss, g = _theta_grad(fn, -1.0)
        assert abs(loss) < 1e-12 and abs(g) < 1e-12


def test_tensor_temperature_matches_float_kd():
    zs, zt, _ = _inputs(4)
    for t in (1.0, 4.0, 15.5):
        assert torch.allclose(kd_loss_learnable_t(zs, zt, torch.tensor([t])), kd_loss(zs, zt, t), rtol=1e-6)


def test_gradient_sign_follows_lambda():
    zs, zt, _ = _inputs(5)
    _, g_pos = _theta_grad(lambda t: kd_loss_learnable_t(zs.double(), zt.double(), t), 1.0)
    _, g_neg = _theta_grad(lambda t: kd_loss_learnable_t(zs.double(), zt.double(), t), -0.25)
    assert g_neg == pytest.approx(-0.25 * g_pos, rel=1e-12) and g_pos != 0


# ---------------------------------------------------------------- (c) gradcheck (float64)
def test_gradcheck_kd_and_dkd():
    zs, zt, y = (t.double() if t.is_floating_point() else t for t in _inputs(6, b=3, c=4))
    zs.requires_grad_(True)
    t = torch.tensor([3.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kd_loss_learnable_t(a, zt, b), (zs, t))
    assert torch.autograd.gradcheck(lambda a, b: dkd_loss_learnable_t(a, zt, y, 1.0, 8.0, b), (zs, t))


# ---------------------------------------------------------------- (d) official reference values
# zhengli97/CTKD @ 7d5252241259ae70d38a832371fed9697d15fc14: models/temp_global.py (Global_T, θ = 1),
# distiller_zoo/KD.py (DistillKL, '.cuda()' dropped), distiller_zoo/DKD.py (DKDloss, α=1, β=2),
# train_student.py (CosineDecay(0, -1, 10), LinearDecay(0, -1, 10)), τ = 1 + 20·σ(Global_T(λ)) as in
# helper/loops.py; run in float64 on _inputs(seed) (B=4, C=6) with λ = -0.5.
OFFICIAL = {
    0: dict(kd=6.447473952940993, kd_dtheta=0.023012896760449354, dkd=14.994265156754246),
    1: dict(kd=7.1693558545531815, kd_dtheta=0.04297766208362109, dkd=15.660621415014223),
}
# the official DKD θ-gradient is NaN under PyTorch 2.x; these are λ·(central finite difference, h = 1e-6) of the
# official DKDloss value w.r.t. θ, float64
OFFICIAL_DKD_DTHETA = {0: 0.027920613376863912, 1: 0.11782434716778312}
OFFICIAL_COSINE = {0: 0.0, 1: -0.02447174185242318, 2: -0.09549150281252627, 5: -0.5, 9: -0.9755282581475768,
                   10: -1.0, 11: -1.0, 240: -1.0}
OFFICIAL_LINEAR = {0: -0.0, 1: -0.1, 2: -0.2, 5: -0.5, 9: -0.9, 10: -0.9, 11: -0.9, 240: -0.9}


def test_lambda_matches_official_exactly():
    for e, v in OFFICIAL_COSINE.items():
        assert ctkd_lambda(e) == v
    for e, v in OFFICIAL_LINEAR.items():
        assert ctkd_lambda(e, cosine=False) == v


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_official_values_and_gradients(seed):
    zs, zt, y = (t.double() if t.is_floating_point() else t for t in _inputs(seed))
    ref = OFFICIAL[seed]
    loss, g = _theta_grad(lambda t: kd_loss_learnable_t(zs, zt, t), -0.5)
    assert loss == pytest.approx(ref["kd"], rel=1e-12)
    assert g == pytest.approx(ref["kd_dtheta"], rel=1e-10)
    loss, g = _theta_grad(lambda t: dkd_loss_learnable_t(zs, zt, y, 1.0, 2.0, t), -0.5)
    assert loss == pytest.approx(ref["dkd"], rel=1e-12)
    assert g == pytest.approx(OFFICIAL_DKD_DTHETA[seed], rel=1e-6)
    # float32 path agrees with the float64 reference
    loss32, _ = _theta_grad(lambda t: kd_loss_learnable_t(zs.float(), zt.float(), t), -0.5, torch.float32)
    assert loss32 == pytest.approx(ref["kd"], rel=1e-5)


# ---------------------------------------------------------------- (e) saturated teacher, low precision
def test_large_margin_teacher_finite_gradient_equals_finite_difference():
    zs = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    zt = torch.tensor([[30000.0, 0.0, 1.0], [2.0, 1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    # official DistillKL here: value 134.58882971734238, θ-gradient NaN (PyTorch 2.x); FD of its value: 67.482413669
    kd = lambda t: kd_loss_learnable_t(zs, zt, t)  # noqa: E731
    loss, g = _theta_grad(kd, 1.0)
    assert loss == pytest.approx(134.58882971734238, rel=1e-12)
    assert g == pytest.approx(67.48241366949514, rel=1e-6)
    dkd = lambda t: dkd_loss_learnable_t(zs, zt, y, 1.0, 2.0, t)  # noqa: E731
    _, g = _theta_grad(dkd, 1.0)
    assert math.isfinite(g) and g == pytest.approx(_fd_theta(dkd), rel=1e-6)
    # float32 too: a teacher probability underflows to exactly 0, the gradient stays finite
    m = GlobalTemperature()
    kd_loss_learnable_t(zs.float(), zt.float(), m(-1.0)).backward()
    assert torch.isfinite(m.global_t.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    g = torch.Generator().manual_seed(7)
    zs = torch.randn(16, 100, generator=g) * 3
    zt = torch.randn(16, 100, generator=g) * 3
    zt[:4, 0] += 40.0  # large-margin teacher rows
    y = torch.randint(0, 100, (16,), generator=g)
    t = torch.tensor([4.0])
    for fn in (lambda a, b: kd_loss_learnable_t(a, b, t), lambda a, b: dkd_loss_learnable_t(a, b, y, 1.0, 8.0, t)):
        ref = fn(zs, zt)
        low = fn(zs.to(dtype), zt.to(dtype))
        assert low.dtype == torch.float32 and torch.isfinite(low)
        # the inputs' rounding (bf16: 8 bits) is the only error source
        assert low.item() == pytest.approx(ref.item(), rel=3e-2 if dtype == torch.bfloat16 else 3e-3)
