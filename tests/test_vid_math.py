"""VID (kdx/distill/vid.py): the Gaussian NLL by hand, the regressor and its variance, pooling, invariants,
float64 gradients, the official mdistiller / RepDistiller values, and bf16 autocast."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from kdx.distill.vid import VIDLoss, vid_loss

B = 4


def rnd(seed, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def seeded_vid(c_s, c_t, seed=0, **kw):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return VIDLoss(c_s, c_t, c_t, **kw)


def ones_vid(**kw):
    """VIDLoss(1, 1, 1) with every conv weight 1: the regressor is ReLU(x) on one channel."""
    vid = VIDLoss(1, 1, 1, **kw)
    with torch.no_grad():
        for m in vid.regressor:
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0)
    return vid


# ----------------------------------------------------------------------------- (a) hand-derived values
def test_vid_loss_by_hand():
    # μ − t = 2 everywhere, σ² = 4: ½·(4/4 + log 4) = 0.5 + log 2
    mu, t = torch.full((2, 1, 2, 2), 3.0), torch.full((2, 1, 2, 2), 1.0)
    assert vid_loss(mu, torch.tensor([4.0]), t).item() == pytest.approx(0.5 + math.log(2), rel=1e-6)
    # μ = t, σ² = [1, e] per channel: mean of ½·log σ² over equally many elements per channel = ½·(0 + 1)/2
    z = torch.zeros(3, 2, 2, 2)
    assert vid_loss(z, torch.tensor([1.0, math.e]), z).item() == pytest.approx(0.25, rel=1e-6)


def test_variance_init_by_hand():
    # α = log(exp(5 − 1e-5) − 1) = 4.9932294... ; σ² = log(1 + exp α) + 1e-5 = 5
    vid = VIDLoss(3, 4, 5)
    assert vid.log_scale.shape == (5,)
    assert vid.log_scale[0].item() == pytest.approx(math.log(math.exp(5 - 1e-5) - 1), rel=1e-7)
    assert torch.allclose(vid.pred_var(), torch.full((5,), 5.0), rtol=1e-6)
    vid = VIDLoss(3, 4, 5, init_pred_var=0.5, eps=1e-3)
    assert torch.allclose(vid.pred_var(), torch.full((5,), 0.5), rtol=1e-6)


def test_regressor_layers():
    vid = VIDLoss(3, 7, 5)
    kinds = [type(m) for m in vid.regressor]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Conv2d]
    shapes = [tuple(vid.regressor[i].weight.shape) for i in (0, 2, 4)]
    assert shapes == [(7, 3, 1, 1), (7, 7, 1, 1), (5, 7, 1, 1)]
    assert all(vid.regressor[i].bias is None for i in (0, 2, 4))


def test_pooling_by_hand():
    # student larger: f_s = [[1, −3], [5, 7]] pooled to 1×1 = 2.5, μ = ReLU(2.5) = 2.5, t = 0.5, σ² = 5:
    # ½·((2.5 − 0.5)²/5 + log 5) = 0.4 + ½·log 5
    vid = ones_vid()
    f_s = torch.tensor([1.0, -3.0, 5.0, 7.0]).view(1, 1, 2, 2)
    expected = 0.4 + 0.5 * math.log(5.0)
    assert vid(f_s, torch.tensor([[[[0.5]]]])).item() == pytest.approx(expected, rel=1e-5)
    # teacher larger: μ = ReLU(−1) = 0, t = mean[[1, −3], [5, 7]] = 2.5: ½·(2.5²/5 + log 5) = 0.625 + ½·log 5
    assert vid(torch.tensor([[[[-1.0]]]]), f_s).item() == pytest.approx(0.625 + 0.5 * math.log(5.0), rel=1e-5)


def test_nonsquare_pool_quirk_and_fix():
    # official: the larger map is pooled to h×h (heights only): a 4×6 student against a 2×3 teacher becomes 2×2
    vid = ones_vid()
    f_s, f_t = rnd(1, 2, 1, 4, 6), rnd(2, 2, 1, 2, 3)
    with pytest.raises(RuntimeError):
        vid(f_s, f_t)
    fixed = ones_vid(fix_nonsquare_pool=True)
    pooled = torch.nn.functional.adaptive_avg_pool2d(f_s, (2, 3))
    assert fixed(f_s, f_t).item() == pytest.approx(vid_loss(pooled.relu(), torch.tensor([5.0]), f_t).item(), rel=1e-6)
    # on square maps the fix changes nothing
    a, b = rnd(3, 2, 1, 4, 4), rnd(4, 2, 1, 2, 2)
    assert fixed(a, b).item() == vid(a, b).item()


def test_learn_var_switch():
    frozen, learned = VIDLoss(2, 3, 3), VIDLoss(2, 3, 3, learn_var=True)
    assert "log_scale" not in dict(frozen.named_parameters()) and "log_scale" in dict(frozen.named_buffers())
    assert isinstance(learned.log_scale, nn.Parameter) and "log_scale" in dict(learned.named_parameters())
    assert "log_scale" in frozen.state_dict() and "log_scale" in learned.state_dict()
    learned(rnd(1, 2, 2, 2, 2), rnd(2, 2, 3, 2, 2)).backward()
    assert learned.log_scale.grad is not None and learned.log_scale.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- (b) invariants
def test_invariants():
    mu, t = rnd(1, B, 3, 2, 2), rnd(2, B, 3, 2, 2)
    # constant σ² = c: ½·(MSE/c + log c)
    c = 2.5
    mse = ((mu - t) ** 2).mean().item()
    assert vid_loss(mu, torch.full((3,), c), t).item() == pytest.approx(0.5 * (mse / c + math.log(c)), rel=1e-6)
    # for each channel the NLL is minimised over σ² at σ² = mean squared error of that channel
    per_channel = ((mu - t) ** 2).mean(dim=(0, 2, 3))
    best = vid_loss(mu, per_channel, t).item()
    for scale in (0.8, 1.25):
        assert vid_loss(mu, per_channel * scale, t).item() > best
    # a σ² given as a 4-D tensor is the same as a per-channel vector
    var = torch.tensor([0.5, 1.0, 3.0])
    assert vid_loss(mu, var.view(1, 3, 1, 1), t).item() == vid_loss(mu, var, t).item()


# ----------------------------------------------------------------------------- (c) float64 gradients
def test_gradcheck_float64():
    mu = rnd(1, 2, 3, 2, 2, dtype=torch.float64).requires_grad_()
    t = rnd(2, 2, 3, 2, 2, dtype=torch.float64).requires_grad_()
    var = (0.5 + rnd(3, 3, dtype=torch.float64).abs()).requires_grad_()
    assert torch.autograd.gradcheck(vid_loss, (mu, var, t))
    vid = seeded_vid(2, 3, learn_var=True).double()
    f_s = rnd(4, 2, 2, 4, 4, dtype=torch.float64).requires_grad_()
    f_t = rnd(5, 2, 3, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, _log_scale: vid(x, f_t), (f_s, vid.log_scale))  # perturbed in place


# ----------------------------------------------------------------------------- (d) official reference values
# megvii-research/mdistiller a08d46f10d6102bd6e3f258ca5ac880b020ea259, mdistiller/distillers/VID.py:
# torch.manual_seed(0) then VID.init_vid_modules([C_s], [C_t]) (init_pred_var 5.0, eps 1e-5);
# value = vid_loss(regressors[0], log_scales[0], f_s = randn(s_shape, Generator seed 3),
# f_t = randn(t_shape, Generator seed 4), 1e-5) (torch 2.14.1, CPU).
# HobbitLong/RepDistiller b84f547c5db6a35318d4671d7d5c4de74c822403 distiller_zoo/VID.py VIDLoss(C_s, C_t, C_t) built
# after torch.manual_seed(0) gives the same three numbers.
OFFICIAL = [
    ((B, 3, 4, 4), (B, 5, 4, 4), 0.9125790596008301),  # equal sizes
    ((B, 3, 8, 8), (B, 5, 4, 4), 0.9124168157577515),  # student pooled to 4×4
    ((B, 3, 2, 2), (B, 5, 6, 6), 0.8170548677444458),  # teacher pooled to 2×2
]


@pytest.mark.parametrize("s_shape, t_shape, expected", OFFICIAL)
def test_official_values(s_shape, t_shape, expected):
    vid = seeded_vid(s_shape[1], t_shape[1])
    loss = vid(rnd(3, *s_shape), rnd(4, *t_shape))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_official_values_other_variance():
    # same recipe, init_pred_var 0.5, eps 1e-3, f_s = randn(4,3,4,4; seed 7), f_t = randn(4,5,4,4; seed 8);
    # official log_scales[0][0] = -0.43529558181762695
    vid = seeded_vid(3, 5, init_pred_var=0.5, eps=1e-3)
    assert vid.log_scale[0].item() == pytest.approx(-0.43529558181762695, rel=1e-6)
    assert vid(rnd(7, B, 3, 4, 4), rnd(8, B, 5, 4, 4)).item() == pytest.approx(0.5239152908325195, rel=1e-5)


def test_official_pure_nll():
    # mdistiller VID.py vid_loss's NLL and mean with log_scale = [-1, 0.5, 2]:
    # pred_var = log(1 + exp(log_scale)) + 1e-5, pred_mean = randn(4,3,2,2; seed 5), target = randn(4,3,2,2; seed 6)
    var = torch.log(1.0 + torch.exp(torch.tensor([-1.0, 0.5, 2.0]))) + 1e-5
    assert vid_loss(rnd(5, B, 3, 2, 2), var, rnd(6, B, 3, 2, 2)).item() == pytest.approx(2.013579845428467, rel=1e-5)


# ----------------------------------------------------------------------------- (e) bf16 autocast
def test_bf16_autocast_finite_and_close():
    vid = seeded_vid(32, 64)
    f_s, f_t = rnd(9, 16, 32, 8, 8).relu(), 2.0 * rnd(10, 16, 64, 4, 4).relu()
    ref = vid(f_s, f_t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = vid(f_s, f_t.bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)  # measured 2e-6
