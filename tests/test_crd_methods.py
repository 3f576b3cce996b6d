"""distill=crd, distill=reviewkd and distill=ofd wired into kdx: end to end through the real config on the tiny
synthetic job, each strategy's terms against its verified pure functions on the captured tensors, CRD's exact
resume and DDP refusal, ReviewKD's chain layout against the official per-pair values, OFD's teacher BN mode."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_cfg
from kdx.config import validate
from kdx.distill.base import Batch, warmup_factor
from kdx.distill.crd import crd_nce_loss
from kdx.distill.ofd import ofd_margin, ofd_stages_loss
from kdx.distill.reviewkd import hcl_loss, reviewkd_layout
from kdx.errors import ConfigError
from kdx.features import TapSets, feature_shapes
from kdx.models import create_model
from kdx.regimes.step import distill_step
from kdx.run import build_job, run

PAIRS = ["res56_res20", "res110_res32", "res32x4_res8x4", "wrn40_2_wrn16_2", "wrn40_2_wrn40_1", "vgg13_vgg8",
         "res32x4_shuv1", "res32x4_shuv2", "wrn40_2_shuv1", "vgg13_mv2", "res50_mv2"]
METHODS = {"crd": ["distill.k=16"], "reviewkd": [], "ofd": []}  # the tiny data has ~115 negatives per class


def tiny_cfg(tmp_path: Path, method: str, ckpt, *extra: str, name: str = "run"):
    return compose_cfg(TINY + [f"distill={method}", f"teacher.ckpt={ckpt}", *METHODS[method], *extra], tmp_path,
                       name=name)


def step_once(job, epoch: int = 1):
    """One training step of ``job`` on its first batch: ``(inputs the strategy saw, terms)``."""
    module, strategy = job.module, job.module.strategy
    dm = job.datamodule
    x, y, idx = dm.transform_batch(next(iter(dm.train_dataloader())), train=True, epoch=epoch - 1)[:3]
    seen = {}
    inner = strategy.loss_terms

    def spy(student, teacher, batch, e):
        seen.update(student=student, teacher=teacher, batch=batch)
        return inner(student, teacher, batch, e)

    strategy.loss_terms = spy
    module.train()
    _, terms = distill_step(module.step_parts, Batch(x, y, idx), epoch)
    return seen, terms


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("pair", PAIRS)
def test_every_method_composes_with_every_dkd_pair(tmp_path, pair):
    for method in METHODS:
        cfg = compose_cfg([f"experiment=cifar100/dkd/{pair}", f"distill={method}"], tmp_path)
        validate(cfg)
        assert cfg.distill._target_.endswith({"crd": "CRDStrategy", "reviewkd": "ReviewKDStrategy",
                                              "ofd": "OFDStrategy"}[method])


def test_reviewkd_pair_recipes_set_the_official_weights(tmp_path):
    # dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh (commit cede6ea): --kd-loss-weight per pair
    want = {"res56_res20": 0.6, "res110_res32": 1.0, "res32x4_res8x4": 5.0, "res32x4_shuv2": 8.0, "vgg13_vgg8": 5.0}
    for pair, weight in want.items():
        cfg = compose_cfg([f"experiment=cifar100/dkd/{pair}", "distill=reviewkd"], tmp_path)
        assert cfg.distill.w_reviewkd == weight, pair


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("method", list(METHODS))
def test_method_end_to_end(tmp_path, teacher_ckpt, method, monkeypatch, one_thread):
    """Status complete, one logged curve per term; the strategy's parameters are optimised and change, the
    teacher's do not."""
    jobs = []

    def build_and_keep(cfg, run_job):
        job = kdx_build(cfg, run_job)
        jobs.append((job, {k: v.clone() for k, v in job.module.strategy.named_parameters()},
                     {k: v.clone() for k, v in job.module.teacher.network.named_parameters()}))
        return job

    import kdx.run as kdx_run

    kdx_build = kdx_run.build
    monkeypatch.setattr(kdx_run, "build", build_and_keep)
    res = run(tiny_cfg(tmp_path, method, teacher_ckpt, "logger=csv"))
    assert res["status"] == "complete"
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {h for h in header if h.startswith("train/loss/")} == {"train/loss/ce", f"train/loss/{method}"}
    job, strategy_before, teacher_before = jobs[0]
    strategy = job.module.strategy
    assert strategy_before, "the strategy has trainable parts"
    in_opt = {id(p) for g in job.trainer.optimizers[0].param_groups for p in g["params"]}
    params = dict(strategy.named_parameters())
    assert all(id(p) in in_opt for p in params.values())
    changed = [k for k, v in params.items() if not torch.equal(v, strategy_before[k])]
    assert any("weight" in k for k in changed), changed
    assert all(torch.equal(v, teacher_before[k]) for k, v in job.module.teacher.network.named_parameters())


