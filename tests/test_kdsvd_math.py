"""KD-SVD (kdx.distill.kdsvd): hand values, sign handling, gradcheck, official reference values, low precision."""
import math

import pytest
import torch

from kdx.distill.kdsvd import align_rsv, canonical_sign, feature_matrix, kdsvd_loss, truncated_svd

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second, waiting thread only slows

# Reference numbers, torch 2.14.1 CPU (MKL LAPACK) float32; grad_dot = Σ_i ⟨∂L/∂g_s[i], randn(g_s[i].shape)⟩
# with one generator seeded 99.
# - megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259, mdistiller/distillers/KDSVD.py::
#   kdsvd_loss(g_s, g_t, k) on g_s = maps(8, KS), g_t = maps(9, KT), and on maps(10, RS), maps(11, RS);
# - HobbitLong/RepDistiller @ b84f547c5db6a35318d4671d7d5c4de74c822403, distiller_zoo/KDSVD.py::KDSVD(k=1),
#   summed, on maps(10, RS), maps(11, RS) (its [B, H·W, C] layout = kdx's fix_layout=True).
# The loss depends on the teacher's singular-vector signs (see the module docstring): these numbers hold for
# a LAPACK that picks the same signs as this one (test_sign_* below are backend-independent).
KS = [(8, 16, 16, 16), (8, 32, 8, 8), (8, 64, 4, 4)]
KT = [(8, 32, 16, 16), (8, 64, 8, 8), (8, 128, 4, 4)]
RS = [(8, 16, 8, 8), (8, 32, 4, 4), (8, 32, 2, 2)]
OFFICIAL_MDISTILLER = {1: (0.0009290938032791018, 0.00027749690343625844),
                       2: (0.011248579248785973, 0.0048864297568798065)}
# the teacher's gradient for k = 2 (it flows only through the normalised σ_t that scales v_s), probe seed 98
OFFICIAL_MDISTILLER_TEACHER_GRAD_DOT_K2 = -0.00017020065570250154
OFFICIAL_MDISTILLER_RS = (0.003965565003454685, 0.00042691390262916684)
OFFICIAL_REPDISTILLER_RS = (0.09847017377614975, -0.00046119256876409054)


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


def test_feature_matrix_layouts():
    f = torch.arange(12.0).reshape(1, 2, 2, 3)  # C = 2, H = 2, W = 3, value = 6c + 3h + w
    # mdistiller: rows (c, h), columns w
    assert torch.equal(feature_matrix(f), torch.arange(12.0).reshape(1, 4, 3))
    # fixed: rows (h, w), columns c → row r = [r, 6 + r]
    expected = torch.stack([torch.arange(6.0), torch.arange(6.0) + 6], dim=1)[None]
    assert torch.equal(feature_matrix(f, fix_layout=True), expected)


def test_truncated_svd_hand_value():
    # x = diag(3, 4): σ = (4, 3), right vectors ±e2, ±e1. n = 1: σ/‖σ‖ = [1]; n = 2: (4, 3)/5.
    x = t([[[3.0, 0.0], [0.0, 4.0]]])
    s1, v1 = truncated_svd(x, 1)
    assert torch.allclose(s1, t([[1.0]])) and torch.allclose(v1.abs(), t([[[0.0], [1.0]]]))
    s2, v2 = truncated_svd(x, 2)
    assert torch.allclose(s2, t([[0.8, 0.6]])) and torch.allclose(v2.abs(), t([[[0.0, 1.0], [1.0, 0.0]]]))
    assert truncated_svd(x, 5)[1].shape == (1, 2, 2)  # n larger than the rank keeps all columns


