"""AT (kdx.distill.at): hand values, invariants, gradcheck, official reference values, low precision."""
import math

import pytest
import torch

from kdx.distill.at import at_loss, attention_map, match_height

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second, waiting thread only slows

# Reference numbers: megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259,
# mdistiller/distillers/AT.py::at_loss (HobbitLong/RepDistiller @ b84f547c5db6a35318d4671d7d5c4de74c822403,
# distiller_zoo/AT.py::Attention, summed, gives the same numbers), torch 2.14.1 CPU float32, on
# g_s = maps(0, S_MAPS), g_t = maps(1, T_MAPS); grad_dot = Σ_i ⟨∂L/∂g_s[i], randn(g_s[i].shape)⟩ with one
# generator seeded 99 (see loss_and_grad_dot).
S_MAPS = [(8, 16, 8, 8), (8, 32, 4, 4)]  # stage 1: student larger (pooled), stage 2: teacher larger (pooled)
T_MAPS = [(8, 32, 4, 4), (8, 64, 8, 8)]
OFFICIAL = {2: (0.022343602031469345, 0.003097591456025839), 3: (0.040050677955150604, 0.0068116569891572)}


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


# For unit vectors a, b over N positions, mean((a − b)²) = (2 − 2·cos(a, b)) / N, used below.

def test_hand_value_single_stage():
    # student one channel [[1, 2]]: mean_c f² = [1, 4] → a_s = [1, 4]/√17;
    # teacher channels [[2, 0]], [[0, 0]]: mean_c f² = [2, 0] → a_t = [1, 0]; cos = 1/√17, N = 2
    f_s = t([[[[1.0, 2.0]]]])
    f_t = t([[[[2.0, 0.0]], [[0.0, 0.0]]]])
    assert at_loss([f_s], [f_t]).item() == pytest.approx(1 - 1 / math.sqrt(17), rel=1e-12)
    # p = 1: mean_c f = [1, 2] → [1, 2]/√5 and [1, 0] → [1, 0]; cos = 1/√5
    assert at_loss([f_s], [f_t], p=1).item() == pytest.approx(1 - 1 / math.sqrt(5), rel=1e-12)


def pooled_pair():
    # student 4×4: top-left 2×2 block [[0, 2], [2, 0]] (average 1), top-right block all 1 (average 1), rest 0.
    # Official: pool first → [[1, 1], [0, 0]] → f² → a_s = [1, 1, 0, 0]/√2 (pow-then-pool would give
    # [2, 1, 0, 0]/√5). Teacher 2×2 [[1, 0], [0, 0]] → a_t = [1, 0, 0, 0]; cos = 1/√2, N = 4.
    f_s = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    f_s[0, 0, :2, :2] = t([[0.0, 2.0], [2.0, 0.0]])
    f_s[0, 0, :2, 2:] = 1.0
    f_t = t([[[[1.0, 0.0], [0.0, 0.0]]]])
    return f_s, f_t


def test_hand_value_pools_the_larger_map_before_the_power():
    f_s, f_t = pooled_pair()
    expected = (2 - math.sqrt(2)) / 4
    assert at_loss([f_s], [f_t]).item() == pytest.approx(expected, rel=1e-12)
    assert at_loss([f_t], [f_s]).item() == pytest.approx(expected, rel=1e-12)  # the teacher side is pooled too
    pooled_s, same_t = match_height(f_s, f_t)
    assert torch.equal(pooled_s, t([[[[1.0, 1.0], [0.0, 0.0]]]])) and same_t is f_t


def test_stages_are_summed():
    f_s1 = t([[[[1.0, 2.0]]]])
    f_t1 = t([[[[2.0, 0.0]], [[0.0, 0.0]]]])
    f_s2, f_t2 = pooled_pair()
    total = at_loss([f_s1, f_s2], [f_t1, f_t2]).item()
    assert total == pytest.approx(1 - 1 / math.sqrt(17) + (2 - math.sqrt(2)) / 4, rel=1e-12)


def test_attention_map_rows_are_unit_vectors():
    f = maps(3, [(4, 5, 3, 3)], torch.float64)[0]
    a = attention_map(f)
    assert a.shape == (4, 9)
    assert torch.allclose(a.norm(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-12)


def test_zero_for_identical_and_invariant_to_positive_per_sample_scale_and_channel_order():
    g_s, g_t = maps(0, S_MAPS), maps(1, T_MAPS)
    assert at_loss(g_s, g_s).item() == 0.0
    base = at_loss(g_s, g_t)
    scale = torch.rand(8, 1, 1, 1, generator=torch.Generator().manual_seed(5)) * 10 + 0.1
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(at_loss([g_s[0] * scale, g_s[1]], g_t), base, rtol=1e-5)
    assert torch.allclose(at_loss([g_s[0][:, perm], g_s[1]], g_t), base, rtol=1e-5)
    assert not torch.allclose(at_loss([g_s[0].flip(3), g_s[1]], g_t), base, rtol=1e-3)  # positions do matter


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    # stage 1: student 4×4 pooled to the teacher's 2×2; stage 2: the teacher's 4×4 pooled to 2×2
    s = [torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) + 0.1,
         torch.rand(2, 2, 2, 2, generator=g, dtype=torch.float64) + 0.1]
    t_ = [torch.rand(2, 5, 2, 2, generator=g, dtype=torch.float64) + 0.1,
          torch.rand(2, 4, 4, 4, generator=g, dtype=torch.float64) + 0.1]
    inputs = [x.requires_grad_(True) for x in s + t_]
    for p in (2, 3):
        assert torch.autograd.gradcheck(lambda a, b, c, d: at_loss([a, b], [c, d], p=p), inputs)


@pytest.mark.parametrize("p", [2, 3])
def test_official_reference_values(p):
    loss, grad_dot = loss_and_grad_dot(lambda s, t_: at_loss(s, t_, p), maps(0, S_MAPS), maps(1, T_MAPS))
    assert loss == pytest.approx(OFFICIAL[p][0], rel=1e-5)
    assert grad_dot == pytest.approx(OFFICIAL[p][1], rel=1e-4)


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_inputs_and_autocast(dtype, rtol):
    g_s, g_t = maps(0, S_MAPS), maps(1, T_MAPS)
    ref = at_loss(g_s, g_t)
    low = at_loss([x.to(dtype) for x in g_s], [x.to(dtype) for x in g_t])
    assert low.dtype == torch.float32 and torch.isfinite(low)
    # computed in float32 from the rounded inputs; within rtol of float32 (observed ≤ 1e-3 for bf16)
    assert torch.equal(low, at_loss([x.to(dtype).float() for x in g_s], [x.to(dtype).float() for x in g_t]))
    assert torch.allclose(low, ref, rtol=rtol)
    big = [x * 1000 for x in g_s]  # fp16 would overflow in f², float32 does not
    assert torch.isfinite(at_loss([x.to(dtype) for x in big], [x.to(dtype) for x in g_t]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(at_loss(g_s, g_t), ref)  # autocast is off inside
