"""DIST, NKD, TTM, WTTM, SDD-KD/DKD/NKD and the LS recipes wired into kdx: end to end through the real config, the
strategies' terms against the verified pure functions (on tensors captured in a real step, on realistic half-precision
inputs under autocast), SDD with M = [1] against its base methods, and every config with every DKD-table pair."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import TINY, compose_cfg
from kdx.config import validate
from kdx.distill.base import Batch, ModelOutput
from kdx.distill.dist import DIST, dist_terms
from kdx.distill.dkd import DKD
from kdx.distill.kd import KD
from kdx.distill.losses import dkd_terms, kd_loss
from kdx.distill.ls import Standardize, standardize
from kdx.distill.nkd import NKD, nkd_loss, nkd_per_sample
from kdx.distill.sdd import SDDDKD, SDDKD, SDDNKD, multi_scale_logits, sdd_dkd_loss, sdd_kd_loss, sdd_nkd_loss
from kdx.distill.ttm import TTM, WTTM, ttm_loss, wttm_loss
from kdx.errors import ConfigError
from kdx.regimes.step import distill_step
from kdx.run import build_job as build, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second intra-op thread only waits

CONF = Path(__file__).resolve().parent.parent / "conf"
PAIRS = sorted(p.stem for p in (CONF / "experiment" / "cifar100" / "dkd").glob("*.yaml"))
TERMS = {
    "dist": {"ce", "inter", "intra"}, "nkd": {"ce", "nkd"}, "ttm": {"ce", "ttm"}, "wttm": {"ce", "wttm"},
    "sdd_kd": {"ce", "kd"}, "sdd_dkd": {"ce", "dkd"}, "sdd_nkd": {"ce", "nkd"},
}
SDD = ("sdd_kd", "sdd_dkd", "sdd_nkd")


# --------------------------------------------------------------------------- the pure functions, by hand here
def expected_terms(method: str, strat, s: ModelOutput, t: ModelOutput, y: torch.Tensor, epoch: int) -> dict:
    """The terms each strategy must give, written from the pure functions and the strategy's hyper-parameters."""
    ce = F.cross_entropy(s.logits.float(), y)
    zs, zt = s.logits, t.logits
    if method == "dist":
        inter, intra = dist_terms(zs, zt, strat.tau)
        return {"ce": strat.w_ce * ce, "inter": strat.w_dist * strat.beta * inter,
                "intra": strat.w_dist * strat.gamma * intra}
    if method == "nkd":
        return {"ce": strat.w_ce * ce, "nkd": nkd_loss(zs, zt, y, strat.temperature, strat.gamma)}
    if method in ("ttm", "wttm"):
        fn = ttm_loss if method == "ttm" else wttm_loss
        return {"ce": strat.w_ce * ce, method: strat.beta * fn(zs, zt, strat.l)}
    rs = multi_scale_logits(s.taps["final_map"][0], s.head, strat.scales)
    rt = multi_scale_logits(t.taps["final_map"][0], t.head, strat.scales)
    warm = min(epoch / 20, 1.0)
    if method == "sdd_kd":
        return {"ce": strat.w_ce * ce, "kd": strat.w_kd * sdd_kd_loss(rs, rt, y, strat.temperature)}
    if method == "sdd_dkd":
        return {"ce": strat.w_ce * ce,
                "dkd": warm * sdd_dkd_loss(rs, rt, y, strat.alpha, strat.beta, strat.temperature)}
    return {"ce": strat.w_ce * ce, "nkd": warm * sdd_nkd_loss(rs, rt, y, strat.temperature, strat.gamma)}


def close(a: dict, b: dict, rel: float) -> bool:
    return set(a) == set(b) and all(
        float(a[k].detach()) == pytest.approx(float(b[k].detach()), rel=rel, abs=1e-6) for k in a)


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("method", sorted(TERMS))
def test_end_to_end_through_the_real_config(tmp_path, teacher_ckpt, method):
    res = run(compose_cfg(TINY + [f"distill={method}", f"teacher.ckpt={teacher_ckpt}", "logger=csv"], tmp_path))
    assert res["status"] == "complete" and res["method"] == method and res["test_acc1_last"] is not None
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {h[len("train/loss/"):] for h in header if h.startswith("train/loss/")} == TERMS[method]


