"""DIST (kdx.distill.dist): hand values, invariants, gradcheck, official values, half-precision inputs."""
import math

import pytest
import torch

from kdx.distill.dist import dist_loss, dist_terms, inter_class_relation, intra_class_relation


def inputs(seed, b, c, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    t = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    return s, t


def realistic(seed, b=16, c=100):
    """Student N(0, 2²); teacher N(-10, 2²) with its label logit at +30 and five classes at -30."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g) * 2.0
    t = torch.randn(b, c, generator=g) * 2.0 - 10.0
    y = torch.randint(0, c, (b,), generator=g)
    t[torch.arange(b), y] = 30.0
    t[:, :5] = -30.0
    return s, t


def test_hand_values_anti_correlated_two_classes():
    # C = 2: a centred probability row is ±d·[1, -1] with d = |p - 1/2|, norm √2·d. Student rows
    # [σ(a), σ(-a)], [σ(-a), σ(a)] (a = 1/τ); teacher rows swapped: each row has ρ = -n²/(n² + 1e-8) with
    # n² = 2·(σ(a) - 1/2)², and the class columns run in opposite orders with the same norms, so
    # L_inter = L_intra = 1 + n²/(n² + 1e-8) and the loss is τ²·(β + γ)·(1 + n²/(n² + 1e-8)).
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = s.flip(1)
    for beta, gamma, tau in [(1.0, 1.0, 1.0), (2.0, 0.5, 2.0)]:
        n2 = 2 * (1 / (1 + math.exp(-1 / tau)) - 0.5) ** 2
        term = 1 + n2 / (n2 + 1e-8)
        assert dist_loss(s, t, beta, gamma, tau).item() == pytest.approx(tau**2 * (beta + gamma) * term, rel=1e-12)
        inter, intra = dist_terms(s, t, tau)
        assert inter.item() == pytest.approx(tau**2 * term, rel=1e-12) == intra.item()


def test_single_sample_intra_term_is_one():
    # B = 1: each class column has one entry, centred to 0, so ρ = 0 / (0 + 1e-8) = 0 and L_intra = 1,
    # even for identical logits (official quirk); L_inter is then only the eps residue.
    z = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    inter, intra = dist_terms(z, z, tau=4.0)
    assert inter.item() < 1e-4 and intra.item() == 16.0


def test_identical_logits_leave_only_the_eps_residue_and_bounds():
    # identical inputs: ρ = n²/(n² + 1e-8), so each term is the mean of 1e-8/(n² + 1e-8) over rows
    # (inter) or columns (intra), n the norm of the centred probability vector: small, not exactly 0.
    s, t = inputs(10, 6, 7)
    y = torch.softmax(s / 4.0, dim=1)
    n2_rows = (y - y.mean(1, keepdim=True)).pow(2).sum(1)
    n2_cols = (y - y.mean(0, keepdim=True)).pow(2).sum(0)
    expected = 16 * ((1e-8 / (n2_rows + 1e-8)).mean() + (1e-8 / (n2_cols + 1e-8)).mean())
    loss = dist_loss(s, s, tau=4.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and loss.item() < 1e-4
    inter, intra = dist_terms(s, t, tau=1.0)
    assert 0.0 < inter.item() < 2.0 and 0.0 < intra.item() < 2.0


def test_shift_invariant_but_not_scale_invariant():
    s, t = inputs(11, 5, 6)
    shift = torch.randn(5, 1, dtype=torch.float64) * 10
    base = dist_loss(s, t, tau=4.0)
    assert dist_loss(s + 3.0, t + shift, tau=4.0).item() == pytest.approx(base.item(), rel=1e-12)
    # softmax comes first: a per-sample scale of the teacher logits changes the probabilities
    assert abs(dist_loss(s, 2.0 * t, tau=4.0).item() - base.item()) > 1e-3


def test_relations_invariant_to_positive_affine_maps_of_probabilities():
    s, t = inputs(12, 5, 6)
    y_s, y_t = torch.softmax(s, 1), torch.softmax(t, 1)
    a_row = torch.rand(5, 1, dtype=torch.float64) + 0.5
    b_row = torch.randn(5, 1, dtype=torch.float64)
    inter = inter_class_relation(y_s, y_t).item()
    assert inter_class_relation(y_s, a_row * y_t + b_row).item() == pytest.approx(inter, rel=1e-7)
    assert inter_class_relation(y_s, -y_t).item() == pytest.approx(2.0 - inter, rel=1e-7)  # ρ → -ρ
    a_col = torch.rand(1, 6, dtype=torch.float64) + 0.5
    intra = intra_class_relation(y_s, y_t).item()
    assert intra_class_relation(y_s, a_col * y_t - 1.0).item() == pytest.approx(intra, rel=1e-7)
    assert inter_class_relation(y_s, a_col * y_t).item() != pytest.approx(inter, rel=1e-4)  # per-row only


def test_gradcheck_float64():
    s, t = inputs(13, 4, 5)
    s.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: dist_loss(a, b, 1.5, 0.5, 4.0), (s, t))


# Official values: hunto/image_classification_sota @ 6f7a70a1dd57fd88413d83909d3d53243068f701 (the
# classification submodule of hunto/DIST_KD), lib/models/losses/dist_kd.py, DIST(beta, gamma, tau)(s, t)
# on the float64 inputs of inputs(0, 4, 6) above (s[0, 0] = -6.931235400702528).
@pytest.mark.parametrize(
    "beta,gamma,tau,expected",
    [(1.0, 1.0, 1.0, 2.830774412687199), (1.0, 1.0, 4.0, 46.81748157707966), (2.0, 0.5, 4.0, 55.541431594816956)],
)
def test_official_values(beta, gamma, tau, expected):
    s, t = inputs(0, 4, 6)
    assert s[0, 0].item() == pytest.approx(-6.931235400702528, rel=1e-15)  # the RNG still gives these inputs
    assert dist_loss(s, t, beta, gamma, tau).item() == pytest.approx(expected, rel=1e-12)
    assert dist_loss(s.float(), t.float(), beta, gamma, tau).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_half_precision_inputs(dtype, rtol, tau):
    s, t = realistic(0)
    out = dist_loss(s.to(dtype), t.to(dtype), tau=tau)
    assert out.dtype == torch.float32 and math.isfinite(out.item())
    # computed in float32 from the rounded inputs, and close to the float32 inputs' value
    assert out.item() == pytest.approx(dist_loss(s.to(dtype).float(), t.to(dtype).float(), tau=tau).item(), rel=1e-6)
    assert out.item() == pytest.approx(dist_loss(s, t, tau=tau).item(), rel=rtol)
