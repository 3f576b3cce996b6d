"""PKT (kdx.distill.pkt): hand values, invariants, gradcheck, official reference values, low precision."""
import math

import pytest
import torch

from kdx.distill.pkt import pkt_loss, pkt_similarity

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second, waiting thread only slows

# Reference numbers: megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259,
# mdistiller/distillers/PKT.py::pkt_loss (HobbitLong/RepDistiller @ b84f547c5db6a35318d4671d7d5c4de74c822403,
# distiller_zoo/PKT.py::PKT gives the same numbers), torch 2.14.1 CPU float32, on f_s = feats(4, (8, 64)),
# f_t = feats(5, (8, 128)); grad_dot = ⟨∂L/∂f_s, randn(8, 64)⟩ with a generator seeded 99.
OFFICIAL = (0.0002396167255938053, 0.00013977850903756917)


def feats(seed, shape, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).relu()


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_hand_values_without_eps():
    # eps = 0. Student rows e1, e2: cos = I → K = (I + 1)/2 = [[1, .5], [.5, 1]] → P_s = [[2/3, 1/3], [1/3, 2/3]].
    # Teacher rows e1, e1: cos = 1 → P_t = all 1/2. Each row: .5·log(.5/(2/3)) + .5·log(.5/(1/3)) = .5·log(1.125);
    # two rows, mean over 4 entries → log(1.125)/4.
    f_s, f_t = t([[1.0, 0.0], [0.0, 1.0]]), t([[1.0, 0.0], [1.0, 0.0]])
    assert pkt_loss(f_s, f_t, eps=0.0).item() == pytest.approx(math.log(1.125) / 4, rel=1e-12)
    assert pkt_loss(f_s, f_t).item() == pytest.approx(math.log(1.125) / 4, rel=1e-5)  # default eps 1e-7
    # A zero student row with eps = 0: 0/0 = NaN → set to 0 (official rule), so its cosines are 0:
    # K_s = [[.5, .5], [.5, 1]] → P_s rows [.5, .5], [1/3, 2/3]; only row 1 differs from P_t → log(1.125)/8.
    zero_row = pkt_loss(t([[0.0, 0.0], [1.0, 0.0]]), f_t, eps=0.0)
    assert zero_row.item() == pytest.approx(math.log(1.125) / 8, rel=1e-12)


def test_hand_value_eps_in_the_norm_and_in_the_log():
    # Student rows e1, −e1, teacher rows e1, e1, eps = 1e-7. n_s = ±e1/(1 + eps), so cos_s = ±c with
    # c = 1/(1 + eps)²: K_s = [[(1 + c)/2, (1 − c)/2], [(1 − c)/2, (1 + c)/2]], rows sum to 1 → P_s = K_s.
    # The teacher: c on all entries → P_t = 1/2 everywhere. Loss = (2/4)·.5·[log((.5 + eps)/(P_d + eps))
    # + log((.5 + eps)/(P_o + eps))] with P_d = (1 + c)/2, P_o = (1 − c)/2 ≈ 1e-7 (hence a large value).
    eps = 1e-7
    c = 1 / (1 + eps) ** 2
    p_d, p_o = (1 + c) / 2, (1 - c) / 2
    expected = 0.25 * (math.log((0.5 + eps) / (p_d + eps)) + math.log((0.5 + eps) / (p_o + eps)))
    got = pkt_loss(t([[1.0, 0.0], [-1.0, 0.0]]), t([[1.0, 0.0], [1.0, 0.0]]), eps=eps)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert expected > 3.0


def test_similarity_rows_are_probability_distributions():
    f = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = pkt_similarity(f)
    assert torch.all(p >= 0)
    assert torch.allclose(p.sum(dim=1), torch.ones(6, dtype=torch.float64), atol=1e-12)
    assert torch.equal(p.argmax(dim=1), torch.arange(6))  # a sample is its own nearest neighbour (cos = 1)


def test_invariants():
    f_s, f_t = feats(4, (8, 64)), feats(5, (8, 128))
    assert pkt_loss(f_s, f_s).item() == 0.0
    base = pkt_loss(f_s, f_t)
    scale = torch.rand(8, 1, generator=torch.Generator().manual_seed(5)) * 10 + 0.1
    assert torch.allclose(pkt_loss(f_s * scale, f_t), base, rtol=1e-4)  # cosine: per-sample scale invariant
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(pkt_loss(f_s[perm], f_t[perm]), base, rtol=1e-5)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    f_t = torch.randn(4, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(pkt_loss, (f_s, f_t))


def test_official_reference_values():
    f_s = feats(4, (8, 64)).requires_grad_(True)
    loss = pkt_loss(f_s, feats(5, (8, 128)))
    loss.backward()
    probe = torch.randn(8, 64, generator=torch.Generator().manual_seed(99))
    assert loss.item() == pytest.approx(OFFICIAL[0], rel=1e-5)
    assert (f_s.grad * probe).sum().item() == pytest.approx(OFFICIAL[1], rel=1e-4)


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_inputs_and_autocast(dtype, rtol):
    f_s, f_t = feats(4, (8, 64)), feats(5, (8, 128))
    ref = pkt_loss(f_s, f_t)
    low = pkt_loss(f_s.to(dtype), f_t.to(dtype))
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert torch.equal(low, pkt_loss(f_s.to(dtype).float(), f_t.to(dtype).float()))
    assert torch.allclose(low, ref, rtol=rtol)  # observed ≤ 3.8e-3 (bf16), 2e-4 (fp16)
    assert torch.isfinite(pkt_loss((f_s * 1000).to(dtype), f_t.to(dtype)))  # a float16 Σf² would overflow
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(pkt_loss(f_s, f_t), ref)
