"""MLKD (kdx.distill.mlkd): the official KD_ours loss, term by term."""
from __future__ import annotations

import math

import pytest
import torch

from kdx.distill.mlkd import batch_correlation_loss, class_correlation_loss, confidence_factors, mlkd_loss

TEMPS = (4.0, 3.0, 5.0, 2.0, 6.0)


def _inputs(seed: int, b: int, c: int, teacher_scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    sw = torch.randn(b, c, generator=g) * 2
    ss = torch.randn(b, c, generator=g) * 2
    tw = torch.randn(b, c, generator=g) * teacher_scale
    ts = torch.randn(b, c, generator=g) * teacher_scale
    y = torch.randint(0, c, (b,), generator=g)
    return sw, ss, tw, ts, y


# ---------------------------------------------------------------- (a) hand-derived
def test_hand_two_by_two():
    """B = C = 2; student logits 0 in both views; teacher weak rows (ln 3, 0) and (0, 0); teacher strong 0."""
    zero = torch.zeros(2, 2, dtype=torch.float64)
    tw = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    total, terms = mlkd_loss(zero, zero, tw, zero, y)
    # masks: max probs (3/4, 1/2), median 5/8 -> m_B = 1/2; class sums (5/4, 3/4), median 1 -> m_C = 1/2
    m_b = m_c = 0.5

    def q(t):  # teacher row 1 at temperature t: (q, 1 - q); row 2 is uniform, like the student
        return 3 ** (1 / t) / (1 + 3 ** (1 / t))

    def kd(t):  # t² · mean over the 2 rows of KL(teacher ‖ uniform); row 2 contributes 0
        return t * t * 0.5 * (q(t) * math.log(2 * q(t)) + (1 - q(t)) * math.log(2 * (1 - q(t))))

    def cc(t):  # P_sᵀP_s = all 1/2; P_tᵀP_t = [[q²+1/4, q(1-q)+1/4], [., (1-q)²+1/4]]; Σ diff² / C
        a = q(t)
        return ((a * a - 0.25) ** 2 + 2 * (a * (1 - a) - 0.25) ** 2 + ((1 - a) ** 2 - 0.25) ** 2) / 2

    def bc(t):  # P_sP_sᵀ = all 1/2; P_tP_tᵀ = [[q²+(1-q)², 1/2], [1/2, 1/2]]; Σ diff² / B
        a = q(t)
        return (a * a + (1 - a) ** 2 - 0.5) ** 2 / 2

    want = {
        "ce": 0.1 * 2 * math.log(2),
        "kd_weak": sum(0.9 * m_b * kd(t) for t in TEMPS),
        "kd_strong": 0.0,  # strong student = strong teacher
        "kd_weak_repeat": 0.9 * (kd(2.0) + kd(6.0)),
        "cc": sum(0.9 * m_c * cc(t) for t in TEMPS),
        "bc": sum(0.9 * m_b * bc(t) for t in TEMPS),
    }
    assert set(terms) == set(want)
    for k, v in want.items():
        assert terms[k].item() == pytest.approx(v, rel=1e-12, abs=1e-15), k
    assert total.item() == pytest.approx(sum(want.values()), rel=1e-12)


def test_confidence_factors_are_batch_fractions():
    # distinct values: even B -> exactly half at or below the median; odd B -> (B + 1) / 2B
    for b, want in ((8, 0.5), (7, 4 / 7)):
        tw = torch.arange(b, dtype=torch.float32).view(b, 1) * torch.tensor([[1.0, 0.0, 0.0]])
        m_b, _ = confidence_factors(tw)
        assert m_b.item() == pytest.approx(want, abs=1e-7)
    # ties at the median count: confidences (a, a, a, b) with a < b -> median a -> 3/4
    tw = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
    assert confidence_factors(tw)[0].item() == 0.75


# ---------------------------------------------------------------- (b) invariants
def test_student_equal_teacher_leaves_only_ce_and_terms_sum_to_total():
    sw, ss, tw, ts, y = _inputs(2, 6, 5)
    total, terms = mlkd_loss(tw, ts, tw, ts, y)
    for k in ("kd_weak", "kd_strong", "kd_weak_repeat", "cc", "bc"):
        assert abs(terms[k].item()) < 1e-5, k
    total, terms = mlkd_loss(sw, ss, tw, ts, y)
    assert total.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)


