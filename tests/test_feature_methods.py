"""mdistiller's feature baselines wired as kdx methods: distill=at|sp|pkt|rkd|nst|kdsvd|fitnet|vid.

- end to end through the real config on the tiny synthetic job (terms logged, FitNet's/VID's regressors in the
  optimiser and trained, the teacher untouched);
- each strategy's terms equal the verified pure function (kdx/distill/<m>.py) on the features the step captured,
  with the official weights;
- every pair of the DKD table composes, validates and runs one loss on both networks' real features, except
  KD-SVD where the paired stage maps differ in width (the official code cannot run there): a ConfigError at build.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import TINY, compose_cfg
from kdx.config import validate
from kdx.distill.at import at_loss
from kdx.distill.base import Batch, ModelOutput
from kdx.distill.fitnet import FitNet, fitnet_loss
from kdx.distill.kdsvd import KDSVD, kdsvd_loss
from kdx.distill.nst import nst_loss
from kdx.distill.pkt import pkt_loss
from kdx.distill.rkd import rkd_loss
from kdx.distill.sp import sp_loss
from kdx.distill.vid import VID, vid_loss
from kdx.errors import ConfigError
from kdx.features import TapSets, feature_shapes, model_tap_sets

# distill=<name> → (class, official weight of its term: mdistiller a08d46f engine/cfg.py, configs/cifar100/<m>.yaml)
METHODS = {
    "at": ("kdx.distill.at.AT", 1000.0),
    "sp": ("kdx.distill.sp.SP", 3000.0),
    "pkt": ("kdx.distill.pkt.PKT", 30000.0),
    "rkd": ("kdx.distill.rkd.RKD", 1.0),
    "nst": ("kdx.distill.nst.NST", 50.0),
    "kdsvd": ("kdx.distill.kdsvd.KDSVD", 1.0),
    "fitnet": ("kdx.distill.fitnet.FitNet", 100.0),
    "vid": ("kdx.distill.vid.VID", 1.0),
}
TRAINABLE = {"fitnet": "regressor", "vid": "regressors"}
PAIRS = ["res56_res20", "res110_res32", "res32x4_res8x4", "wrn40_2_wrn16_2", "wrn40_2_wrn40_1", "vgg13_vgg8",
         "res32x4_shuv1", "res32x4_shuv2", "wrn40_2_shuv1", "vgg13_mv2", "res50_mv2"]
# paired feats[1:] map widths differ (teacher 32/16/8(/4), student 16/8/4(/2)): mdistiller's KD-SVD fails there
KDSVD_REFUSED = {"res32x4_shuv1", "res32x4_shuv2", "wrn40_2_shuv1", "vgg13_mv2", "res50_mv2"}


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("method", list(METHODS))
def test_end_to_end(tmp_path, teacher_ckpt, monkeypatch, one_thread, method):
    """One epoch through kdx.run.run: complete, both terms logged; trainable parts (FitNet, VID) in the optimiser,
    changed by training and checkpointed; nothing else trainable; the teacher's weights and BN statistics unchanged."""
    import kdx.run as kdx_run
    from kdx.build import build

    seen = {}

    def build_and_snapshot(cfg, run_job):
        job = build(cfg, run_job)
        seen.update(job=job, strategy=_state(job.module.strategy), teacher=_state(job.module.teacher.network))
        return job

    monkeypatch.setattr(kdx_run, "build", build_and_snapshot)
    cfg = compose_cfg(TINY + ["logger=csv", f"distill={method}", f"teacher.ckpt={teacher_ckpt}"], tmp_path)
    res = kdx_run.run(cfg)
    assert res["status"] == "complete" and res["method"] == method
    header = next((tmp_path / "run").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"train/loss/ce", f"train/loss/{method}"} <= set(header)

    job = seen["job"]
    strategy, teacher = job.module.strategy, job.module.teacher.network
    assert type(strategy).__module__ + "." + type(strategy).__name__ == METHODS[method][0]
    in_opt = {id(p) for group in job.trainer.optimizers[0].param_groups for p in group["params"]}
    params = dict(strategy.named_parameters())
    if method in TRAINABLE:
        assert params and all(n.startswith(TRAINABLE[method] + ".") for n in params)
        assert all(id(p) in in_opt for p in params.values())
        after = _state(strategy)
        changed = [n for n in params if not torch.equal(seen["strategy"][n], after[n])]
        assert set(changed) == set(params), set(params) - set(changed)
        saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        assert {f"strategy.{n}" for n in after} <= set(saved)  # saved with the student, so a resume restores them
    else:
        assert not params
    if method == "vid":  # learn_var=False (mdistiller): the variance is a buffer that never changes
        assert all(torch.equal(seen["strategy"][n], v) for n, v in _state(strategy).items() if "log_scale" in n)
        assert len(strategy.regressors) == 3  # resnet8: feats = stem + 3 stages, zip(feats[1:], feats[1:])
    assert not any(id(p) in in_opt for p in teacher.parameters())
    assert all(torch.equal(seen["teacher"][k], v) for k, v in teacher.state_dict().items())


