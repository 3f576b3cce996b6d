"""AFD (docs/methods.md#afd) against a hand computation, float64 gradients, RTK's reduction to AFD,
and distill=afd / distill=rtk through the real config (CPU, and DDP on CPU)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import TINY, compose_cfg, run_cli
from kdx.config import validate
from kdx.distill.afd import AFD, value_diffs
from kdx.distill.rtk import RTK, keep_top_k, resolve_top_k
from kdx.run import build_job as build

T_SHAPES = [(3, 4, 4), (5, 2, 2)]
S_SHAPES = [(2, 4, 4), (3, 2, 2), (2, 1, 1)]  # the last student map is smaller than both teacher maps
B, D = 4, 3


def feats(shapes, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, *s, generator=g, dtype=torch.float64).requires_grad_(requires_grad) for s in shapes]


def randomise(module, seed=0):
    """Non-trivial BN affine parameters (defaults are 1/0), float64."""
    g = torch.Generator().manual_seed(seed)
    module.double()
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=torch.float64))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
    return module


# ----------------------------------------------------------------------------- hand computation (numpy loops)
def np_linear_bn(x, layer, relu):
    """x: rows × nin. Linear, then BatchNorm1d in training mode (biased batch variance, eps 1e-5)."""
    w = layer.linear.weight.detach().numpy()
    b = layer.linear.bias.detach().numpy()
    z = np.array([[sum(w[o, i] * row[i] for i in range(len(row))) + b[o] for o in range(w.shape[0])] for row in x])
    mean = z.mean(axis=0)
    var = ((z - mean) ** 2).mean(axis=0)
    out = (z - mean) / np.sqrt(var + layer.bn.eps) * layer.bn.weight.detach().numpy() + layer.bn.bias.detach().numpy()
    return np.maximum(out, 0) if relu else out


def np_adaptive_pool(m, out_h, out_w):
    """Adaptive average pooling of an H×W map by its definition (bins floor(i·H/o) .. ceil((i+1)·H/o))."""
    h, w = m.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        r0, r1 = (i * h) // out_h, math.ceil((i + 1) * h / out_h)
        for j in range(out_w):
            c0, c1 = (j * w) // out_w, math.ceil((j + 1) * w / out_w)
            out[i, j] = m[r0:r1, c0:c1].mean()
    return out


def np_value(f_b, size=None):
    """normalize_L2(pool(mean_c f²)) of one sample f_b: C×H×W."""
    e = (f_b**2).mean(axis=0)
    if size is not None:
        e = np_adaptive_pool(e, *size)
    v = e.flatten()
    return v / max(np.sqrt((v**2).sum()), 1e-12)


def np_diffs(ft, fs, pool="teacher"):
    """D[b, s, t] by loops."""
    out = np.zeros((B, len(fs), len(ft)))
    for b in range(B):
        for t, f_t in enumerate(ft):
            ht, wt = f_t.shape[2:]
            for s, f_s in enumerate(fs):
                hs, ws = f_s.shape[2:]
                if pool == "teacher":
                    v_t, v_s = np_value(f_t[b]), np_value(f_s[b], (ht, wt))
                else:
                    size = (min(hs, ht), min(ws, wt))
                    v_t, v_s = np_value(f_t[b], size), np_value(f_s[b], size)
                out[b, s, t] = ((v_s - v_t) ** 2).mean()
    return out


def np_afd(module, ft, fs):
    ft = [f.detach().numpy() for f in ft]
    fs = [f.detach().numpy() for f in fs]
    n_t, n_s = len(ft), len(fs)
    q = np.stack([np_linear_bn(f.mean(axis=(2, 3)), module.query[t], relu=False) for t, f in enumerate(ft)], 1)
    k = np.stack([np_linear_bn(f.mean(axis=(2, 3)), module.key[s], relu=True) for s, f in enumerate(fs)], 1)
    kb = np_linear_bn(k.reshape(B * n_s, D), module.bilinear, relu=False).reshape(B, n_s, n_t, D)
    p_t, p_s = module.p_t.detach().numpy(), module.p_s.detach().numpy()
    att = np.zeros((B, n_t, n_s))
    for b in range(B):
        for t in range(n_t):
            logit = np.array([(kb[b, s, t] @ q[b, t] + p_t[t] @ p_s[s]) / math.sqrt(D) for s in range(n_s)])
            e = np.exp(logit - logit.max())
            att[b, t] = e / e.sum()
    diffs = np_diffs(ft, fs)
    loss = sum(np.mean([sum(att[b, t, s] * diffs[b, s, t] for s in range(n_s)) for b in range(B)]) for t in range(n_t))
    return att, diffs, loss


def test_afd_matches_hand_computation():
    torch.manual_seed(0)
    afd = randomise(AFD(T_SHAPES, S_SHAPES, qk_dim=D)).train()
    ft, fs = feats(T_SHAPES, 1), feats(S_SHAPES, 2)
    att, diffs, loss = np_afd(afd, ft, fs)
    np.testing.assert_allclose(afd.attention(ft, fs).detach().numpy(), att, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(value_diffs(ft, fs).numpy(), diffs, rtol=1e-10, atol=1e-14)
    assert float(afd(ft, fs).detach()) == pytest.approx(loss, rel=1e-10)
    # invariants: attention rows are distributions; values are unit vectors, so D ∈ [0, 4/HW]
    assert torch.allclose(afd.attention(ft, fs).sum(2), torch.ones(B, len(T_SHAPES), dtype=torch.float64))
    assert (diffs >= 0).all() and diffs.max() > 0
    # identical student and teacher energy maps give zero value difference
    same = value_diffs([ft[0]], [ft[0].detach().clone()])
    assert float(same.abs().max()) < 1e-15


def test_afd_parameters_and_shapes():
    afd = AFD([(2, 32, 32, 32)] * 2 + [(64, 16, 16)], [(2, 16, 32, 32)], qk_dim=8)  # B×C×H×W or C×H×W
    assert [m.linear.in_features for m in afd.query] == [32, 32, 64]
    assert [m.linear.in_features for m in afd.key] == [16]
    assert afd.bilinear.linear.out_features == 3 * 8
    assert afd.p_t.shape == (3, 8) and afd.p_s.shape == (1, 8)
    with pytest.raises(ValueError, match="built for"):
        afd([torch.randn(2, 32, 32, 32)] * 3, [torch.randn(2, 16, 32, 32)])
    with pytest.raises(ValueError, match="model.taps"):
        AFD([(2, 192)], [(2, 16, 4, 4)])


def test_afd_gradcheck_float64():
    torch.manual_seed(0)
    afd = randomise(AFD(T_SHAPES, S_SHAPES, qk_dim=D)).train()
    ft, fs = feats(T_SHAPES, 3, True), feats(S_SHAPES, 4, True)
    assert torch.autograd.gradcheck(lambda *x: afd(list(x[:2]), list(x[2:])), (*ft, *fs))
    # and with respect to the module's own parameters (positional terms, bilinear weight, a key layer)
    names = ["p_t", "p_s", "bilinear.linear.weight", "key.2.linear.weight", "query.1.bn.weight"]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in afd.named_parameters() if n in names}
    ft0, fs0 = [f.detach() for f in ft], [f.detach() for f in fs]

    def f(*values):
        return torch.func.functional_call(afd, dict(zip(params, values)), (ft0, fs0))

    assert torch.autograd.gradcheck(f, tuple(params.values()))


def test_rtk_with_afd_roles_and_all_keys_is_afd():
    torch.manual_seed(0)
    afd = randomise(AFD(T_SHAPES, S_SHAPES, qk_dim=D)).train()
    rtk = RTK(T_SHAPES, S_SHAPES, qk_dim=D, roles="afd", top_k="all").double().train()
    assert [n for n, _ in rtk.named_parameters()] == [n for n, _ in afd.named_parameters()]
    rtk.load_state_dict(afd.state_dict())
    ft = feats(T_SHAPES, 5)
    fs_a, fs_r = feats(S_SHAPES, 6, True), feats(S_SHAPES, 6, True)
    loss_a, loss_r = afd(ft, fs_a), rtk(ft, fs_r)
    assert torch.equal(loss_a, loss_r)
    loss_a.backward()
    loss_r.backward()
    for (n, pa), (_, pr) in zip(afd.named_parameters(), rtk.named_parameters()):
        assert torch.equal(pa.grad, pr.grad), n
    for a, r in zip(fs_a, fs_r):
        assert torch.equal(a.grad, r.grad)


def test_rtk_roles_top_k_and_pooling_by_hand():
    torch.manual_seed(0)
    ft, fs = feats(T_SHAPES, 7), feats(S_SHAPES, 8)
    full = randomise(RTK(T_SHAPES, S_SHAPES, qk_dim=D, roles="rtk", top_k="all", value_pool="smaller")).train()
    rtk = RTK(T_SHAPES, S_SHAPES, qk_dim=D, roles="rtk", top_k=None, value_pool="smaller").double().train()
    rtk.load_state_dict(full.state_dict())
    # roles=rtk: student layers query (S rows), teacher layers are the keys (T columns), top-k = ⌈T/2⌉ = 1
    assert rtk.top_k == 1 and [m.linear.in_features for m in rtk.key] == [3, 5]
    assert rtk.bilinear.linear.out_features == len(S_SHAPES) * D
    a_full = full.attention(ft, fs).detach()
    a_top = rtk.attention(ft, fs).detach()
    assert a_full.shape == a_top.shape == (B, len(S_SHAPES), len(T_SHAPES))
    assert ((a_top > 0).sum(2) == 1).all()
    kept = a_top > 0
    assert torch.equal(kept, a_full == a_full.max(2, keepdim=True).values)  # the largest key is kept
    renorm = torch.where(kept, a_full, 0) / torch.where(kept, a_full, 0).sum(2, keepdim=True)
    assert torch.allclose(a_top, renorm, rtol=1e-12)
    # the loss, with values pooled to the smaller map, by hand
    diffs = np_diffs([f.numpy() for f in ft], [f.numpy() for f in fs], pool="smaller")
    att = a_top.numpy()
    hand = sum(np.mean([sum(att[b, s, t] * diffs[b, s, t] for t in range(len(T_SHAPES))) for b in range(B)])
               for s in range(len(S_SHAPES)))
    assert float(rtk(ft, fs).detach()) == pytest.approx(hand, rel=1e-10)


def test_top_k_resolution_and_errors():
    assert [resolve_top_k(None, n) for n in (1, 2, 3, 18)] == [1, 1, 2, 9]
    assert resolve_top_k("all", 7) == 7 and resolve_top_k(3, 7) == 3 and resolve_top_k(10, 7) == 7
    for bad in (0, -1, "half", 1.5, True):
        with pytest.raises(ValueError, match="distill.top_k"):
            resolve_top_k(bad, 4)
    logit = torch.tensor([[0.1, 3.0, -1.0, 2.0]])
    assert torch.equal(torch.isinf(keep_top_k(logit, 2)), torch.tensor([[True, False, True, False]]))
    with pytest.raises(ValueError, match="distill.roles"):
        RTK(T_SHAPES, S_SHAPES, roles="student")


# ----------------------------------------------------------------------------- through the real config
def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("method", ["afd", "rtk"])
def test_distill_end_to_end_params_in_optimiser_and_teacher_frozen(tmp_path, method):
    job = build(compose_cfg(TINY + [f"distill={method}"], tmp_path))
    module, strategy, teacher = job.module, job.module.strategy, job.module.teacher
    extra = list(strategy.feature_loss.parameters())
    assert extra and all(p.requires_grad for p in extra)
    # resnet8 taps: one block per stage, teacher and student alike
    assert (strategy.feature_loss.n_t, strategy.feature_loss.n_s) == (3, 3)
    optimiser = module.configure_optimizers()
    optimiser = optimiser["optimizer"] if isinstance(optimiser, dict) else optimiser
    in_opt = {id(p) for g in optimiser.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in extra)
    assert not any(id(p) in in_opt for p in teacher.parameters())
    before, t_before = _snapshot(strategy.feature_loss), _snapshot(teacher)
    job.trainer.fit(module, datamodule=job.datamodule)
    after = _snapshot(strategy.feature_loss)
    assert all(not torch.equal(before[n], after[n]) for n in ("p_t", "p_s", "bilinear.linear.weight"))
    assert all(torch.equal(t_before[n], p) for n, p in teacher.named_parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    logged = job.trainer.logged_metrics
    assert {"train/loss/ce", "train/loss/kd", f"train/loss/{method}"} <= set(logged)
    assert float(logged[f"train/loss/{method}"]) > 0


def test_afd_term_matches_module_on_captured_features(tmp_path):
    """The logged AFD term is beta × the module's loss on the tapped features (one training step)."""
    from kdx.distill.base import Batch

    job = build(compose_cfg(TINY + ["distill=afd", "distill.beta=3.0"], tmp_path))
    module, strategy = job.module, job.module.strategy
    dm = job.datamodule
    dm.setup("fit")
    x, y, idx = dm.transform_batch(next(iter(dm.train_dataloader())), train=True)
    module.train()
    captured = {}
    orig = strategy.loss_terms

    def spy(student, teacher, batch, epoch):
        captured.update(s=student, t=teacher)
        return orig(student, teacher, batch, epoch)

    strategy.loss_terms = spy
    module.log = lambda *a, **k: None
    module.stop_if_not_finite = lambda *a, **k: None
    object.__setattr__(module, "_trainer", None)
    with torch.no_grad():
        module.training_step((x, y, idx), 0)
        s, t = captured["s"], captured["t"]
        assert list(s.taps) == ["blocks"] == list(t.taps) and len(s.taps["blocks"]) == 3 == len(t.taps["blocks"])
        # the student features are those of this forward (train mode, batch statistics)
        assert torch.allclose(s.taps["blocks"][1], _tap(module.student, "layer2.0", x))
        ref = strategy(s, t, Batch(x, y, idx), 1)["afd"]  # BN of the AFD module in train mode: batch stats
        assert float(ref) == pytest.approx(3.0 * float(strategy.feature_loss(t.taps["blocks"], s.taps["blocks"])), rel=1e-6)
        # the teacher features are those of the frozen teacher in eval mode
        assert torch.allclose(t.taps["blocks"][2], _tap(module.teacher.net, "layer3.0", x))


