"""Logit standardization (kdx.distill.ls): hand values, invariants, gradcheck, official values, half inputs."""
import math

import pytest
import torch

from kdx.distill.losses import dkd_terms, kd_loss
from kdx.distill.ls import standardize


def inputs(seed, b, c, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    t = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, c, (b,), generator=g)
    return s, t, y


def test_hand_values():
    # [1, 2, 3, 2]: mean 2, deviations (-1, 0, 1, 0), unbiased var 2/3 → (z - 2)/(√(2/3) + 1e-7).
    # [0, 0, 0, 4]: mean 1, deviations (-1, -1, -1, 3), unbiased var 12/3 = 4 → (z - 1)/(2 + 1e-7).
    z = torch.tensor([[1.0, 2.0, 3.0, 2.0], [0.0, 0.0, 0.0, 4.0]], dtype=torch.float64)
    out = standardize(z)
    sd = math.sqrt(2 / 3)
    assert out[0].tolist() == pytest.approx([-1 / (sd + 1e-7), 0.0, 1 / (sd + 1e-7), 0.0], rel=1e-14)
    assert out[1].tolist() == pytest.approx([-1 / (2 + 1e-7)] * 3 + [3 / (2 + 1e-7)], rel=1e-14)


def test_eps_is_added_to_the_std():
    # [0, 2e-7]: deviations ±1e-7, unbiased std √2·1e-7 → ±1e-7/(1e-7 + √2·1e-7) = ±(√2 - 1)
    out = standardize(torch.tensor([[0.0, 2e-7]], dtype=torch.float64))
    assert out[0].tolist() == pytest.approx([1 - math.sqrt(2), math.sqrt(2) - 1], rel=1e-9)
    assert standardize(torch.full((2, 5), 3.0)).abs().max().item() == 0.0  # constant rows → 0
    assert standardize(torch.tensor([[0.0, 2e-7]], dtype=torch.float64), eps=0.0)[0, 1].item() == pytest.approx(
        1 / math.sqrt(2), rel=1e-9
    )


def test_rows_have_zero_mean_and_unit_unbiased_std():
    s, _, _ = inputs(10, 6, 9)
    out = standardize(s)
    assert out.shape == s.shape
    assert out.mean(dim=1).abs().max().item() < 1e-12
    assert out.std(dim=1).tolist() == pytest.approx([1.0] * 6, abs=1e-6)  # std/(std + 1e-7)
    assert out.std(dim=1, unbiased=False).tolist() != pytest.approx([1.0] * 6, abs=1e-3)  # not the biased std


def test_invariant_to_per_row_affine_maps():
    s, _, _ = inputs(11, 5, 8)
    a = torch.rand(5, 1, dtype=torch.float64) * 4 + 0.25
    b = torch.randn(5, 1, dtype=torch.float64) * 10
    assert torch.allclose(standardize(a * s + b), standardize(s), rtol=0, atol=1e-6)
    assert torch.allclose(standardize(-a * s + b), -standardize(s), rtol=0, atol=1e-6)
    # hence KD on standardized logits ignores each side's logit scale
    _, t, _ = inputs(12, 5, 8)
    assert kd_loss(standardize(a * s), standardize(t + b), 2.0).item() == pytest.approx(
        kd_loss(standardize(s), standardize(t), 2.0).item(), rel=1e-5
    )


def test_gradcheck_float64():
    s, _, _ = inputs(13, 3, 5)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(standardize, (s,))


# Official values: sunshangquan/logit-standardization-KD @ f6e5aa5172bad618e801163c3385322eea673754,
# mdistiller/distillers/KD.py normalize, kd_loss(s, t, 2.0, logit_stand=True) and
# mdistiller/distillers/DKD.py dkd_loss(s, t, y, 1.0, 8.0, 2.0, logit_stand=True), on the float64
# inputs of inputs(1, 4, 6) above (s[0, 0] = -0.9338686625700963, y = [1, 0, 5, 3]).
NORMALIZE_S_ROW0 = [0.6124348417793488, -1.2376489939114101, -1.3115061201019729,
                    0.6680985491159653, 0.8813356425115904, 0.38728608060647957]
NORMALIZE_T_ROW1 = [0.8302418735701713, 0.6222959743933953, 1.1333287094713131,
                    -1.25220814571312, -0.9682126200833225, -0.36544579163843693]


def test_official_values():
    s, t, y = inputs(1, 4, 6)
    assert s[0, 0].item() == pytest.approx(-0.9338686625700963, rel=1e-15) and y.tolist() == [1, 0, 5, 3]
    assert standardize(s)[0].tolist() == pytest.approx(NORMALIZE_S_ROW0, rel=1e-12)
    assert standardize(t)[1].tolist() == pytest.approx(NORMALIZE_T_ROW1, rel=1e-12)
    assert standardize(s.float())[0].tolist() == pytest.approx(NORMALIZE_S_ROW0, rel=1e-5, abs=1e-6)
    # the official compositions: KD+LS and DKD+LS (standardize, then /T, then the DKD -1000 mask)
    assert kd_loss(standardize(s), standardize(t), 2.0).item() == pytest.approx(1.023065984153396, rel=1e-12)
    tckd, nckd = dkd_terms(standardize(s), standardize(t), y, 2.0)
    assert (tckd + 8.0 * nckd).item() == pytest.approx(9.42676041857212, rel=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
def test_half_precision_inputs(dtype, atol):
    # realistic logits: a large-margin teacher (label logit +30, five classes at -30, the rest N(-10, 2²))
    g = torch.Generator().manual_seed(0)
    t = torch.randn(16, 100, generator=g) * 2.0 - 10.0
    y = torch.randint(0, 100, (16,), generator=g)
    t[torch.arange(16), y] = 30.0
    t[:, :5] = -30.0
    out = standardize(t.to(dtype))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, standardize(t.to(dtype).float()))  # computed in float32
    assert torch.allclose(out, standardize(t), rtol=0, atol=atol)  # values up to ~6.5