# ----------------------------------------------------------------------------- terms = the pure functions
def _pure(method, strategy, s, t):
    """The unweighted loss by the verified pure function on the captured taps (official points and settings)."""
    fs, ft = s.taps.get("feats"), t.taps.get("feats")
    if method == "at":
        return at_loss(fs[1:], ft[1:], p=2)
    if method == "sp":
        return sp_loss([fs[-1]], [ft[-1]])
    if method == "pkt":
        return pkt_loss(s.taps["pooled_feat"][0], t.taps["pooled_feat"][0])
    if method == "rkd":
        return rkd_loss(s.taps["pooled_feat"][0], t.taps["pooled_feat"][0], squared=False, eps=1e-12,
                        distance_weight=25, angle_weight=50)
    if method == "nst":
        return nst_loss(fs[1:], ft[1:])
    if method == "kdsvd":
        return kdsvd_loss(fs[1:], ft[1:], k=1)
    if method == "fitnet":
        return fitnet_loss(strategy.regressor(fs[2]), ft[2])
    # vid: resnet8 → resnet8, equal map sizes (no pooling); one regressor and variance per zipped pair
    assert [f.shape for f in fs] == [f.shape for f in ft]
    return sum(vid_loss(r.regressor(a), r.pred_var(), b) for r, a, b in zip(strategy.regressors, fs[1:], ft[1:]))


@pytest.mark.parametrize("method", list(METHODS))
def test_terms_equal_pure_function_on_captured_features(tmp_path, teacher_ckpt, one_thread, method):
    from kdx.regimes.step import distill_step
    from kdx.run import build_job

    job = build_job(compose_cfg(TINY + [f"distill={method}", f"teacher.ckpt={teacher_ckpt}"], tmp_path))
    module, strategy, dm = job.module, job.module.strategy, job.datamodule
    x, y, idx = dm.transform_batch(next(iter(dm.train_dataloader())), train=True)
    module.train()
    captured = {}
    orig = strategy.loss_terms

    def spy(student, teacher, batch, epoch):
        terms = orig(student, teacher, batch, epoch)
        captured.update(s=student, t=teacher, terms=terms)
        return terms

    strategy.loss_terms = spy
    with torch.no_grad():
        distill_step(module.step_parts, Batch(x, y, idx), 1)
        s, t, terms = captured["s"], captured["t"], captured["terms"]
        assert set(terms) == {"ce", method}
        taps = {"pkt": "pooled_feat", "rkd": "pooled_feat"}.get(method, "feats")
        assert list(s.taps) == [taps] == list(t.taps)
        if taps == "feats":  # resnet8: stem + 3 stages, 16/16/32/64 channels at 32/32/16/8
            assert [tuple(f.shape[1:]) for f in s.taps["feats"]] == [(16, 32, 32), (16, 32, 32), (32, 16, 16),
                                                                      (64, 8, 8)]
        else:  # the pooled feature is the global average of the last stage's map (mdistiller's pooled_feat)
            assert s.taps["pooled_feat"][0].shape == (len(x), 64)
        weight = METHODS[method][1]
        pure = _pure(method, strategy, s, t)
        assert float(pure) > 0
        torch.testing.assert_close(terms[method], weight * pure, rtol=1e-6, atol=0)
        torch.testing.assert_close(terms["ce"], F.cross_entropy(s.logits, y), rtol=1e-6, atol=0)


def test_pooled_feat_is_the_pooled_last_map(tmp_path, teacher_ckpt, one_thread):
    """PKT/RKD read pooled_feat and SP reads feats[-1]: on resnet8 the former is the spatial mean of the latter."""
    from kdx.run import build_job

    job = build_job(compose_cfg(TINY + ["distill=pkt", f"teacher.ckpt={teacher_ckpt}"], tmp_path))
    net = job.module.student
    taps = TapSets(net, {k: model_tap_sets(net)[k] for k in ("feats", "pooled_feat")})
    with torch.no_grad(), taps.capture() as f:
        net(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(f["pooled_feat"][0], f["feats"][-1].mean(dim=(2, 3)))


# ----------------------------------------------------------------------------- every pair of the DKD table
def _network(node, num_classes=100):
    extra = {"pretrained": False} if "pretrained" in node else {}
    net = instantiate(node, num_classes=num_classes, **extra)
    return net, TapSets(net, {k: model_tap_sets(net)[k] for k in ("feats", "pooled_feat")})


@pytest.mark.parametrize("pair", PAIRS)
def test_every_dkd_pair_composes_validates_and_runs(tmp_path, one_thread, pair):
    """Each method's config on each pair of the DKD table: composes and validates with its official defaults, builds
    its modules from the pair's real tapped shapes and gives finite terms on both networks' features of one batch;
    KD-SVD is refused at build where the paired map widths differ."""
    cfgs = {}
    for method, (target, weight) in METHODS.items():
        cfg = compose_cfg([f"experiment=cifar100/dkd/{pair}", f"distill={method}"], tmp_path)
        validate(cfg)
        assert cfg.distill._target_ == target and cfg.distill.w_ce == 1.0 and cfg.distill[f"w_{method}"] == weight
        assert cfg.trainer.max_epochs == 240 and cfg.data.batch_size == 64 and cfg.method == method
        cfgs[method] = cfg
    torch.manual_seed(0)
    student, s_taps = _network(cfgs["at"].model)
    teacher, t_taps = _network(cfgs["at"].teacher.model)
    teacher.eval()
    s_shapes, t_shapes = feature_shapes(student, s_taps, (3, 32, 32)), feature_shapes(teacher, t_taps, (3, 32, 32))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 99])
    with torch.no_grad(), t_taps.capture() as f_t:
        z_t = teacher(x)
    with s_taps.capture() as f_s:
        z_s = student(x)
    for method, cfg in cfgs.items():
        strategy = instantiate(cfg.distill)
        if method == "kdsvd" and pair in KDSVD_REFUSED:
            with pytest.raises(ConfigError, match=r"distill=kdsvd .*equal widths W.*feats\[\d\]"):
                strategy.build_feature_modules(t_shapes, s_shapes)
            continue
        strategy.build_feature_modules(t_shapes, s_shapes)
        sets = strategy.student_taps
        terms = strategy(ModelOutput(z_s, {k: f_s[k] for k in sets}), ModelOutput(z_t, {k: f_t[k] for k in sets}),
                         Batch(x, y, torch.arange(4)), 1)
        assert set(terms) == {"ce", method}
        assert all(torch.isfinite(v) for v in terms.values()), (method, terms)