def _tap(net, name, x):
    out = {}
    h = dict(net.named_modules())[name].register_forward_hook(lambda m, a, o: out.setdefault("v", o))
    net(x)
    h.remove()
    return out["v"]


def test_afd_resume_is_exact(tmp_path, teacher_ckpt):
    """The attention module is rebuilt before the checkpoint loads: resuming equals an uninterrupted run."""
    from kdx.run import run

    common = TINY + ["distill=afd", "trainer.deterministic=true", "scheduler.milestones=[1]", "seed=5",
                     f"teacher.ckpt={teacher_ckpt}"]
    run(compose_cfg(common + ["trainer.max_epochs=2"], tmp_path, name="straight"))
    run(compose_cfg(common + ["trainer.max_epochs=1"], tmp_path, name="part"))
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    run(compose_cfg(common + ["trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path, name="part"))
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(last, weights_only=False)["state_dict"]
    assert any(k.startswith("strategy.feature_loss.") for k in a) and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("pair", ["wrn40_2_wrn16_2", "res32x4_res8x4"])
@pytest.mark.parametrize("method", ["afd", "rtk"])
def test_experiment_recipes_compose(tmp_path, method, pair):
    """The pair's paper protocol (the DKD table's experiment) with the method's own recipe (its config defaults)."""
    cfg = compose_cfg([f"experiment=cifar100/dkd/{pair}", f"distill={method}"], tmp_path)
    validate(cfg)
    assert cfg.distill.beta == 200.0 and cfg.distill.qk_dim == 128 and cfg.distill.w_kd == 0.9
    assert cfg.distill.w_ce == 1.0 and cfg.distill.temperature == 4.0
    assert cfg.optim.lr == 0.05 and cfg.optim.weight_decay == 5e-4 and cfg.data.batch_size == 64
    assert list(cfg.scheduler.milestones) == [150, 180, 210] and cfg.trainer.max_epochs == 240
    t, s = {"wrn40_2_wrn16_2": ("wrn_40_2", "wrn_16_2"), "res32x4_res8x4": ("resnet32x4", "resnet8x4")}[pair]
    assert (cfg.teacher.model.name, cfg.model.name) == (t, s)
    if method == "rtk":
        assert cfg.distill.roles == "rtk" and cfg.distill.top_k is None


@pytest.mark.parametrize("data", ["svhn", "cinic10"])
def test_paper_dataset_options_compose(tmp_path, data):
    cfg = compose_cfg([a for a in TINY if not a.startswith("data")] + [f"data={data}", "distill=rtk"], tmp_path)
    validate(cfg)
    assert cfg.data.name == data


def test_svhn_missing_files_name_the_setting(tmp_path):
    from kdx.data.svhn import SVHNDataModule

    dm = SVHNDataModule(root=str(tmp_path / "none"), download=False)
    assert dm.num_classes == 10 and dm.image_shape == (3, 32, 32)
    with pytest.raises((FileNotFoundError, ImportError), match="data.root|scipy"):
        dm.setup()


def test_svhn_augmentation_never_mirrors():
    from kdx.data.svhn import SVHNDataModule

    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 32, 32)
    x = x.repeat(64, 1, 1, 1)
    idx = torch.arange(len(x))
    dm = SVHNDataModule(pad=0)  # no crop: any change would be a flip
    out, _, _ = dm.transform_batch((x, torch.zeros(len(x), dtype=torch.int64), idx), train=True)
    assert torch.equal(out, dm.transform_batch((x, None, idx), train=False)[0])
    flipping = SVHNDataModule(pad=0, flip=True)
    out_f, _, _ = flipping.transform_batch((x, torch.zeros(len(x), dtype=torch.int64), idx), train=True)
    assert not torch.equal(out_f, out)


@pytest.mark.slow
def test_afd_and_rtk_under_ddp_cpu(tmp_path):
    """trainer=ddp_cpu (2 processes, gloo): AFD, then RTK reusing the stored teacher; rank 0 writes."""
    for method in ("afd", "rtk"):
        out = tmp_path / method
        args = [a for a in TINY if not a.startswith("logger")] + [
            "trainer=ddp_cpu", f"distill={method}", "logger=csv", f"hydra.run.dir={out}",
            f"paths.teachers={tmp_path / 'teachers'}",
        ]
        proc = run_cli(args, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        res = json.loads((out / "results.json").read_text())
        assert res["status"] == "complete" and res["method"] == method
        metrics = [p for p in out.rglob("metrics.csv") if "teacher" not in p.relative_to(out).parts]
        header = metrics[0].read_text().splitlines()[0]
        assert f"train/loss/{method}" in header
