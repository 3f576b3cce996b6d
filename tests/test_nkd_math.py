"""NKD (kdx.distill.nkd): hand values, special cases, gradcheck, official values, half-precision inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdx.distill.losses import kd_loss
from kdx.distill.nkd import nkd_loss, nkd_per_sample


def inputs(seed, b, c, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    t = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, c, (b,), generator=g)
    return s, t, y


def t64(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_hand_value_uniform_student():
    # y = 0, z_s = 0 → log s_y = -ln 3; z_t = [ln 2, 0, 0] → t = [1/2, 1/4, 1/4]: L_t = ½·ln 3.
    # Non-target logits: teacher [0, 0], student [0, 0] → both uniform on 2 classes at any T:
    # Σ T̂·log Ŝ = -ln 2 → L_nt = γ·T²·ln 2.
    loss = nkd_loss(t64([[0.0, 0.0, 0.0]]), t64([[math.log(2), 0.0, 0.0]]), torch.tensor([0]), 2.0, 1.5)
    assert loss.item() == pytest.approx(0.5 * math.log(3) + 1.5 * 4 * math.log(2), rel=1e-14)


def test_hand_value_target_column_is_removed():
    # y = 0, z_s = [5, 0, ln 3], z_t = [0, ln 3, 0], T = 1, γ = 1.5.
    # t = [1, 3, 1]/5 → t_y = 0.2; log s_y = 5 - ln(e⁵ + 4) → L_t = -0.2·(5 - ln(e⁵ + 4)).
    # Non-target: teacher [ln 3, 0] → [3/4, 1/4]; student [0, ln 3] → [1/4, 3/4]:
    # L_nt = -γ·(¾·ln ¼ + ¼·ln ¾). Keeping the target column (SDD's mask) would give another value.
    s, t, y = t64([[5.0, 0.0, math.log(3)]]), t64([[0.0, math.log(3), 0.0]]), torch.tensor([0])
    l_t = -0.2 * (5 - math.log(math.exp(5) + 4))
    l_nt = -1.5 * (0.75 * math.log(0.25) + 0.25 * math.log(0.75))
    assert nkd_loss(s, t, y, 1.0, 1.5).item() == pytest.approx(l_t + l_nt, rel=1e-14)
    kept = nkd_per_sample(s, t, y, 1.0, 1.5, drop_target=False)
    assert abs(kept.item() - (l_t + l_nt)) > 0.1


def test_non_target_term_is_kd_plus_teacher_entropy():
    # L_nt = γ·[KD(ẑ_s, ẑ_t, T) + T²·H(softmax(ẑ_t/T))] on the logits with the target column removed
    s, t, y = inputs(20, 5, 7)
    T, gamma = 3.0, 3.5
    keep = torch.ones_like(s, dtype=torch.bool).scatter_(1, y[:, None], False)
    s_nt, t_nt = s[keep].reshape(5, 6), t[keep].reshape(5, 6)
    q = F.softmax(t_nt / T, dim=1)
    entropy = -(q * q.log()).sum(1).mean()
    l_t = -(F.softmax(t, 1).gather(1, y[:, None]) * F.log_softmax(s, 1).gather(1, y[:, None])).mean()
    expected = l_t + gamma * (kd_loss(s_nt, t_nt, T) + T**2 * entropy)
    assert nkd_loss(s, t, y, T, gamma).item() == pytest.approx(expected.item(), rel=1e-12)
    assert nkd_loss(s, t, y, T, gamma).item() > 50  # a cross-entropy: large values are normal


def test_special_cases():
    s, t, y = inputs(21, 6, 5)
    # γ = 0 and a certain teacher (t_y = 1 in float64): NKD is the cross-entropy with the labels
    certain = torch.zeros_like(t).scatter_(1, y[:, None], 100.0)
    assert nkd_loss(s, certain, y, 3.0, 0.0).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-12)
    # soft / one-hot 2-D targets are reduced to their argmax
    soft = F.one_hot(y, 5).double() * 0.6 + 0.08
    assert nkd_loss(s, t, soft, 3.0, 3.5).item() == pytest.approx(nkd_loss(s, t, y, 3.0, 3.5).item(), rel=1e-15)
    # drop_target=False (SDD's copy): the second term is the full cross-entropy at T
    full = -(F.softmax(t / 2.0, 1) * F.log_softmax(s / 2.0, 1)).sum(1)
    l_t = -(F.softmax(t, 1).gather(1, y[:, None]) * F.log_softmax(s, 1).gather(1, y[:, None])).squeeze(1)
    kept = nkd_per_sample(s, t, y, 2.0, 1.5, drop_target=False)
    assert torch.allclose(kept, l_t + 1.5 * 4.0 * full, rtol=1e-12, atol=0)


def test_target_probability_is_detached():
    s, t, y = inputs(22, 4, 5)
    t.requires_grad_(True)
    nkd_loss(s, t, y, 3.0, 0.0).backward()  # γ = 0: only the target term, whose t_y is detached
    assert t.grad.abs().max().item() == 0.0
    t.grad = None
    nkd_loss(s, t, y, 3.0, 1.5).backward()  # the non-target teacher distribution is not detached
    assert t.grad.abs().max().item() > 0.0


def test_gradcheck_float64():
    s, t, y = inputs(23, 3, 5)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: nkd_loss(a, t, y, 3.0, 3.5), (s,))


# Official values: yzd-v/cls_KD @ 1e5d48f36957ee460d39d7ebc592c6cc7f8f3d66 (branch 1.0),
# mmcls/models/dis_losses/nkd.py, NKDLoss(name, use_this, temp, gamma)(s, t, y), on the float64 inputs of
# inputs(2, 4, 6) above (s[0, 0] = -2.35813153487977, y = [2, 0, 0, 3]).
@pytest.mark.parametrize("temp,gamma,expected", [(1.0, 1.5, 3.9586961629607553), (3.0, 3.5, 58.026040138919406)])
def test_official_values(temp, gamma, expected):
    s, t, y = inputs(2, 4, 6)
    assert s[0, 0].item() == pytest.approx(-2.35813153487977, rel=1e-15) and y.tolist() == [2, 0, 0, 3]
    assert nkd_loss(s, t, y, temp, gamma).item() == pytest.approx(expected, rel=1e-12)
    assert nkd_loss(s.float(), t.float(), y, temp, gamma).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
@pytest.mark.parametrize("temp,gamma", [(1.0, 1.5), (3.0, 3.5)])
def test_half_precision_inputs(dtype, rtol, temp, gamma):
    # student N(0, 2²); large-margin teacher: label logit +30, five classes -30, the rest N(-10, 2²)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 100, generator=g) * 2.0
    t = torch.randn(16, 100, generator=g) * 2.0 - 10.0
    y = torch.randint(0, 100, (16,), generator=g)
    t[torch.arange(16), y] = 30.0
    t[:, :5] = -30.0
    out = nkd_loss(s.to(dtype), t.to(dtype), y, temp, gamma)
    assert out.dtype == torch.float32 and math.isfinite(out.item())
    ref = nkd_loss(s.to(dtype).float(), t.to(dtype).float(), y, temp, gamma)
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    assert out.item() == pytest.approx(nkd_loss(s, t, y, temp, gamma).item(), rel=rtol)
