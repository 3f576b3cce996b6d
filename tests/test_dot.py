"""DOT optimiser (kdx.optimizers): hand-computed steps and the official optimiser's trajectory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdx.optimizers import DOT


def _iteration(opt: DOT, loss_kd: torch.Tensor, loss_ce: torch.Tensor) -> None:
    """The official trainer's order of calls."""
    opt.zero_grad(set_to_none=True)
    loss_kd.backward(retain_graph=True)
    opt.step_kd()
    opt.zero_grad(set_to_none=True)
    loss_ce.backward()
    opt.step()


def test_hand_computed_two_steps():
    """p1 in both losses, p2 only in the KD loss, p3 only in the task loss.

    lr 0.1, momentum 0.5, δ 0.25 (m_task 0.25, m_kd 0.75, m_mid 0.5), wd 0.5; p = (1, 2, 1);
    L_kd = 2·p1 + 4·p2 (g_kd = (2, 4, -)), L_ce = 3·p1 + p3 (g_ce = (3, -, 1)).
    Step 1 (buffers start as the first gradient):
      task p1: d = 3 + 0.5·1 = 3.5, b = 3.5, p1 = 1 - 0.35 = 0.65;  p3: d = 1.5, b = 1.5, p3 = 0.85
      kd   p1: b = 2, p1 = 0.65 - 0.2 = 0.45;  p2: b = 4 (no weight decay on a first KD-only step), p2 = 1.6
    Step 2:
      task p1: d = 3 + 0.225 = 3.225, b = 0.25·3.5 + 3.225 = 4.1 (m_task: p1 also has g_kd), p1 = 0.45 - 0.41 = 0.04
           p3: d = 1 + 0.425 = 1.425, b = 0.5·1.5 + 1.425 = 2.175 (m_mid), p3 = 0.85 - 0.2175 = 0.6325
      kd   p1: b = 0.75·2 + 2 = 3.5 (m_kd, no decay), p1 = 0.04 - 0.35 = -0.31
           p2: d = 4 + 0.5·1.6 = 4.8, b = 0.5·4 + 4.8 = 6.8 (m_mid, decay), p2 = 1.6 - 0.68 = 0.92
    """
    p = [torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in (1.0, 2.0, 1.0)]
    opt = DOT(p, lr=0.1, momentum=0.5, weight_decay=0.5, delta=0.25)
    for _ in range(2):
        _iteration(opt, 2 * p[0] + 4 * p[1], 3 * p[0] + p[2])
    assert [x.item() for x in p] == pytest.approx([-0.31, 0.92, 0.6325], abs=1e-12)
    assert opt.state[p[0]]["momentum_buffer"].item() == pytest.approx(4.1, abs=1e-12)
    assert opt.state[p[1]]["momentum_kd_buffer"].item() == pytest.approx(6.8, abs=1e-12)
    assert all("kd_grad" not in opt.state[x] for x in p)


def test_without_kd_step_is_sgd_with_base_momentum():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(a.detach().clone())
    dot = DOT([a], lr=0.05, momentum=0.9, weight_decay=5e-4, delta=0.075)
    sgd = torch.optim.SGD([b], lr=0.05, momentum=0.9, weight_decay=5e-4)
    for k in range(3):
        for p, opt in ((a, dot), (b, sgd)):
            opt.zero_grad()
            ((p - k) ** 2).sum().backward()
            opt.step()
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_step_kd_takes_the_gradients():
    p = torch.nn.Parameter(torch.ones(2))
    opt = DOT([p], lr=0.1)
    (3 * p).sum().backward()
    opt.step_kd()
    assert p.grad is None and torch.equal(opt.state[p]["kd_grad"], torch.full((2,), 3.0))
    (p * 2).sum().backward()  # without zero_grad the task gradient is still its own
    opt.step()
    # first step: p - lr·(2 + 0) - lr·3
    assert torch.allclose(p, torch.full((2,), 0.5))


# megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259, mdistiller/engine/dot.py,
# DistillationOrientedTrainer(params, lr=0.05, momentum=0.9-0.075, momentum_kd=0.9+0.075, dampening=d,
# weight_decay=5e-4), driven as mdistiller's DOT trainer (_iteration) for 3 steps on _tiny_problem(); the parameters
# after the 3rd step (Linear weight row-major, bias, extra), rounded to 9 decimals, for dampening 0 and 0.1.
OFFICIAL = {
    0.0: [-0.014464702, 0.247277409, -0.43609032, -0.417642415, -0.245217189, 0.146850914, 0.028806787,
          0.403168559, 0.019021399, 0.140407264, -0.165175885, -0.055324294, -0.509537876, -0.378622949,
          -0.126630753, 0.031452645, 0.030699629, 0.074782126],
    0.1: [-0.013732693, 0.247845665, -0.435249329, -0.415308386, -0.244262204, 0.145610854, 0.026371492,
          0.403460592, 0.017332686, 0.141082779, -0.163585618, -0.057950873, -0.509788394, -0.376619667,
          -0.128390715, 0.03125187, 0.033095438, 0.072588086],
}


def _tiny_problem(dampening: float) -> torch.Tensor:
    """Linear(4, 3) student; an extra bias only in the KD loss; 0.1·CE and 0.9·T²·KL at T = 4, 3 batches of 6."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    extra = torch.nn.Parameter(torch.randn(3) * 0.1)
    x, y, zt = torch.randn(3, 6, 4), torch.randint(0, 3, (3, 6)), torch.randn(3, 6, 3) * 3
    params = list(lin.parameters()) + [extra]
    opt = DOT(params, lr=0.05, momentum=0.9, weight_decay=5e-4, delta=0.075, dampening=dampening)
    for k in range(3):
        z = lin(x[k])
        loss_ce = 0.1 * F.cross_entropy(z, y[k])
        log_p = F.log_softmax((z + extra) / 4, dim=1)
        loss_kd = 0.9 * F.kl_div(log_p, F.softmax(zt[k] / 4, dim=1), reduction="batchmean") * 16
        _iteration(opt, loss_kd, loss_ce)
    return torch.cat([p.detach().flatten() for p in params])


@pytest.mark.parametrize("dampening", [0.0, 0.1])
def test_matches_official_three_steps(dampening):
    got = _tiny_problem(dampening)
    assert torch.allclose(got, torch.tensor(OFFICIAL[dampening]), rtol=0, atol=1e-8)
