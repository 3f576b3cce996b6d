"""KD and DKD math against hand-derived values and invariants (docs/methods.md#kd, #dkd)."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdx.distill.base import Batch, ModelOutput, warmup_factor
from kdx.distill.dkd import DKD
from kdx.distill.kd import KD
from kdx.distill.losses import dkd_loss, dkd_terms, kd_loss


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_kd_hand_values_t1_and_t2():
    z_s, z_t = [0.0, 0.0], [math.log(3.0), 0.0]
    # T = 1: p_t = [3/4, 1/4], p_s = [1/2, 1/2]
    expected1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(t([z_s]), t([z_t]), 1.0).item() == pytest.approx(expected1, rel=1e-12)
    # T = 2: p_t = [√3, 1]/(√3 + 1); times T² = 4
    r3 = math.sqrt(3.0)
    p_t = [r3 / (r3 + 1), 1 / (r3 + 1)]
    expected2 = 4.0 * kl(p_t, [0.5, 0.5])
    assert kd_loss(t([z_s]), t([z_t]), 2.0).item() == pytest.approx(expected2, rel=1e-12)
    assert expected2 == pytest.approx(0.145363, abs=1e-6)  # 4·[p ln 2p + q ln 2q], p = √3/(√3+1)


def test_kd_is_batchmean_and_zero_for_equal_logits():
    a = torch.randn(5, 7, dtype=torch.float64)
    assert kd_loss(a, a.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-12)
    b = torch.randn(5, 7, dtype=torch.float64)
    per_sample = [kd_loss(a[i : i + 1], b[i : i + 1], 3.0).item() for i in range(5)]
    assert kd_loss(a, b, 3.0).item() == pytest.approx(sum(per_sample) / 5, rel=1e-12)


def test_dkd_hand_values():
    # 3 classes, target 0, T = 1, student uniform
    z_s = [0.0, 0.0, 0.0]
    z_t = [0.0, math.log(3.0), 0.0]  # p_t = [0.2, 0.6, 0.2]
    tckd, nckd = dkd_terms(t([z_s]), t([z_t]), torch.tensor([0]), 1.0)
    assert tckd.item() == pytest.approx(kl([0.2, 0.8], [1 / 3, 2 / 3]), rel=1e-10)
    assert tckd.item() == pytest.approx(0.2 * math.log(0.6) + 0.8 * math.log(1.2), rel=1e-10)
    # non-target: teacher [0.75, 0.25], student [0.5, 0.5]
    assert nckd.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-10)
    total = dkd_loss(t([z_s]), t([z_t]), torch.tensor([0]), alpha=1.0, beta=8.0, temperature=1.0)
    assert total.item() == pytest.approx(tckd.item() + 8.0 * nckd.item(), rel=1e-12)


def test_dkd_temperature_scaling_hand_value():
    z_s, z_t, T = [1.0, 0.0, -1.0, 2.0], [3.0, 1.0, 0.0, -2.0], 2.0
    target = 1
    ps, pt = softmax([v / T for v in z_s]), softmax([v / T for v in z_t])
    b_s, b_t = [ps[target], 1 - ps[target]], [pt[target], 1 - pt[target]]
    nt = [c for c in range(4) if c != target]
    qs = softmax([z_s[c] / T for c in nt])
    qt = softmax([z_t[c] / T for c in nt])
    tckd, nckd = dkd_terms(t([z_s]), t([z_t]), torch.tensor([target]), T)
    assert tckd.item() == pytest.approx(T * T * kl(b_t, b_s), rel=1e-10)
    assert nckd.item() == pytest.approx(T * T * kl(qt, qs), rel=1e-10)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_decomposes_kd_per_sample(T):
    """KD = TCKD + (1 − p_t,y)·NCKD per sample, at the same T (the DKD paper's identity)."""
    torch.manual_seed(0)
    z_s, z_t = torch.randn(6, 10, dtype=torch.float64) * 3, torch.randn(6, 10, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (6,))
    for i in range(6):
        s, te, yi = z_s[i : i + 1], z_t[i : i + 1], y[i : i + 1]
        tckd, nckd = dkd_terms(s, te, yi, T)
        p_ty = F.softmax(te / T, dim=1)[0, yi].item()
        assert kd_loss(s, te, T).item() == pytest.approx(tckd.item() + (1 - p_ty) * nckd.item(), rel=1e-9)


def test_dkd_certain_teacher_is_finite():
    z_s = torch.zeros(2, 5)
    z_t = torch.tensor([[200.0, 0, 0, 0, 0], [0, 300.0, 0, 0, 0]])  # softmax saturates to exactly 1
    tckd, nckd = dkd_terms(z_s, z_t, torch.tensor([0, 1]), 1.0)
    assert torch.isfinite(tckd) and torch.isfinite(nckd)


def test_gradcheck_float64():
    torch.manual_seed(1)
    z_s = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(3, 6, dtype=torch.float64)
    y = torch.tensor([0, 3, 5])
    assert torch.autograd.gradcheck(lambda s: kd_loss(s, z_t, 4.0), (z_s,))
    assert torch.autograd.gradcheck(lambda s: dkd_loss(s, z_t, y, 1.0, 8.0, 4.0), (z_s,))


def test_warmup_factor_is_one_based():
    assert warmup_factor(1, 20) == pytest.approx(1 / 20)
    assert warmup_factor(20, 20) == 1.0 and warmup_factor(35, 20) == 1.0
    assert warmup_factor(3, 0) == 1.0


def _batch(y):
    return Batch(torch.zeros(len(y), 3, 4, 4), y, torch.arange(len(y)))


def test_strategies_weight_their_terms():
    torch.manual_seed(2)
    z_s, z_t = torch.randn(4, 10), torch.randn(4, 10)
    y = torch.randint(0, 10, (4,))
    kd = KD(temperature=4.0, w_ce=0.1, w_kd=0.9)(ModelOutput(z_s), ModelOutput(z_t), _batch(y), 1)
    assert kd["ce"].item() == pytest.approx(0.1 * F.cross_entropy(z_s, y).item(), rel=1e-6)
    assert kd["kd"].item() == pytest.approx(0.9 * kd_loss(z_s, z_t, 4.0).item(), rel=1e-6)
    dkd = DKD(alpha=1.0, beta=8.0, temperature=4.0, w_ce=1.0, warmup=20)
    tckd, nckd = dkd_terms(z_s, z_t, y, 4.0)
    e5 = dkd(ModelOutput(z_s), ModelOutput(z_t), _batch(y), 5)
    assert e5["tckd"].item() == pytest.approx(5 / 20 * tckd.item(), rel=1e-6)
    assert e5["nckd"].item() == pytest.approx(5 / 20 * 8.0 * nckd.item(), rel=1e-6)
    e40 = dkd(ModelOutput(z_s), ModelOutput(z_t), _batch(y), 40)
    assert e40["nckd"].item() == pytest.approx(8.0 * nckd.item(), rel=1e-6)


def test_teacher_transform_is_applied_before_the_loss():
    z_t = torch.randn(2, 5)
    s = KD(teacher_transform=lambda logits, target: logits * 2)
    assert torch.equal(s.transform_teacher(z_t, torch.tensor([0, 1])), z_t * 2)
    assert torch.equal(KD().transform_teacher(z_t, torch.tensor([0, 1])), z_t)
