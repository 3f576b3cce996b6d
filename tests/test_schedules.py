"""Schedules: 1-based epoch semantics of docs/methods.md#protocol and closed-form resume."""
import pytest
import torch

from kdx.schedules import cosine, multistep


def lrs(make, epochs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    sched = make(opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])  # the lr used to train this epoch
        opt.step()
        sched.step()
    return out


def test_multistep_first_decayed_epoch_is_151():
    lr = lrs(lambda o: multistep(o, total_epochs=240), 240)
    assert lr[149] == pytest.approx(0.05)  # epoch 150
    assert lr[150] == pytest.approx(0.005)  # epoch 151
    assert lr[180] == pytest.approx(0.0005)  # epoch 181
    assert lr[210] == pytest.approx(0.00005)  # epoch 211
    assert lr[239] == pytest.approx(0.00005)


def test_multistep_fractional_milestones_and_warmup():
    lr = lrs(lambda o: multistep(o, total_epochs=8, milestones=[0.5, 0.75], warmup_epochs=2), 8)
    assert lr == pytest.approx([0.025, 0.05, 0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005])


def test_cosine_endpoints_and_state_roundtrip():
    lr = lrs(lambda o: cosine(o, total_epochs=10, eta_min=0.001), 10)
    assert lr[0] == pytest.approx(0.05)
    assert lr[-1] > 0.001 and lr[-1] < lr[-2]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    s = cosine(opt, total_epochs=10, eta_min=0.001)
    for _ in range(4):
        opt.step()
        s.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    s2 = cosine(opt2, total_epochs=10, eta_min=0.001)
    s2.load_state_dict(s.state_dict())
    opt2.param_groups[0]["lr"] = s2.get_last_lr()[0]
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr[4])
