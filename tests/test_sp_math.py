"""SP (kdx.distill.sp): hand values, invariants, gradcheck, official reference values, low precision."""
import math

import pytest
import torch

from kdx.distill.sp import similarity_matrix, sp_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second, waiting thread only slows

# Reference numbers: megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259,
# mdistiller/distillers/SP.py::sp_loss (HobbitLong/RepDistiller @ b84f547c5db6a35318d4671d7d5c4de74c822403,
# distiller_zoo/SP.py::Similarity, summed, gives the same numbers), torch 2.14.1 CPU float32.
# grad_dot = Σ_i ⟨∂L/∂g_s[i], randn(g_s[i].shape)⟩ with one generator seeded 99.
ONE_S, ONE_T = [(8, 64, 4, 4)], [(8, 128, 4, 4)]  # maps(2, ·), maps(3, ·): mdistiller's single-stage use
TWO_S, TWO_T = [(8, 16, 8, 8), (8, 32, 4, 4)], [(8, 32, 4, 4), (8, 64, 8, 8)]  # maps(2, ·), maps(3, ·)
OFFICIAL_ONE = (0.0007181763066910207, -0.0002200969320256263)
OFFICIAL_TWO = (0.002129171509295702, 0.0005837870412506163)


def maps(seed, shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).relu() for s in shapes]


def loss_and_grad_dot(fn, g_s, g_t):
    g_s = [x.clone().requires_grad_(True) for x in g_s]
    loss = fn(g_s, g_t)
    loss.backward()
    g = torch.Generator().manual_seed(99)
    probe = [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in g_s]
    return loss.item(), sum((x.grad * w).sum() for x, w in zip(g_s, probe)).item()


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_hand_values():
    # B = 2. Student rows e1, e2: G_s = I (rows already unit). Teacher rows e1, e1: G_t = all ones → rows
    # [1, 1]/√2. ‖G_t − G_s‖² = 2·(1/√2 − 1)² + 2·(1/√2)² = 4 − 2√2; / B² → 1 − √2/2.
    eye = t([[1.0, 0.0], [0.0, 1.0]])
    assert sp_loss([eye], [t([[1.0, 0.0], [1.0, 0.0]])]).item() == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-12)
    # Teacher rows [1, 0], [2, 0]: G_t = [[1, 2], [2, 4]] → both rows [1, 2]/√5.
    # ‖·‖² = (1/√5 − 1)² + 4/5 + 1/5 + (2/√5 − 1)² = 4 − 6/√5; / 4 → 1 − 1.5/√5.
    got = sp_loss([eye], [t([[1.0, 0.0], [2.0, 0.0]])]).item()
    assert got == pytest.approx(1 - 1.5 / math.sqrt(5), rel=1e-12)
    # stages are summed; maps are flattened per sample ([2, 1, 1, 2] ≡ [2, 2])
    two = sp_loss([eye, eye.reshape(2, 1, 1, 2)], [t([[1.0, 0.0], [1.0, 0.0]]), t([[1.0, 0.0], [2.0, 0.0]])])
    assert two.item() == pytest.approx(2 - math.sqrt(2) / 2 - 1.5 / math.sqrt(5), rel=1e-12)
    assert two.dim() == 0  # a scalar (the official function returns shape [1])


def test_similarity_matrix_rows_are_unit_and_flattening():
    f = maps(4, [(5, 3, 2, 2)], torch.float64)[0] + 0.01
    g = similarity_matrix(f)
    assert g.shape == (5, 5)
    assert torch.allclose(g.norm(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-12)
    flat = f.reshape(5, -1)
    gram = flat @ flat.T
    assert torch.allclose(g, gram / gram.norm(dim=1, keepdim=True), atol=1e-14)


def test_invariants():
    g_s, g_t = maps(2, ONE_S), maps(3, ONE_T)
    assert sp_loss(g_s, g_s).item() == 0.0
    base = sp_loss(g_s, g_t)
    assert torch.allclose(sp_loss([g_s[0] * 7.5], [g_t[0] * 0.2]), base, rtol=1e-5)  # global scales
    scale = torch.rand(8, 1, 1, 1, generator=torch.Generator().manual_seed(5)) * 10 + 0.1
    assert not torch.allclose(sp_loss([g_s[0] * scale], g_t), base, rtol=1e-2)  # per-sample scales are not
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(sp_loss([g_s[0][perm]], [g_t[0][perm]]), base, rtol=1e-5)  # same sample reordering
    # the 1/B² normalisation: duplicating the batch halves the loss (rows [g, g]/(√2‖g‖): ‖·‖² doubles, B² ×4)
    dup = sp_loss([torch.cat([g_s[0], g_s[0]])], [torch.cat([g_t[0], g_t[0]])])
    assert torch.allclose(dup, base / 2, rtol=1e-5)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64),
         torch.randn(3, 5, generator=g, dtype=torch.float64)]
    t_ = [torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64),
          torch.randn(3, 2, generator=g, dtype=torch.float64)]
    inputs = [x.requires_grad_(True) for x in s + t_]
    assert torch.autograd.gradcheck(lambda a, b, c, d: sp_loss([a, b], [c, d]), inputs)


@pytest.mark.parametrize("shapes,official", [((ONE_S, ONE_T), OFFICIAL_ONE), ((TWO_S, TWO_T), OFFICIAL_TWO)])
def test_official_reference_values(shapes, official):
    loss, grad_dot = loss_and_grad_dot(sp_loss, maps(2, shapes[0]), maps(3, shapes[1]))
    assert loss == pytest.approx(official[0], rel=1e-5)
    assert grad_dot == pytest.approx(official[1], rel=1e-4)


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_inputs_and_autocast(dtype, rtol):
    g_s, g_t = maps(2, ONE_S), maps(3, ONE_T)
    ref = sp_loss(g_s, g_t)
    low = sp_loss([x.to(dtype) for x in g_s], [x.to(dtype) for x in g_t])
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert torch.equal(low, sp_loss([x.to(dtype).float() for x in g_s], [x.to(dtype).float() for x in g_t]))
    assert torch.allclose(low, ref, rtol=rtol)  # observed ≤ 1.3e-3 (bf16), 1e-4 (fp16)
    big = [x * 1000 for x in g_s]  # a float16 Gram matrix would overflow
    assert torch.isfinite(sp_loss([x.to(dtype) for x in big], [x.to(dtype) for x in g_t]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(sp_loss(g_s, g_t), ref)