def test_align_rsv_and_canonical_sign_hand_values():
    a = torch.eye(3, dtype=torch.float64)[None]  # student columns e1, e2, e3
    b = t([[[0.0, 0.0], [-0.6, -1.0], [0.8, 0.0]]])  # teacher columns (0, −.6, .8), (0, −1, 0)
    # column 1: |cos| = (0, .6, .8) → e3 with sign +; column 2: |cos| = (0, 1, 0) → e2 with sign − → −e2
    assert torch.equal(align_rsv(a, b), t([[[0.0, 0.0], [0.0, -1.0], [1.0, 0.0]]]))
    assert torch.equal(align_rsv(-a, b), align_rsv(a, b))  # the student's own signs do not matter
    # largest-magnitude entry made positive: (0, −.6, .8) stays, (0, −1, 0) flips
    assert torch.equal(canonical_sign(b), t([[[0.0, 0.0], [-0.6, 1.0], [0.8, 0.0]]]))


def hand_loss(rho):
    # B = 1, maps 1×1×2 (C = H = 1, W = 2), mdistiller layout → 1×2 matrices, one singular vector each, k = 1
    # (normalised σ_t = 1). Stage 1: student = teacher = [1, 0] → v = σ1·(1, 0) on both sides after alignment.
    # Stage 2: student [0, 1] → aligned to the teacher σ2·(2, 1)/√5 → σ2·(0, 1). With ρ = σ1·σ2 the squared
    # differences (v2[w] − v1[w'])² are, student [[1, 0], [2 − 2ρ, 1]], teacher
    # [[9/5 − 4ρ/√5, 4/5], [6/5 − 2ρ/√5, 1/5]]; loss = Σ (e^{−a/8} − e^{−b/8})² / B.
    r5 = math.sqrt(5)
    a = [1.0, 0.0, 2 - 2 * rho, 1.0]
    b = [9 / 5 - 4 * rho / r5, 4 / 5, 6 / 5 - 2 * rho / r5, 1 / 5]
    return sum((math.exp(-x / 8) - math.exp(-y / 8)) ** 2 for x, y in zip(a, b))


HAND_S = [t([[[[1.0, 0.0]]]]), t([[[[0.0, 1.0]]]])]
HAND_T = [t([[[[1.0, 0.0]]]]), t([[[[2.0, 1.0]]]])]


def test_hand_value():
    # σ_i: the sign this backend gives the teacher's right singular vector at stage i
    sigma = [torch.sign(torch.linalg.svd(feature_matrix(f))[2][0, 0, 0]).item() for f in HAND_T]
    assert kdsvd_loss(HAND_S, HAND_T).item() == pytest.approx(hand_loss(sigma[0] * sigma[1]), rel=1e-12)
    assert kdsvd_loss(HAND_S, HAND_T, fix_sign=True).item() == pytest.approx(hand_loss(1.0), rel=1e-12)
    assert hand_loss(1.0) != pytest.approx(hand_loss(-1.0), rel=1e-3)  # the teacher's relative sign matters
    assert kdsvd_loss(HAND_S[:1], HAND_T[:1]) == 0  # one stage: no pair, loss 0


def small_pair():
    return maps(8, [(2, 4, 4, 4), (2, 8, 2, 2)], torch.float64), maps(9, [(2, 8, 4, 4), (2, 4, 2, 2)], torch.float64)


def flipping_svd(monkeypatch, flip_calls):
    """Patch torch.linalg.svd to negate every (u_j, v_j) pair on the given call numbers: still a valid SVD."""
    original, calls = torch.linalg.svd, []

    def svd(x, full_matrices=True):
        u, s, vh = original(x, full_matrices=full_matrices)
        calls.append(None)
        return (-u, s, -vh) if len(calls) - 1 in flip_calls else (u, s, vh)

    monkeypatch.setattr(torch.linalg, "svd", svd)


@pytest.mark.parametrize("fix_sign", [False, True])
def test_sign_of_the_student_vectors_never_matters(monkeypatch, fix_sign):
    g_s, g_t = small_pair()
    base = kdsvd_loss(g_s, g_t, fix_sign=fix_sign)
    flipping_svd(monkeypatch, {1, 3})  # calls per stage: teacher, then student
    assert torch.allclose(kdsvd_loss(g_s, g_t, fix_sign=fix_sign), base, rtol=1e-12)


