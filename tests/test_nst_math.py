"""NST (kdx.distill.nst): hand values, invariants, gradcheck, official reference values, low precision."""
import pytest
import torch

from kdx.distill.nst import nst_loss, poly_kernel

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second, waiting thread only slows

# Reference numbers: megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259,
# mdistiller/distillers/NST.py::nst_loss (HobbitLong/RepDistiller @ b84f547c5db6a35318d4671d7d5c4de74c822403,
# distiller_zoo/NST.py::NSTLoss, summed, gives the same numbers), torch 2.14.1 CPU float32, on
# g_s = maps(0, S_MAPS), g_t = maps(1, T_MAPS); grad_dot = Σ_i ⟨∂L/∂g_s[i], randn(g_s[i].shape)⟩ with one
# generator seeded 99. The official kernel broadcasts and sums, kdx uses a matmul: equal up to rounding.
S_MAPS = [(8, 16, 8, 8), (8, 32, 4, 4)]  # stage 1: student larger (pooled), stage 2: teacher larger (pooled)
T_MAPS = [(8, 32, 4, 4), (8, 64, 8, 8)]
OFFICIAL = (0.32843178510665894, -0.010013082064688206)
# the teacher's gradient (official: only the teacher–teacher term is detached), probe generator seeded 98
OFFICIAL_TEACHER_GRAD_DOT = -0.011806655675172806


def maps(seed, shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).relu() for s in shapes]


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_hand_values():
    # Maps 1×2, channels normalised over the 2 positions; k(x, y) = ⟨x, y⟩².
    # One student channel [1, 0], one teacher channel [1, 1]/√2: k_ss = 1, k_tt = 1, k_st = 1/2 → 1 + 1 − 1 = 1.
    assert nst_loss([t([[[[1.0, 0.0]]]])], [t([[[[1.0, 1.0]]]])]).item() == pytest.approx(1.0, rel=1e-12)
    # Sample A: student channels [1, 0], [0, 1], teacher [1, 0]: mean k_ss = (1 + 0 + 0 + 1)/4 = 1/2, k_tt = 1,
    # mean k_st = (1 + 0)/2 = 1/2 → 1/2. Sample B: student [1, 0], [1, 0], same teacher: 1 + 1 − 2 = 0.
    # Every term is also a mean over the batch → (1/2 + 0)/2.
    f_s = t([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[1.0, 0.0]], [[1.0, 0.0]]]])
    f_t = t([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])
    assert nst_loss([f_s[:1]], [f_t[:1]]).item() == pytest.approx(0.5, rel=1e-12)
    assert nst_loss([f_s], [f_t]).item() == pytest.approx(0.25, rel=1e-12)
    # stages are summed
    assert nst_loss([f_s, f_s[:1]], [f_t, f_t[:1]]).item() == pytest.approx(0.75, rel=1e-12)


def test_hand_value_with_pooling():
    # Student 4×4: top-left block [[0, 2], [2, 0]], top-right block ones → pooled to the teacher's 2×2:
    # [[1, 1], [0, 0]] → [1, 1, 0, 0]/√2. Teacher [[1, 1], [1, 0]] → [1, 1, 1, 0]/√3; k_st = (2/√6)² = 2/3
    # → 1 + 1 − 4/3 = 2/3, either way round.
    f_s = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    f_s[0, 0, :2, :2] = t([[0.0, 2.0], [2.0, 0.0]])
    f_s[0, 0, :2, 2:] = 1.0
    f_t = t([[[[1.0, 1.0], [1.0, 0.0]]]])
    assert nst_loss([f_s], [f_t]).item() == pytest.approx(2 / 3, rel=1e-12)
    assert nst_loss([f_t], [f_s]).item() == pytest.approx(2 / 3, rel=1e-12)


def test_poly_kernel_layout():
    a = t([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # [1, C_a = 3, N = 2]
    b = t([[[3.0, 1.0], [0.0, 1.0]]])  # [1, C_b = 2, N = 2]
    # k[0, i, j] = ⟨b_i, a_j⟩²: row i = 0: (3, 2, 4)² ; row i = 1: (0, 2, 1)²
    assert torch.equal(poly_kernel(a, b), t([[[9.0, 4.0, 16.0], [0.0, 4.0, 1.0]]]))


def test_invariants():
    g_s, g_t = maps(0, S_MAPS), maps(1, T_MAPS)
    assert nst_loss(g_s, g_s).item() == pytest.approx(0.0, abs=1e-6)
    d_s = maps(0, S_MAPS, torch.float64)
    assert nst_loss(d_s, d_s).item() == pytest.approx(0.0, abs=1e-14)
    base = nst_loss(g_s, g_t)
    gen = torch.Generator().manual_seed(5)
    scale = torch.rand(8, 16, 1, 1, generator=gen) * 10 + 0.1  # per (sample, channel): removed by the norm
    perm = torch.randperm(16, generator=gen)  # the channel sets are unordered
    assert torch.allclose(nst_loss([g_s[0] * scale, g_s[1]], g_t), base, rtol=1e-5)
    assert torch.allclose(nst_loss([g_s[0][:, perm], g_s[1]], g_t), base, rtol=1e-5)
    assert not torch.allclose(nst_loss([g_s[0].flip(3), g_s[1]], g_t), base, rtol=1e-3)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    s = [torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) + 0.1,
         torch.rand(2, 2, 2, 2, generator=g, dtype=torch.float64) + 0.1]
    t_ = [torch.rand(2, 5, 2, 2, generator=g, dtype=torch.float64) + 0.1,
          torch.rand(2, 4, 4, 4, generator=g, dtype=torch.float64) + 0.1]
    inputs = [x.requires_grad_(True) for x in s]  # the teacher–teacher term is detached (official)
    assert torch.autograd.gradcheck(lambda a, b: nst_loss([a, b], t_), inputs)


def test_official_reference_values():
    g_s = [x.requires_grad_(True) for x in maps(0, S_MAPS)]
    loss = nst_loss(g_s, maps(1, T_MAPS))
    loss.backward()
    gen = torch.Generator().manual_seed(99)
    grad_dot = sum((x.grad * torch.randn(x.shape, generator=gen)).sum() for x in g_s).item()
    assert loss.item() == pytest.approx(OFFICIAL[0], rel=1e-5)
    assert grad_dot == pytest.approx(OFFICIAL[1], rel=1e-4)


def test_official_teacher_gradient():
    g_t = [x.requires_grad_(True) for x in maps(1, T_MAPS)]
    nst_loss(maps(0, S_MAPS), g_t).backward()
    gen = torch.Generator().manual_seed(98)
    grad_dot = sum((x.grad * torch.randn(x.shape, generator=gen)).sum() for x in g_t).item()
    assert grad_dot == pytest.approx(OFFICIAL_TEACHER_GRAD_DOT, rel=1e-4)


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_inputs_and_autocast(dtype, rtol):
    g_s, g_t = maps(0, S_MAPS), maps(1, T_MAPS)
    ref = nst_loss(g_s, g_t)
    low = nst_loss([x.to(dtype) for x in g_s], [x.to(dtype) for x in g_t])
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert torch.equal(low, nst_loss([x.to(dtype).float() for x in g_s], [x.to(dtype).float() for x in g_t]))
    assert torch.allclose(low, ref, rtol=rtol)  # observed ≤ 1e-4 (bf16), 1e-5 (fp16)
    big = [x * 1000 for x in g_s]  # large activations stay finite
    assert torch.isfinite(nst_loss([x.to(dtype) for x in big], [x.to(dtype) for x in g_t]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(nst_loss(g_s, g_t), ref)