# ----------------------------------------------------------------------------- CRD
def test_crd_terms_equal_the_pure_functions(tmp_path, teacher_ckpt, one_thread):
    job = build_job(tiny_cfg(tmp_path, "crd", teacher_ckpt, "seed=3"))
    strategy = job.module.strategy
    ref = copy.deepcopy(strategy.crd)  # the embeddings and banks before the step
    seen, terms = step_once(job, epoch=2)
    idx, y = seen["batch"].idx, seen["batch"].y
    contrast = strategy.contrast_idx(idx, 2)
    assert contrast.shape == (idx.numel(), 17) and torch.equal(contrast[:, 0], idx)  # mode exact: itself first
    labels = job.datamodule.train_labels()
    assert (labels[contrast[:, 1:]] != labels[idx].unsqueeze(1)).all()  # negatives: other classes
    assert all(len(set(r.tolist())) == 16 for r in contrast[:, 1:])  # without replacement
    assert not torch.equal(contrast, strategy.contrast_idx(idx, 3))  # a new draw each epoch
    f_s, f_t = seen["student"].taps["pooled_feat"][0], seen["teacher"].taps["pooled_feat"][0]
    assert f_s.shape == (idx.numel(), 64) and strategy.crd.embed_s.linear.in_features == 64  # resnet8's width
    v1, v2 = ref.embed_s(f_s), ref.embed_t(f_t)
    out_s, out_t = ref.contrast(v1, v2, idx, contrast)
    want = 0.8 * (crd_nce_loss(out_s, 128) + crd_nce_loss(out_t, 128))
    torch.testing.assert_close(terms["crd"], want, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["ce"], torch.nn.functional.cross_entropy(seen["student"].logits, y))
    for name, buf in strategy.crd.contrast.named_buffers():  # the same memory update
        assert torch.equal(buf, dict(ref.contrast.named_buffers())[name]), name
    assert {"crd.contrast.memory_v1", "crd.contrast.memory_v2", "crd.contrast.params"} <= set(strategy.state_dict())


def test_crd_resume_is_exact(tmp_path, teacher_ckpt, one_thread):
    """2 epochs straight == 1 epoch + resume: student weights, embeddings and memory banks bit-identical."""
    common = ["trainer.deterministic=true", "scheduler.milestones=[1]", "seed=7"]
    run(tiny_cfg(tmp_path, "crd", teacher_ckpt, *common, "trainer.max_epochs=2", name="straight"))
    run(tiny_cfg(tmp_path, "crd", teacher_ckpt, *common, "trainer.max_epochs=1", name="part"))
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    resumed = run(tiny_cfg(tmp_path, "crd", teacher_ckpt, *common, "trainer.max_epochs=2", f"ckpt_path={last}",
                           name="part"))
    assert resumed["epochs_done"] == 2
    a, b = (torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
            for n in ("straight", "part"))
    assert a.keys() == b.keys() and "strategy.crd.contrast.memory_v2" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_crd_refuses_ddp_at_build(tmp_path, teacher_ckpt):
    with pytest.raises(ConfigError, match="DDP|processes"):
        build_job(tiny_cfg(tmp_path, "crd", teacher_ckpt, "trainer=ddp_cpu"))


def test_crd_k_above_the_negative_pool_stops_naming_distill_k(tmp_path, teacher_ckpt):
    cfg = compose_cfg(TINY + ["distill=crd", f"teacher.ckpt={teacher_ckpt}"], tmp_path)  # k = 16384 > 128 samples
    with pytest.raises(ConfigError, match=r"distill\.k=16384.*replace_short_pools"):
        build_job(cfg)
    job = build_job(compose_cfg(TINY + ["distill=crd", f"teacher.ckpt={teacher_ckpt}", "distill.k=300",
                                        "distill.replace_short_pools=true"], tmp_path, name="replace"))
    idx = torch.arange(8)
    contrast = job.module.strategy.contrast_idx(idx, 1)  # the official rule: with replacement when short
    labels = job.datamodule.train_labels()
    assert contrast.shape == (8, 301) and (labels[contrast[:, 1:]] != labels[idx].unsqueeze(1)).all()


# ----------------------------------------------------------------------------- ReviewKD
def tapped(name: str, sets: tuple[str, ...]) -> dict:
    model = create_model(name, 100)
    return feature_shapes(model, TapSets(model, {s: model.tap_sets[s] for s in sets}), (3, 32, 32))