def test_sdd_end_to_end_keeps_the_teacher_and_its_head_out_of_training(tmp_path, teacher_ckpt):
    """SDD calls the teacher's classifier on its final map: no gradient reaches it, and nothing joins the optimiser."""
    job = build(compose_cfg(TINY + ["distill=sdd_dkd", f"teacher.ckpt={teacher_ckpt}"], tmp_path))
    module, strat, teacher = job.module, job.module.strategy, job.module.teacher
    assert isinstance(strat, SDDDKD) and not list(strat.parameters()) and strat.scales == (1, 2, 4)
    assert module.step_parts.teacher_head is not None and module.step_parts.student_head is module.student.fc
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    s_before = module.student.fc.weight.detach().clone()
    job.trainer.fit(module, datamodule=job.datamodule)
    assert all(torch.equal(before[n], p) and p.grad is None for n, p in teacher.named_parameters())
    assert not torch.equal(s_before, module.student.fc.weight)
    assert float(job.trainer.logged_metrics["train/loss/dkd"]) > 0


# --------------------------------------------------------------------------- terms on captured tensors
def captured_step(tmp_path, overrides: list[str], epoch: int = 1, name: str = "run"):
    """One real step of the built job (its models, taps and heads) with the strategy's inputs captured."""
    job = build(compose_cfg(TINY + overrides, tmp_path, name=name))
    module, strat, dm = job.module, job.module.strategy, job.datamodule
    dm.setup("fit")
    x, y, idx = dm.transform_batch(next(iter(dm.train_dataloader())), train=True)
    module.train()
    seen = {}
    orig = strat.loss_terms

    def spy(student, teacher, batch, ep):
        seen.update(s=student, t=teacher, terms=orig(student, teacher, batch, ep))
        return seen["terms"]

    strat.loss_terms = spy
    with torch.no_grad():
        distill_step(module.step_parts, Batch(x, y, idx), epoch)
    return job, seen["s"], seen["t"], y, seen["terms"]


@pytest.mark.parametrize("method", sorted(TERMS))
def test_terms_equal_the_pure_functions_on_captured_tensors(tmp_path, teacher_ckpt, method):
    epoch = 5  # inside the SDD-DKD/NKD warm-up: the factor 5/20 is part of what is checked
    job, s, t, y, terms = captured_step(tmp_path, [f"distill={method}", f"teacher.ckpt={teacher_ckpt}"], epoch)
    strat = job.module.strategy
    assert close(terms, expected_terms(method, strat, s, t, y, epoch), rel=1e-6)
    assert all(v.dtype == torch.float32 for v in terms.values())
    if method in SDD:
        (fs,), (ft,) = s.taps["final_map"], t.taps["final_map"]
        assert fs.shape[-2:] == (8, 8) == ft.shape[-2:]
        # the tapped map is the one each network pools for its classifier
        assert torch.allclose(s.head(fs.mean((2, 3))), s.logits, atol=1e-5)
        assert torch.allclose(t.head(ft.mean((2, 3))), t.logits, atol=1e-5)


