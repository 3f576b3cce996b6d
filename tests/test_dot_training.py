"""DOT through the real config (distill=kd optim=dot): the split steps reach the optimiser, one Lightning step equals
the optimiser driven by hand in the official order, and the official CIFAR-100 recipes compose."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, compose_cfg
from kdx.config import validate
from kdx.distill.kd import KD
from kdx.distill.losses import kd_loss
from kdx.optimizers import DOT
from kdx.run import build_job


def _fit(tmp_path, teacher_ckpt, extra: list[str], monkeypatch):
    """distill=kd optim=dot on the tiny job: build, record each step's inputs, fit; (job, initial weights, steps)."""
    cfg = compose_cfg(TINY + ["distill=kd", "optim=dot", f"teacher.ckpt={teacher_ckpt}"] + extra, tmp_path)
    job = build_job(cfg)
    init = copy.deepcopy(job.module.student.state_dict())
    steps: list = []
    original = KD.loss_terms

    def recording(self, student, teacher, batch, epoch):
        lr = job.trainer.optimizers[0].param_groups[0]["lr"]
        steps.append(dict(x=batch.x.clone(), y=batch.y.clone(), zt=teacher.logits.detach().clone(), lr=lr))
        return original(self, student, teacher, batch, epoch)

    monkeypatch.setattr(KD, "loss_terms", recording)
    job.trainer.fit(job.module, datamodule=job.datamodule)
    return job, init, steps


def test_kd_with_dot_end_to_end(tmp_path, teacher_ckpt, monkeypatch, one_thread):
    job, init, steps = _fit(tmp_path, teacher_ckpt, [], monkeypatch)
    assert job.method == "kd+dot" and not job.module.automatic_optimization and len(steps) == 4
    opt = job.trainer.optimizers[0]
    assert isinstance(opt, DOT) and opt.defaults["delta"] == 0.075
    for name, p in job.module.student.named_parameters():
        state = opt.state[p]
        # the KD gradients went through step_kd (their own buffer), the CE gradients through step
        assert "momentum_kd_buffer" in state and "momentum_buffer" in state, name
        assert "kd_grad" not in state and not torch.equal(p.detach(), init[name]), name


def test_one_lightning_step_equals_dot_by_hand(tmp_path, teacher_ckpt, monkeypatch, one_thread):
    """One training batch through Lightning (manual optimisation, DistillModule._split_step) against the same batch
    driven by hand in mdistiller's DOT trainer order: zero_grad; (0.9·KD).backward; step_kd; zero_grad;
    (0.1·CE).backward; step. The student starts from the same weights; the teacher's logits are the recorded ones."""
    job, init, steps = _fit(tmp_path, teacher_ckpt, ["trainer.limit_train_batches=1", "trainer.deterministic=true"],
                            monkeypatch)
    assert len(steps) == 1 and steps[0]["lr"] == 0.05
    s = steps[0]
    net = copy.deepcopy(job.module.student)
    net.load_state_dict(init)
    net.train()
    opt = DOT(list(net.parameters()), lr=0.05, momentum=0.9, weight_decay=5e-4, delta=0.075)
    z = net(s["x"])
    loss_kd, loss_ce = 0.9 * kd_loss(z, s["zt"], 4.0), 0.1 * F.cross_entropy(z, s["y"])
    opt.zero_grad(set_to_none=True)
    loss_kd.backward(retain_graph=True)
    opt.step_kd()
    opt.zero_grad(set_to_none=True)
    loss_ce.backward()
    opt.step()
    lightning = job.trainer.optimizers[0]
    for (name, p), q in zip(job.module.student.named_parameters(), net.parameters()):
        assert not torch.equal(q.detach(), init[name]), name
        assert torch.equal(p.detach(), q.detach()), name  # bit-identical on CPU
        assert torch.allclose(lightning.state[p]["momentum_kd_buffer"], opt.state[q]["momentum_kd_buffer"], atol=1e-7)
        assert torch.allclose(lightning.state[p]["momentum_buffer"], opt.state[q]["momentum_buffer"], atol=1e-7)
    # and it is not what plain SGD (one summed loss) would have done: the two gradients were stepped apart
    sgd_net = copy.deepcopy(net)
    sgd_net.load_state_dict(init)
    sgd = torch.optim.SGD(sgd_net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    z = sgd_net(s["x"])
    (0.9 * kd_loss(z, s["zt"], 4.0) + 0.1 * F.cross_entropy(z, s["y"])).backward()
    sgd.step()
    assert any(not torch.allclose(p, q, rtol=0, atol=1e-7) for p, q in zip(net.parameters(), sgd_net.parameters()))


# megvii-research/mdistiller @ a08d46f configs/cifar100/dot/<pair>.yaml: (student, teacher, lr); README's DOT table
DOT_RECIPES = {"res32x4_res8x4": ("resnet8x4", "resnet32x4", 0.05, 75.12),
               "vgg13_vgg8": ("vgg8", "vgg13", 0.05, 73.77),
               "res32x4_shuv2": ("ShuffleV2", "resnet32x4", 0.01, 75.55)}


@pytest.mark.parametrize("pair", list(DOT_RECIPES))
def test_dot_experiments_are_the_official_configs(tmp_path, pair):
    student, teacher, lr, paper = DOT_RECIPES[pair]
    cfg = compose_cfg([f"experiment=cifar100/dot/{pair}"], tmp_path)
    validate(cfg)
    assert cfg.method == "kd+dot" and (cfg.model.name, cfg.teacher.model.name) == (student, teacher)
    assert cfg.optim._target_ == "kdx.optimizers.DOT"
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.delta, cfg.optim.weight_decay) == (lr, 0.9, 0.075, 5e-4)
    assert cfg.distill._target_ == "kdx.distill.kd.KD"
    assert (cfg.distill.temperature, cfg.distill.w_ce, cfg.distill.w_kd) == (4.0, 0.1, 0.9)
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, list(cfg.scheduler.milestones)) == (240, 64, [150, 180, 210])
    assert cfg.paper["kd+dot"] == paper