# (teacher, student): (IN_CHANNELS, OUT_CHANNELS, SHAPES, OUT_SHAPES). resnet32x4 → resnet8x4: mdistiller
# (a08d46f) engine/cfg.py CFG.REVIEWKD; the others: dvlab-research/ReviewKD (cede6ea) CIFAR-100/model/reviewkd.py,
# build_review_kd (out_shapes None there means = shapes; its 5-entry resnet shapes are cut to 4 by the official zip).
OFFICIAL_LAYOUTS = {
    ("resnet32x4", "resnet8x4"): ([64, 128, 256, 256], [64, 128, 256, 256], [1, 8, 16, 32], [1, 8, 16, 32]),
    ("resnet56", "resnet20"): ([16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32], [1, 8, 16, 32]),
    ("wrn_40_2", "wrn_16_2"): ([32, 64, 128, 128], [32, 64, 128, 128], [1, 8, 16, 32], [1, 8, 16, 32]),
    ("wrn_40_2", "wrn_40_1"): ([16, 32, 64, 64], [32, 64, 128, 128], [1, 8, 16, 32], [1, 8, 16, 32]),
    ("resnet32x4", "ShuffleV1"): ([240, 480, 960, 960], [64, 128, 256, 256], [1, 4, 8, 16], [1, 8, 16, 32]),
    ("wrn_40_2", "ShuffleV1"): ([240, 480, 960, 960], [32, 64, 128, 128], [1, 4, 8, 16], [1, 8, 16, 32]),
    ("resnet32x4", "ShuffleV2"): ([116, 232, 464, 1024], [64, 128, 256, 256], [1, 4, 8, 16], [1, 8, 16, 32]),
    ("vgg13", "vgg8"): ([128, 256, 512, 512, 512], [128, 256, 512, 512, 512], [1, 4, 4, 8, 16], [1, 4, 4, 8, 16]),
    ("vgg13", "MobileNetV2"): ([12, 16, 48, 160, 1280], [128, 256, 512, 512, 512], [1, 2, 4, 8, 16],
                               [1, 4, 4, 8, 16]),
    ("ResNet50", "MobileNetV2"): ([12, 16, 48, 160, 1280], [256, 512, 1024, 2048, 2048], [1, 2, 4, 8, 16],
                                  [1, 4, 8, 16, 32]),
}


@pytest.mark.parametrize("pair", list(OFFICIAL_LAYOUTS), ids="-".join)
def test_reviewkd_layout_from_shapes_equals_the_official_config(pair, one_thread):
    teacher, student = pair
    t_shapes = tapped(teacher, ("preact_feats", "pooled_feat"))
    layout = reviewkd_layout(t_shapes, tapped(student, ("feats", "pooled_feat")))
    assert tuple(layout) == OFFICIAL_LAYOUTS[pair]


def test_reviewkd_stu_preact_reads_the_students_preact_feats():
    from kdx.distill.reviewkd import ReviewKDStrategy

    assert ReviewKDStrategy().student_taps == ("feats", "pooled_feat")
    assert ReviewKDStrategy(stu_preact=True).student_taps == ("preact_feats", "pooled_feat")
    shapes = tapped("resnet8x4", ("preact_feats", "pooled_feat"))
    t_shapes = tapped("resnet32x4", ("preact_feats", "pooled_feat"))
    assert tuple(reviewkd_layout(t_shapes, shapes, stu_preact=True)) == OFFICIAL_LAYOUTS[("resnet32x4", "resnet8x4")]
    with pytest.raises(ConfigError, match="only 2"):  # fewer student levels than the teacher's 4
        reviewkd_layout(t_shapes, {"feats": shapes["preact_feats"][3:], "pooled_feat": shapes["pooled_feat"]})


def test_reviewkd_terms_equal_the_pure_functions(tmp_path, teacher_ckpt, one_thread):
    job = build_job(tiny_cfg(tmp_path, "reviewkd", teacher_ckpt))
    strategy = job.module.strategy
    assert strategy.teacher_taps == ("preact_feats", "pooled_feat")  # mdistiller: the teacher's pre-ReLU maps
    seen, terms = step_once(job, epoch=3)
    s, t = seen["student"].taps, seen["teacher"].taps
    assert (t["preact_feats"][-1] < 0).any() and (s["feats"][-1] >= 0).all()  # pre-ReLU teacher, post-ReLU student
    fused = strategy.review([*s["feats"][1:], s["pooled_feat"][0][:, :, None, None]])
    assert [f.shape[1:] for f in fused] == [f.shape[1:] for f in t["preact_feats"][1:]] + [(64, 1, 1)]
    want = 5.0 * (3 / 20) * hcl_loss(fused, [*t["preact_feats"][1:], t["pooled_feat"][0][:, :, None, None]])
    assert warmup_factor(3, 20) == 3 / 20
    torch.testing.assert_close(terms["reviewkd"], want, rtol=1e-6, atol=0)
    _, late = step_once(job, epoch=25)  # after the warm-up: the full weight
    assert late["reviewkd"] > terms["reviewkd"] * 4