def test_sign_of_one_teacher_stage_changes_the_official_loss_but_not_fix_sign(monkeypatch):
    g_s, g_t = small_pair()
    base, fixed = kdsvd_loss(g_s, g_t), kdsvd_loss(g_s, g_t, fix_sign=True)
    flipping_svd(monkeypatch, {0})  # the teacher's stage-1 vectors only
    assert not torch.allclose(kdsvd_loss(g_s, g_t), base, rtol=1e-3)
    flipping_svd(monkeypatch, {0})
    assert torch.allclose(kdsvd_loss(g_s, g_t, fix_sign=True), fixed, rtol=1e-12)


@pytest.mark.parametrize("fix_layout", [False, True])
def test_zero_for_identical_features(fix_layout):
    g = maps(8, RS, torch.float64)
    assert kdsvd_loss(g, g, fix_layout=fix_layout).item() == pytest.approx(0.0, abs=1e-20)
    assert kdsvd_loss(g, g, k=2, fix_layout=fix_layout).item() == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("k,fix_layout", [(1, False), (2, False), (1, True), (2, True)])
def test_gradcheck_float64(k, fix_layout):
    gen = torch.Generator().manual_seed(0)
    # default layout: [B, C·H, W] matrices, the widths must agree; fixed: [B, H·W, C], the channels must agree
    t_shapes = [(2, 2, 3, 3), (2, 3, 2, 2)] if fix_layout else [(2, 3, 3, 3), (2, 2, 2, 2)]
    s = [torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(True)
         for shape in [(2, 2, 3, 3), (2, 3, 2, 2)]]
    t_ = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in t_shapes]
    assert torch.autograd.gradcheck(lambda a, b: kdsvd_loss([a, b], t_, k=k, fix_layout=fix_layout), s)


@pytest.mark.parametrize("k", [1, 2])
def test_official_reference_values_mdistiller(k):
    loss, grad_dot = loss_and_grad_dot(lambda s, t_: kdsvd_loss(s, t_, k), maps(8, KS), maps(9, KT))
    assert loss == pytest.approx(OFFICIAL_MDISTILLER[k][0], rel=1e-5)
    assert grad_dot == pytest.approx(OFFICIAL_MDISTILLER[k][1], rel=1e-4)


def test_official_teacher_gradient():
    g_t = [x.requires_grad_(True) for x in maps(9, KT)]
    kdsvd_loss(maps(8, KS), g_t, k=2).backward()
    gen = torch.Generator().manual_seed(98)
    grad_dot = sum((x.grad * torch.randn(x.shape, generator=gen)).sum() for x in g_t).item()
    assert grad_dot == pytest.approx(OFFICIAL_MDISTILLER_TEACHER_GRAD_DOT_K2, rel=1e-4)


@pytest.mark.parametrize("fix_layout,official", [(False, OFFICIAL_MDISTILLER_RS), (True, OFFICIAL_REPDISTILLER_RS)])
def test_official_reference_values_layouts(fix_layout, official):
    def fn(s, t_):
        return kdsvd_loss(s, t_, fix_layout=fix_layout)

    loss, grad_dot = loss_and_grad_dot(fn, maps(10, RS), maps(11, RS))
    assert loss == pytest.approx(official[0], rel=1e-5)
    assert grad_dot == pytest.approx(official[1], rel=1e-4)


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_inputs_and_autocast(dtype, rtol):
    g_s, g_t = maps(8, KS), maps(9, KT)
    ref = kdsvd_loss(g_s, g_t)
    low = kdsvd_loss([x.to(dtype) for x in g_s], [x.to(dtype) for x in g_t])
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert torch.equal(low, kdsvd_loss([x.to(dtype).float() for x in g_s], [x.to(dtype).float() for x in g_t]))
    assert torch.allclose(low, ref, rtol=rtol)  # observed ≤ 1e-3 (bf16), 2e-4 (fp16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(kdsvd_loss(g_s, g_t), ref)