def test_strong_view_enters_only_ce_and_three_kd_terms():
    """The official code drops the strong correlation terms: changing the strong logits moves only ce/kd_strong."""
    sw, ss, tw, ts, y = _inputs(3, 6, 5)
    _, a = mlkd_loss(sw, ss, tw, ts, y)
    _, b = mlkd_loss(sw, ss * 3 + 1, tw, ts.flip(0), y)
    for k in ("kd_weak", "kd_weak_repeat", "cc", "bc"):
        assert a[k].item() == b[k].item(), k
    assert a["kd_strong"].item() != b["kd_strong"].item() and a["ce"].item() != b["ce"].item()


def test_correlation_losses_permutation_behaviour():
    sw, _, tw, _, _ = _inputs(4, 6, 5)
    perm = torch.tensor([3, 1, 5, 0, 2, 4])
    # class correlation P^T P is invariant to reordering the batch; batch correlation to reordering the classes
    assert torch.allclose(class_correlation_loss(sw[perm], tw[perm], 4.0), class_correlation_loss(sw, tw, 4.0))
    cperm = torch.tensor([2, 0, 4, 1, 3])
    assert torch.allclose(batch_correlation_loss(sw[:, cperm], tw[:, cperm], 4.0), batch_correlation_loss(sw, tw, 4.0))


# ---------------------------------------------------------------- (c) gradcheck
def test_gradcheck_student_logits():
    sw, ss, tw, ts, y = (t.double() if t.is_floating_point() else t for t in _inputs(5, 4, 3))
    sw.requires_grad_(True)
    ss.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: mlkd_loss(a, b, tw, ts, y)[0], (sw, ss), fast_mode=True)


# ---------------------------------------------------------------- (d) official reference values
# Jin-Ying/Multi-Level-Logit-Distillation @ 5ee473fcf193dfb00a0598b64d0acfe6ad58a482,
# mdistiller/distillers/KD_ours.py, KD_ours.forward_train with cfg.KD = (T 4, CE 0.1, KD 0.9), the student and
# teacher replaced by modules returning _inputs(seed, B, C) (weak, strong) cast to float64; total = the trainer's
# sum(l.mean() for l in losses_dict.values()). Keys: the official losses_dict without "loss_".
OFFICIAL = {
    (0, 8, 10): dict(ce=0.6634577295561312, kd=30.292253667585598, cc=0.0572007753472992, bc=0.021018050821953623,
                     total=31.033930223310985),
    (1, 7, 10): dict(ce=0.6938275512107851, kd=42.12611581115769, cc=0.12124832108186152, bc=0.11146073606371369,
                     total=43.052652419514054),
    (4, 5, 3): dict(ce=0.4630816364113809, kd=34.0850083120899, cc=1.4425390152585547, bc=0.14686826626377358,
                    total=36.137497230023605),
}


@pytest.mark.parametrize("key", list(OFFICIAL))
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_official(key, dtype, rtol):
    ref = OFFICIAL[key]
    sw, ss, tw, ts, y = (t.to(dtype) if t.is_floating_point() else t for t in _inputs(*key))
    total, terms = mlkd_loss(sw, ss, tw, ts, y)
    got = dict(ce=terms["ce"], kd=terms["kd_weak"] + terms["kd_strong"] + terms["kd_weak_repeat"],
               cc=terms["cc"], bc=terms["bc"], total=total)
    for k, v in ref.items():
        assert got[k].item() == pytest.approx(v, rel=rtol), k
    assert total.dtype == dtype


# ---------------------------------------------------------------- (e) low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    sw, ss, tw, ts, y = _inputs(6, 16, 100)
    tw[:4, 0] += 40.0  # large-margin teacher rows
    ts[:4, 0] += 40.0
    ref, _ = mlkd_loss(sw, ss, tw, ts, y)
    low, terms = mlkd_loss(*(t.to(dtype) for t in (sw, ss, tw, ts)), y)
    assert low.dtype == torch.float32 and torch.isfinite(low) and all(torch.isfinite(v) for v in terms.values())
    assert low.item() == pytest.approx(ref.item(), rel=3e-2 if dtype == torch.bfloat16 else 3e-3)
