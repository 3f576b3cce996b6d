"""RKD (kdx.distill.rkd): hand values, invariants, gradcheck, official reference values, low precision."""
import math

import pytest
import torch

from kdx.distill.rkd import mean_normalised_distance, pairwise_distance, rkd_angles, rkd_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second, waiting thread only slows

# Reference numbers: megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259,
# mdistiller/distillers/RKD.py::rkd_loss (HobbitLong/RepDistiller @ b84f547c5db6a35318d4671d7d5c4de74c822403,
# distiller_zoo/RKD.py::RKDLoss gives the same default numbers), torch 2.14.1 CPU float32, on
# f_s = feats(6, (8, 64)), f_t = feats(7, (8, 128)); grad_dot = ⟨∂L/∂f_s, randn(8, 64)⟩, generator seeded 99.
OFFICIAL = {
    (False, 1e-12, 25, 50): (0.47896289825439453, 0.13323140144348145),
    (True, 1e-8, 2, 3): (0.07891173660755157, 0.018185600638389587),
}

R2 = math.sqrt(2)


def feats(seed, shape, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).relu()


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def huber(x):  # smooth L1 with β = 1
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# Student: a right triangle (0,0), (1,0), (0,1); teacher: collinear 1-D points 0, 1, 2 (B = 3).
STUDENT, TEACHER = t([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), t([[0.0], [1.0], [2.0]])


def test_hand_value_distance_term():
    # Teacher distances d01, d02, d12 = 1, 2, 1; mean over the 6 off-diagonal entries 8/6 → 3/4, 3/2, 3/4.
    # Student 1, 1, √2; mean (2 + √2)/3 → a, a, √2·a with a = 3/(2 + √2). All |diffs| < 1 → ½x²; each pair
    # appears twice among the 9 entries (diagonal diffs 0) → loss_d = (x01² + x02² + x12²)/9.
    a = 3 / (2 + R2)
    loss_d = ((a - 0.75) ** 2 + (a - 1.5) ** 2 + (R2 * a - 0.75) ** 2) / 9
    assert rkd_loss(STUDENT, TEACHER, distance_weight=1, angle_weight=0).item() == pytest.approx(loss_d, rel=1e-12)
    # squared: teacher 1, 4, 1 (mean 2) → .5, 2, .5; student 1, 1, 2 (mean 4/3) → .75, .75, 1.5;
    # diffs .25, −1.25, 1 → huber .03125, .75, .5 (|x| ≥ 1 is linear) → 2·1.28125/9
    got = rkd_loss(STUDENT, TEACHER, squared=True, distance_weight=1, angle_weight=0).item()
    assert got == pytest.approx(2 * (0.03125 + 0.75 + 0.5) / 9, rel=1e-12)


def test_hand_value_angle_term_and_total():
    # A[i,j,k] = ⟨n(e_j − e_i), n(e_k − e_i)⟩ over 27 triplets; j = i or k = i give 0 on both sides, j = k
    # gives 1 on both. The 6 others: anchor 0: student 0 (orthogonal legs), teacher +1 → huber(−1) = .5 (twice);
    # anchor 1: student 1/√2, teacher −1 → huber(1 + 1/√2) = .5 + 1/√2 (twice); anchor 2: student 1/√2,
    # teacher +1 → ½(1 − 1/√2)² (twice). loss_a = 2·(sum)/27.
    loss_a = 2 * (0.5 + 0.5 + 1 / R2 + 0.5 * (1 - 1 / R2) ** 2) / 27
    assert rkd_loss(STUDENT, TEACHER, distance_weight=0, angle_weight=1).item() == pytest.approx(loss_a, rel=1e-12)
    a = 3 / (2 + R2)
    loss_d = ((a - 0.75) ** 2 + (a - 1.5) ** 2 + (R2 * a - 0.75) ** 2) / 9
    assert rkd_loss(STUDENT, TEACHER).item() == pytest.approx(25 * loss_d + 50 * loss_a, rel=1e-12)
    ang = rkd_angles(STUDENT).reshape(3, 3, 3)
    assert ang[1, 0, 2].item() == pytest.approx(1 / R2, rel=1e-12) and ang[0, 0, 1].item() == 0.0
    assert ang[2, 1, 1].item() == pytest.approx(1.0, rel=1e-12)


def test_eps_clamp_counts_duplicate_samples_in_the_mean():
    # rows 0 and 1 coincide: their squared distance 0 is clamped to 1e-12 → distance 1e-6 > 0, so it is part
    # of the mean: (2·1e-6 + 4·5)/6. The diagonal is exactly 0.
    e = t([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    d = pairwise_distance(e)
    assert d[0, 1].item() == pytest.approx(1e-6, rel=1e-9) and d[0, 0].item() == 0.0 and d[0, 2].item() == 5.0
    assert mean_normalised_distance(e)[0, 2].item() == pytest.approx(5 / ((2e-6 + 20) / 6), rel=1e-12)


def test_invariants():
    f_s, f_t = feats(6, (8, 64)), feats(7, (8, 128))
    assert rkd_loss(f_s, f_s).item() == pytest.approx(0.0, abs=1e-6)
    for squared in (False, True):
        base = rkd_loss(f_s, f_t, squared=squared)
        assert torch.allclose(rkd_loss(f_s * 13.0, f_t * 0.25, squared=squared), base, rtol=1e-5)  # global scales
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(6))
        assert torch.allclose(rkd_loss(f_s[perm], f_t[perm], squared=squared), base, rtol=1e-5)
    scale = torch.rand(8, 1, generator=torch.Generator().manual_seed(5)) * 10 + 0.1
    assert not torch.allclose(rkd_loss(f_s * scale, f_t), rkd_loss(f_s, f_t), rtol=1e-2)
    # maps are flattened per sample
    assert torch.equal(rkd_loss(f_s.reshape(8, 4, 4, 4), f_t), rkd_loss(f_s, f_t))


def test_teacher_gets_no_gradient():
    f_s = feats(6, (8, 64)).requires_grad_(True)
    f_t = feats(7, (8, 128)).requires_grad_(True)
    rkd_loss(f_s, f_t).backward()
    assert f_t.grad is None and f_s.grad is not None


@pytest.mark.parametrize("squared", [False, True])
def test_gradcheck_float64(squared):
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    f_t = torch.randn(4, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: rkd_loss(x, f_t, squared=squared), (f_s,))


@pytest.mark.parametrize("args", list(OFFICIAL))
def test_official_reference_values(args):
    f_s = feats(6, (8, 64)).requires_grad_(True)
    loss = rkd_loss(f_s, feats(7, (8, 128)), *args)
    loss.backward()
    probe = torch.randn(8, 64, generator=torch.Generator().manual_seed(99))
    assert loss.item() == pytest.approx(OFFICIAL[args][0], rel=1e-5)
    assert (f_s.grad * probe).sum().item() == pytest.approx(OFFICIAL[args][1], rel=1e-4)


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_inputs_and_autocast(dtype, rtol):
    f_s, f_t = feats(6, (8, 64)), feats(7, (8, 128))
    ref = rkd_loss(f_s, f_t)
    low = rkd_loss(f_s.to(dtype), f_t.to(dtype))
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert torch.equal(low, rkd_loss(f_s.to(dtype).float(), f_t.to(dtype).float()))
    assert torch.allclose(low, ref, rtol=rtol)  # observed ≤ 1e-3 (bf16), 2e-4 (fp16)
    assert torch.isfinite(rkd_loss((f_s * 1000).to(dtype), f_t.to(dtype)))  # float16 ‖e‖² would overflow
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(rkd_loss(f_s, f_t), ref)