# ----------------------------------------------------------------------------- OFD
def test_ofd_terms_equal_the_pure_functions(tmp_path, teacher_ckpt, one_thread):
    job = build_job(tiny_cfg(tmp_path, "ofd", teacher_ckpt))
    strategy, net = job.module.strategy, job.module.teacher.network
    modules = dict(net.named_modules())
    margins = [ofd_margin(modules[n].weight, modules[n].bias) for n in net.bn_before_relu]
    assert [m.numel() for m in margins] == [16, 32, 64]
    assert all(torch.equal(getattr(strategy, f"margin_{i}"), m) for i, m in enumerate(margins))
    assert {"margin_0", "margin_1", "margin_2"} <= set(strategy.state_dict())  # buffers: in checkpoints
    seen, terms = step_once(job)
    s, t = seen["student"].taps["preact_feats"], seen["teacher"].taps["preact_feats"]
    want = 0.001 * ofd_stages_loss(strategy.connectors(s[1:]), t[1:], margins)
    torch.testing.assert_close(terms["ofd"], want, rtol=1e-6, atol=0)
    assert terms["ofd"] > 0


@pytest.mark.parametrize("bn_train", [True, False])
def test_ofd_teacher_bn_batch_statistics_follow_the_switch(tmp_path, teacher_ckpt, bn_train, one_thread):
    job = build_job(tiny_cfg(tmp_path, "ofd", teacher_ckpt, f"distill.teacher_bn_train={str(bn_train).lower()}"))
    net = job.module.teacher.network
    bns = {k: m for k, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    before = {k: m.running_mean.clone() for k, m in bns.items()}
    step_once(job)
    moved = [k for k, m in bns.items() if not torch.equal(m.running_mean, before[k])]
    assert (len(moved) == len(bns)) if bn_train else not moved
    assert not any(m.training for m in net.modules())  # back in eval mode after the step


def test_ofd_refuses_a_teacher_without_bn_before_relu(tmp_path):
    ckpt = tmp_path / "shufflev1.pt"
    torch.save(create_model("ShuffleV1", 10).state_dict(), ckpt)
    cfg = compose_cfg(TINY + ["distill=ofd", "teacher_arch=ShuffleV1", f"teacher.ckpt={ckpt}"], tmp_path)
    with pytest.raises(ConfigError, match="bn_before_relu.*ShuffleNetV1"):
        build_job(cfg)
    # without a checkpoint and with an empty store: refused at start-up, before the teacher would be trained
    cfg = compose_cfg(TINY + ["distill=ofd", "teacher_arch=ShuffleV1"], tmp_path, name="untrained")
    with pytest.raises(ConfigError, match="bn_before_relu.*ShuffleNetV1"):
        build_job(cfg)
    assert not (tmp_path / "untrained" / "teacher").exists() and not (tmp_path / "teachers").exists()


@pytest.mark.parametrize("side", ["teacher_arch", "model"])
def test_ofd_refuses_mobilenetv2_without_preact_feats(tmp_path, side):
    cfg = compose_cfg(TINY + ["distill=ofd", f"{side}=mobile_half", "teacher.auto_train=false"], tmp_path)
    with pytest.raises(ConfigError, match=r"preact_feats.*MobileNetV2"):
        build_job(cfg)


def test_ofd_aligns_stages_and_margins_to_the_deepest(one_thread):
    """vgg13 (4 stages) → resnet8x4 (3): the last 3 of each, margins included (mdistiller would pair the first 3
    margins with the last 3 features and fail on their widths)."""
    from kdx.distill.ofd import OFDStrategy

    teacher = create_model("vgg13", 100)
    strategy = OFDStrategy()
    strategy.attach_networks(create_model("resnet8x4", 100), teacher)
    strategy.build_feature_modules(tapped("vgg13", ("preact_feats",)), tapped("resnet8x4", ("preact_feats",)))
    convs = [c[0] for c in strategy.connectors.connectors]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(64, 256), (128, 512), (256, 512)]
    modules = dict(teacher.named_modules())
    for i, name in enumerate(teacher.bn_before_relu[1:]):
        assert torch.equal(getattr(strategy, f"margin_{i}"), ofd_margin(modules[name].weight, modules[name].bias))