def test_kdsvd_mismatched_widths_stop_at_build(tmp_path, teacher_ckpt, one_thread):
    """A real build: resnet8 teacher (feats[1:] maps 32/16/8 wide) → ShuffleV1 student (16/8/4) stops with a
    ConfigError naming distill=kdsvd before anything trains."""
    from kdx.run import build_job

    cfg = compose_cfg(TINY + ["model=ShuffleV1", "distill=kdsvd", f"teacher.ckpt={teacher_ckpt}"], tmp_path)
    with pytest.raises(ConfigError, match=r"distill=kdsvd \(fix_layout=False\).*feats\[1\].*\(240, 16, 16\).*"
                                          r"\(16, 32, 32\)"):
        build_job(cfg)


# ----------------------------------------------------------------------------- settings and their errors
def test_setting_errors_name_the_key():
    with pytest.raises(ConfigError, match="distill.k="):
        KDSVD(k=0)
    with pytest.raises(ConfigError, match="distill.hint_layer="):
        FitNet(hint_layer=2.0)
    with pytest.raises(ConfigError, match="distill.init_pred_var="):
        VID(init_pred_var=1e-6, eps=1e-5)
    shapes = lambda *hw: {"feats": [(2, 8, h, h) for h in hw]}  # noqa: E731
    with pytest.raises(ConfigError, match="distill.hint_layer=4"):
        FitNet(hint_layer=4).build_feature_modules(shapes(8, 8, 4, 2), shapes(8, 8, 4, 2))
    with pytest.raises(ConfigError, match="distill.hint_layer=2.*other than 2×"):  # student 3 high, teacher 8
        FitNet().build_feature_modules(shapes(8, 8, 8), shapes(8, 8, 3))
    with pytest.raises(ConfigError, match="distill=vid.*4 stages.*3"):  # mdistiller: IndexError
        VID().build_feature_modules(shapes(8, 8, 4, 2), shapes(8, 8, 4, 2, 1))
    # with fix_layout KD-SVD compares channel counts instead of widths
    s, t = {"feats": [(2, 4, 8, 8), (2, 4, 8, 8)]}, {"feats": [(2, 4, 8, 8), (2, 8, 8, 8)]}
    KDSVD().build_feature_modules(t, s)
    with pytest.raises(ConfigError, match="equal channel counts C"):
        KDSVD(fix_layout=True).build_feature_modules(t, s)


def test_vid_zip_drops_extra_teacher_stages_and_learn_var():
    """A teacher with more stages: one regressor per zipped pair (mdistiller); learn_var=True trains σ² too."""
    s = {"feats": [(2, 3, 8, 8), (2, 4, 8, 8), (2, 5, 4, 4)]}
    t = {"feats": [(2, 3, 8, 8), (2, 6, 8, 8), (2, 7, 4, 4), (2, 9, 2, 2)]}
    vid = VID()
    vid.build_feature_modules(t, s)
    assert [r.regressor[0].in_channels for r in vid.regressors] == [4, 5]
    assert [r.regressor[4].out_channels for r in vid.regressors] == [6, 7]
    assert [r.regressor[2].in_channels for r in vid.regressors] == [6, 7]  # mid width = the teacher's channels
    assert not any("log_scale" in n for n, _ in vid.named_parameters())
    torch.testing.assert_close(vid.regressors[0].pred_var(), torch.full((6,), 5.0))
    learned = VID(learn_var=True)
    learned.build_feature_modules(t, s)
    assert {n for n, _ in learned.named_parameters() if "log_scale" in n} == {"regressors.0.log_scale",
                                                                            "regressors.1.log_scale"}