# --------------------------------------------------------------------------- mixed precision through the strategies
def realistic(seed: int, b: int = 16, k: int = 100, noise: float = 0.5):
    """Student logits N(0, 2²); a large-margin teacher N(-10, 2²) with its label logit at +30 and five classes at
    -30; final maps [B, K, 8, 8] whose every cell is the logits plus N(0, noise²), read by identity heads (so
    region logits are realistic logits too)."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, k, generator=g) * 2.0
    zt = torch.randn(b, k, generator=g) * 2.0 - 10.0
    y = torch.randint(0, k, (b,), generator=g)
    zt[torch.arange(b), y] = 30.0
    zt[:, :5] = -30.0
    maps = [z[:, :, None, None] + noise * torch.randn(b, k, 8, 8, generator=g) for z in (zs, zt)]
    head = nn.Linear(k, k)
    with torch.no_grad():
        head.weight.copy_(torch.eye(k))
        head.bias.zero_()
    return zs, zt, y, maps, head


STRATEGIES = {
    "dist": DIST, "nkd": NKD, "ttm": TTM, "wttm": WTTM, "sdd_kd": SDDKD, "sdd_dkd": SDDDKD, "sdd_nkd": SDDNKD,
    "kd+ls": lambda: KD(temperature=2.0, w_kd=9.0, logit_transform=Standardize()),
    "dkd+ls": lambda: DKD(alpha=9.0, beta=72.0, temperature=2.0, logit_transform=Standardize()),
}


# measured worst relative errors over all terms (seed 0, epoch 30): bf16 9.2e-4 (WTTM), fp16 8.4e-5 (WTTM); the
# bounds leave a factor of ~5 (the inputs' own rounding: bf16 keeps 8 bits, fp16 11)
@pytest.mark.parametrize("dtype,rel", [(torch.bfloat16, 5e-3), (torch.float16, 5e-4)])
@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_half_precision_autocast_through_the_strategy(method, dtype, rel):
    zs, zt, y, (ms, mt), head = realistic(0)
    strat = STRATEGIES[method]()
    batch = Batch(torch.zeros(16, 3, 32, 32), y, torch.arange(16))

    def outputs(cast):
        return (ModelOutput(cast(zs), {"final_map": [cast(ms)]}, head=head),
                ModelOutput(cast(zt), {"final_map": [cast(mt)]}, head=head))

    ref = strat(*outputs(lambda v: v), batch, 30)
    with torch.autocast("cpu", dtype=dtype):  # as under trainer.precision=bf16-mixed / 16-mixed
        half = strat(*outputs(lambda v: v.to(dtype)), batch, 30)
    assert set(half) == set(ref)
    for k in ref:
        got, want = float(half[k].detach()), float(ref[k].detach())
        assert half[k].dtype == torch.float32 and math.isfinite(got), (k, got)
        assert got == pytest.approx(want, rel=rel) and want > 0, k
    # the reference is the pure functions on float32 inputs (so the strategy, not only its maths, is checked)
    if method in TERMS:
        assert close(ref, expected_terms(method, strat, *outputs(lambda v: v), y, 30), rel=1e-6)


# --------------------------------------------------------------------------- SDD with M = [1]
@torch.no_grad()
def test_sdd_with_global_scale_only_equals_its_base_methods():
    """Official M == '[1]': the base loss on the ordinary logits (no region logits, no head needed)."""
    zs, zt, y, _, _ = realistic(1)
    batch = Batch(torch.zeros(16, 3, 32, 32), y, torch.arange(16))
    s, t = ModelOutput(zs), ModelOutput(zt)  # no taps, no head: the [1] path must not read them
    for epoch in (3, 25):
        warm = min(epoch / 20, 1.0)
        kd = KD(temperature=4.0, w_ce=0.1, w_kd=0.9)(s, t, batch, epoch)
        assert close(SDDKD(scales=[1])(s, t, batch, epoch), kd, rel=1e-6)
        dkd = DKD(beta=8.0)(s, t, batch, epoch)
        got = SDDDKD(scales=[1])(s, t, batch, epoch)
        assert close(got, {"ce": dkd["ce"], "dkd": dkd["tckd"] + dkd["nckd"]}, rel=1e-6)
        nkd = NKD(temperature=4.0, gamma=8.0)(s, t, batch, epoch)
        fixed = SDDNKD(scales=[1], fix_non_target_mask=True)(s, t, batch, epoch)
        assert close(fixed, {"ce": nkd["ce"], "nkd": warm * nkd["nkd"]}, rel=1e-6)
        official = SDDNKD(scales=[1])(s, t, batch, epoch)  # SDD's mask keeps the target class
        quirk = nkd_per_sample(zs, zt, y, 4.0, 8.0, drop_target=False).mean()
        assert float(official["nkd"]) == pytest.approx(warm * float(quirk), rel=1e-6)
        assert float(official["nkd"]) != pytest.approx(float(fixed["nkd"]), rel=1e-3)
    # the region path with more scales differs where the regions differ (the test can fail)
    _, _, _, (ms, mt), head = realistic(1, noise=4.0)
    multi = SDDKD()(ModelOutput(zs, {"final_map": [ms]}, head=head), ModelOutput(zt, {"final_map": [mt]}, head=head),
                    batch, 1)
    assert float(multi["kd"]) != pytest.approx(0.9 * float(kd_loss(zs, zt, 4.0)), rel=1e-3)


@torch.no_grad()
def test_sdd_warmup_and_mask_switch():
    zs, zt, y, (ms, mt), head = realistic(2)
    s, t = ModelOutput(zs, {"final_map": [ms]}, head=head), ModelOutput(zt, {"final_map": [mt]}, head=head)
    batch = Batch(None, y, torch.arange(16))
    for cls, term in ((SDDDKD, "dkd"), (SDDNKD, "nkd")):
        full = float(cls()(s, t, batch, 20)[term])
        assert float(cls()(s, t, batch, 1)[term]) == pytest.approx(full / 20, rel=1e-6)
        assert float(cls()(s, t, batch, 100)[term]) == pytest.approx(full, rel=1e-6)
        assert float(cls(warmup=0)(s, t, batch, 1)[term]) == pytest.approx(full, rel=1e-6)
    rs, rt = multi_scale_logits(ms, head), multi_scale_logits(mt, head)
    fixed = SDDNKD(fix_non_target_mask=True)(s, t, batch, 20)["nkd"]
    assert float(fixed) == pytest.approx(float(sdd_nkd_loss(rs, rt, y, 4.0, 8.0, fix_non_target_mask=True)), rel=1e-6)
    # SDD-KD has no warm-up (the official SDD_KD ignores --warmup)
    assert float(SDDKD()(s, t, batch, 1)["kd"]) == pytest.approx(float(SDDKD()(s, t, batch, 50)["kd"]))


def test_bad_values_name_the_setting():
    for bad in ([2, 4], [1, 3], [], [1, 4, 2]):
        with pytest.raises(ConfigError, match=r"distill\.scales"):
            SDDKD(scales=bad)
    with pytest.raises(ConfigError, match=r"distill\.temperature"):
        SDDNKD(temperature=0)
    with pytest.raises(ConfigError, match=r"distill\.tau"):
        DIST(tau=0)
    with pytest.raises(ConfigError, match=r"distill\.l"):
        WTTM(l=0)
    with pytest.raises(ConfigError, match=r"distill\.temperature"):
        NKD(temperature=-1)


def test_logit_transform_feeds_the_distillation_terms_only():
    zs, zt, y, _, _ = realistic(3)
    batch = Batch(None, y, torch.arange(16))
    s, t = ModelOutput(zs), ModelOutput(zt)
    ss, st = standardize(zs), standardize(zt)
    for method in ("dist", "nkd", "ttm", "wttm"):
        strat = STRATEGIES[method]()
        strat.logit_transform = Standardize()
        got = strat(s, t, batch, 1)
        want = expected_terms(method, strat, ModelOutput(ss), ModelOutput(st), y, 1)
        want["ce"] = strat.w_ce * F.cross_entropy(zs, y)  # the CE stays on the raw logits
        assert close(got, want, rel=1e-6), method
        assert not close(got, expected_terms(method, strat, s, t, y, 1), rel=1e-3), method


# --------------------------------------------------------------------------- configs with every DKD-table pair
SDD_RECIPES = {  # (method, pair) -> values from the official configs and run scripts (see the recipe files)
    ("sdd_kd", "res32x4_res8x4"): {"scales": [1, 2]}, ("sdd_kd", "vgg13_vgg8"): {"scales": [1, 2]},
    ("sdd_kd", "wrn40_2_wrn16_2"): {"scales": [1, 2, 4]},
    ("sdd_dkd", "res32x4_res8x4"): {"beta": 8.0, "scales": [1, 2, 4]},
    ("sdd_dkd", "vgg13_vgg8"): {"beta": 6.0, "scales": [1, 2]}, ("sdd_dkd", "res56_res20"): {"beta": 2.0},
    ("sdd_dkd", "wrn40_2_wrn16_2"): {"beta": 6.0}, ("sdd_dkd", "res32x4_shuv1"): {"beta": 8.0},
    ("sdd_nkd", "res32x4_res8x4"): {"gamma": 8.0, "scales": [1, 2]}, ("sdd_nkd", "vgg13_mv2"): {"gamma": 6.0},
    ("sdd_nkd", "vgg13_vgg8"): {"gamma": 6.0, "scales": [1, 2]}, ("sdd_nkd", "res110_res32"): {"gamma": 2.0},
    ("sdd_nkd", "wrn40_2_wrn16_2"): {"gamma": 6.0, "scales": [1, 2, 4], "temperature": 4.0, "warmup": 20},
}


@pytest.mark.parametrize("method", sorted(TERMS))
def test_every_config_composes_with_every_dkd_pair(tmp_path, method):
    assert len(PAIRS) == 11
    for pair in PAIRS:
        cfg = compose_cfg([f"experiment=cifar100/dkd/{pair}", f"distill={method}"], tmp_path)
        validate(cfg)
        assert cfg.method == method and cfg.trainer.max_epochs == 240 and cfg.module._target_.endswith("DistillModule")
        for key, value in SDD_RECIPES.get((method, pair), {}).items():
            assert cfg.distill[key] == value, (pair, key)
    # the method's config changes nothing but the distill node (checked on one pair against its DKD run)
    dkd = compose_cfg(["experiment=cifar100/dkd/vgg13_mv2"], tmp_path)
    cfg = compose_cfg(["experiment=cifar100/dkd/vgg13_mv2", f"distill={method}"], tmp_path)
    assert all(cfg[k] == dkd[k] for k in ("model", "teacher", "optim", "scheduler", "data", "trainer"))


def test_defaults_are_the_official_cifar_values(tmp_path):
    d = {m: compose_cfg([f"distill={m}"], tmp_path).distill for m in TERMS}
    assert (d["dist"].beta, d["dist"].gamma, d["dist"].tau, d["dist"].w_ce, d["dist"].w_dist) == (1, 1, 4, 1, 2)
    assert (d["nkd"].temperature, d["nkd"].gamma, d["nkd"].w_ce) == (3.0, 3.5, 1.0)
    assert (d["ttm"].l, d["ttm"].beta, d["wttm"].l, d["wttm"].beta, d["ttm"].w_ce) == (0.1, 45, 0.2, 4, 1)
    assert (d["sdd_kd"].temperature, d["sdd_kd"].w_ce, d["sdd_kd"].w_kd, list(d["sdd_kd"].scales)) == (4, 0.1, 0.9,
                                                                                                      [1, 2, 4])
    k = d["sdd_dkd"]
    assert (k.alpha, k.beta, k.temperature, k.w_ce, k.warmup, list(k.scales)) == (1, 8, 4, 1, 20, [1, 2, 4])
    n = d["sdd_nkd"]
    assert (n.temperature, n.gamma, n.w_ce, n.warmup, n.fix_non_target_mask) == (4, 8, 1, 20, False)


# --------------------------------------------------------------------------- the LS protocol
# pair -> (KD τ, KD w), (DKD τ, α, β): sunshangquan/logit-standardization-KD logs (see kdx/distill/ls.py)
LS = {
    "res32x4_res8x4": ((2, 9), (2, 9, 72)), "res32x4_shuv2": ((2, 9), (2, 9, 72)), "vgg13_vgg8": ((3, 9), (2, 15, 30)),
    "res110_res32": ((2, 9), (2, 15, 30)), "res50_mv2": ((3, 1), (2, 15, 30)), "wrn40_2_wrn16_2": ((2, 9), (2, 12, 24)),
    "wrn40_2_wrn40_1": ((2, 9), (2, 12, 24)), "res56_res20": ((2, 9), (3, 18, 36)), "vgg13_mv2": ((3, 9), (3, 9, 18)),
}


def test_ls_experiments_are_the_covered_dkd_pairs():
    assert sorted(p.stem for p in (CONF / "experiment" / "cifar100" / "ls").glob("*.yaml")) == sorted(LS)
    assert set(LS) <= set(PAIRS) and set(PAIRS) - set(LS) == {"res32x4_shuv1", "wrn40_2_shuv1"}  # no LS logs


@pytest.mark.parametrize("pair", sorted(LS))
def test_ls_experiments_compose_and_carry_the_paper_weights(tmp_path, pair):
    (kt, kw), (dt, da, db) = LS[pair]
    exp = f"experiment=cifar100/ls/{pair}"
    kd_ls = compose_cfg([exp, "distill=kd", "distill/logit_transform=ls"], tmp_path)
    validate(kd_ls)
    assert kd_ls.method == "kd+ls" and kd_ls.distill.logit_transform._target_ == "kdx.distill.ls.Standardize"
    assert (kd_ls.distill.temperature, kd_ls.distill.w_ce, kd_ls.distill.w_kd) == (kt, 0.1, kw)
    dkd_ls = compose_cfg([exp, "distill/logit_transform=ls"], tmp_path)
    validate(dkd_ls)
    assert dkd_ls.method == "dkd+ls" and dkd_ls.distill._target_ == "kdx.distill.dkd.DKD"
    d = dkd_ls.distill
    assert (d.temperature, d.alpha, d.beta, d.w_ce, d.warmup) == (dt, da, db, 1.0, 20)
    assert {"kd_ls", "dkd_ls", "dkd"} <= set(dkd_ls.paper)
    # the protocol is the DKD table's: pair, budget, LR (0.01 for MobileNetV2/ShuffleNet students), teacher recipe
    assert kd_ls.optim == dkd_ls.optim and kd_ls.trainer.max_epochs == 240 and kd_ls.data.batch_size == 64
    assert kd_ls.optim.lr == (0.01 if pair.endswith(("mv2", "shuv2")) else 0.05)
    assert kd_ls.teacher.train.optim == (None if kd_ls.optim.lr == 0.05 else kd_ls.teacher.train.optim)
    if kd_ls.optim.lr == 0.01:
        assert kd_ls.teacher.train.optim.lr == 0.05  # a missing teacher trains at the protocol's LR


def test_ls_protocol_against_the_dkd_table_and_without_the_transform(tmp_path):
    base = compose_cfg(["experiment=cifar100/dkd/res50_mv2"], tmp_path)
    for extra in (["distill=kd"], ["distill=kd", "distill/logit_transform=ls"], []):
        cfg = compose_cfg(["experiment=cifar100/ls/res50_mv2", *extra], tmp_path)
        assert all(cfg[k] == base[k] for k in ("model", "teacher", "optim", "scheduler", "data", "trainer"))
    kd = compose_cfg(["experiment=cifar100/ls/res50_mv2", "distill=kd"], tmp_path)  # the paper's weights, raw logits
    assert kd.method == "kd" and kd.distill.logit_transform is None and (kd.distill.temperature, kd.distill.w_kd) == (
        3.0, 1.0)
    plain = compose_cfg(["experiment=cifar100/dkd/res50_mv2", "distill=kd"], tmp_path).distill  # mdistiller's KD
    assert (plain.temperature, plain.w_kd) == (4.0, 0.9)


def test_kd_ls_run_standardises_the_kd_term_and_not_the_ce(tmp_path, teacher_ckpt):
    overrides = ["experiment=cifar100/ls/res32x4_res8x4", "distill=kd", "distill/logit_transform=ls",
                 f"teacher.ckpt={teacher_ckpt}"]
    job, s, t, y, terms = captured_step(tmp_path, overrides)
    strat = job.module.strategy
    assert job.cfg.model.name == "resnet8" and (strat.temperature, strat.w_ce, strat.w_kd) == (2.0, 0.1, 9.0)
    zs, zt = s.logits, t.logits
    assert float(terms["kd"]) == pytest.approx(9.0 * float(kd_loss(standardize(zs), standardize(zt), 2.0)), rel=1e-6)
    assert float(terms["ce"]) == pytest.approx(0.1 * float(F.cross_entropy(zs, y)), rel=1e-6)
    assert float(terms["kd"]) != pytest.approx(9.0 * float(kd_loss(zs, zt, 2.0)), rel=1e-3)
    assert float(terms["ce"]) != pytest.approx(0.1 * float(F.cross_entropy(standardize(zs), y)), rel=1e-3)
    # and DKD+LS on the same protocol: standardised before T and the target mask
    job, s, t, y, terms = captured_step(tmp_path, [overrides[0], *overrides[2:]], 25, name="dkd")
    tckd, nckd = dkd_terms(standardize(s.logits), standardize(t.logits), y, 2.0)
    assert float(terms["tckd"]) == pytest.approx(9.0 * float(tckd), rel=1e-6)
    assert float(terms["nckd"]) == pytest.approx(72.0 * float(nckd), rel=1e-6)
