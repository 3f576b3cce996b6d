"""MLKD strategies (distill=mlkd with the strong view, distill=mlkd_weak without): official numbers of the variants,
multi-view batches, deterministic strong views, exact resume, the cache refusal, and the recipes."""
from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import TINY, compose_cfg
from kdx.config import validate
from kdx.data.augment import normalize
from kdx.data.strong_augment import strong_view
from kdx.distill.base import Batch, ModelOutput
from kdx.distill.ls import Standardize
from kdx.distill.mlkd import MLKD, MLKDWeak, mlkd_loss
from kdx.errors import ConfigError
from kdx.run import build_job, run

PAIRS = ["res56_res20", "res110_res32", "res32x4_res8x4", "wrn40_2_wrn16_2", "wrn40_2_wrn40_1", "vgg13_vgg8",
         "res32x4_shuv1", "res32x4_shuv2", "wrn40_2_shuv1", "vgg13_mv2", "res50_mv2"]
MLKD_TERMS = {"ce", "kd_weak", "kd_strong", "kd_weak_repeat", "cc", "bc"}


def _inputs(seed: int, b: int, c: int, teacher_scale: float = 3.0):
    """Same draws as tests/test_mlkd_math.py: student weak/strong, teacher weak/strong logits, labels."""
    g = torch.Generator().manual_seed(seed)
    sw = torch.randn(b, c, generator=g) * 2
    ss = torch.randn(b, c, generator=g) * 2
    tw = torch.randn(b, c, generator=g) * teacher_scale
    ts = torch.randn(b, c, generator=g) * teacher_scale
    y = torch.randint(0, c, (b,), generator=g)
    return sw, ss, tw, ts, y


def _f64(*ts):
    return tuple(t.double() if t.is_floating_point() else t for t in ts)


def _outputs(sw, ss, tw, ts, y, views: bool = True):
    batch = Batch(torch.zeros(len(y), 3, 2, 2), y, torch.arange(len(y)))
    return (ModelOutput(sw, views={"strong": ss} if views else {}),
            ModelOutput(tw, views={"strong": ts} if views else {}), batch)


# ---------------------------------------------------------------- official numbers of the variants
# zju-SWJ/RLD @ 8b6cf602dd48a0e5cd93ea3ea2c32ef460a4e5c2 (unchanged at d54578f), mdistiller/distillers/MLKD_NOAUG.py,
# MLKD_NOAUG.forward_train with cfg.KD = (T 4, CE 0.1, KD 0.9), LOGIT_STAND False, the student and teacher replaced by
# modules returning the weak logits of _inputs(seed, B, C) cast to float64; total = sum of the losses_dict values.
NOAUG = {
    (0, 8, 10): dict(ce=0.3687408857456999, kd=9.44258031078307, cc=0.0572007753472992, bc=0.021018050821953623,
                     total=9.889540022698023),
    (1, 7, 10): dict(ce=0.33026411324210064, kd=13.665720751118736, cc=0.12124832108186152, bc=0.11146073606371369,
                     total=14.22869392150641),
    (4, 5, 3): dict(ce=0.29669568258309187, kd=17.877804768905314, cc=1.4425390152585547, bc=0.14686826626377358,
                    total=19.763907733010733),
}
# sunshangquan/logit-standardization-KD @ f6e5aa5172bad618e801163c3385322eea673754, mdistiller/distillers/MLKD.py,
# MLKD.forward_train with cfg.KD = (T 4, CE 0.1, KD 0.9) and EXPERIMENT.LOGIT_STAND True, same inputs (weak and
# strong views); ce, cc and bc equal the unstandardised official KD_ours values (tests/test_mlkd_math.py).
LS_MLKD = {
    (0, 8, 10): dict(ce=0.6634577295561312, kd=6.0635101570291665, cc=0.0572007753472992, bc=0.021018050821953623,
                     total=6.8051867127545504),
    (1, 7, 10): dict(ce=0.6938275512107851, kd=7.007585352587194, cc=0.12124832108186152, bc=0.11146073606371369,
                     total=7.934121960943554),
    (4, 5, 3): dict(ce=0.4630816364113809, kd=6.258687379605003, cc=1.4425390152585547, bc=0.14686826626377358,
                    total=8.311176297538712),
}


@pytest.mark.parametrize("key", list(NOAUG))
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_mlkd_weak_is_rlds_mlkd_noaug(key, dtype, rtol):
    sw, _, tw, _, y = (t.to(dtype) if t.is_floating_point() else t for t in _inputs(*key))
    terms = MLKDWeak().loss_terms(*_outputs(sw, None, tw, None, y, views=False), epoch=1)
    assert set(terms) == {"ce", "kd_weak", "cc", "bc"} and all(v.dtype == dtype for v in terms.values())
    got = dict(ce=terms["ce"], kd=terms["kd_weak"], cc=terms["cc"], bc=terms["bc"], total=sum(terms.values()))
    for k, v in NOAUG[key].items():
        assert got[k].item() == pytest.approx(v, rel=rtol), k


@pytest.mark.parametrize("key", list(LS_MLKD))
def test_mlkd_with_ls_is_the_ls_repositorys_mlkd(key):
    sw, ss, tw, ts, y = _f64(*_inputs(*key))
    terms = MLKD(logit_transform=Standardize()).loss_terms(*_outputs(sw, ss, tw, ts, y), epoch=1)
    got = dict(ce=terms["ce"], kd=terms["kd_weak"] + terms["kd_strong"] + terms["kd_weak_repeat"], cc=terms["cc"],
               bc=terms["bc"], total=sum(terms.values()))
    for k, v in LS_MLKD[key].items():
        assert got[k].item() == pytest.approx(v, rel=1e-12), k
    # LS reaches the KD terms only: the CE, the correlation terms and the masks see the raw logits
    plain = MLKD().loss_terms(*_outputs(sw, ss, tw, ts, y), epoch=1)
    assert all(torch.equal(terms[k], plain[k]) for k in ("ce", "cc", "bc"))
    assert not torch.allclose(terms["kd_weak"], plain["kd_weak"])


def test_mlkd_strategy_terms_sum_to_the_official_total():
    # Jin-Ying/Multi-Level-Logit-Distillation @ 5ee473f, KD_ours.forward_train on _inputs(0, 8, 10) in float64:
    # total 31.033930223310985 (tests/test_mlkd_math.py, OFFICIAL[(0, 8, 10)])
    sw, ss, tw, ts, y = _f64(*_inputs(0, 8, 10))
    terms = MLKD().loss_terms(*_outputs(sw, ss, tw, ts, y), epoch=1)
    assert set(terms) == MLKD_TERMS
    assert sum(terms.values()).item() == pytest.approx(31.033930223310985, rel=1e-12)
    assert terms["ce"].item() == pytest.approx(0.1 * (F.cross_entropy(sw, y) + F.cross_entropy(ss, y)).item())


# ---------------------------------------------------------------- through the real config
def _capture(monkeypatch, cls, store: list, tag=None):
    """Record (tag, epoch, student out, teacher out, batch, terms) of every training step of ``cls``."""
    original = cls.loss_terms

    def recording(self, student, teacher, batch, epoch):
        terms = original(self, student, teacher, batch, epoch)
        detached = {k: v.detach() for k, v in terms.items()}
        store.append((tag() if tag else None, epoch, student, teacher, batch, detached))
        return terms

    monkeypatch.setattr(cls, "loss_terms", recording)


def test_mlkd_multi_view_batches_and_terms(tmp_path, teacher_ckpt, monkeypatch, one_thread):
    steps: list = []
    _capture(monkeypatch, MLKD, steps)
    job = build_job(compose_cfg(TINY + ["distill=mlkd", f"teacher.ckpt={teacher_ckpt}", "logger=csv"], tmp_path))
    job.trainer.fit(job.module, datamodule=job.datamodule)
    dm, teacher = job.datamodule, job.module.teacher
    labels = dm.train_labels()
    assert len(steps) == 4  # 128 samples, batches of 32
    for _, epoch, s, t, batch, terms in steps:
        x, y, idx = batch.x, batch.y, batch.idx
        assert set(batch.views) == {"strong"} and batch.views["strong"].shape == x.shape
        # both views are of sample idx, with its label: rebuilt from the stored uint8 images by index
        raw = dm.train_dataset.x[idx]
        assert torch.equal(y, labels[idx])
        assert torch.equal(x, dm.transform_batch((raw, y, idx), train=True, epoch=epoch - 1)[0])
        strong = normalize(strong_view(raw, dm.seed, epoch - 1, idx, dm.pad), dm.mean, dm.std)
        assert torch.equal(batch.views["strong"], strong) and not torch.equal(strong, x)
        # each network saw the strong view: the teacher's logits on it are recomputed here
        with torch.no_grad():
            assert torch.allclose(teacher(strong, y, idx).logits, t.views["strong"], rtol=1e-5, atol=1e-5)
        # the strategy's terms are the pure function of the captured logits
        _, want = mlkd_loss(s.logits, s.views["strong"], t.logits, t.views["strong"], y)
        assert set(terms) == MLKD_TERMS and all(torch.equal(terms[k], want[k].detach()) for k in want)
    header = next(csv.reader(open(next((tmp_path / "run").rglob("metrics.csv")))))
    assert {h[len("train/loss/"):] for h in header if h.startswith("train/loss/")} == MLKD_TERMS


def test_strong_views_deterministic_per_epoch_and_resume_exact(tmp_path, teacher_ckpt, monkeypatch, one_thread):
    """Two runs see the same strong pixels for the same (seed, epoch, idx), another epoch other pixels; 2 epochs
    straight and 1 epoch + resume give bit-identical weights (CPU, trainer.deterministic=true)."""
    steps: list = []
    current = {"tag": None}
    _capture(monkeypatch, MLKD, steps, tag=lambda: current["tag"])
    common = TINY + ["distill=mlkd", "trainer.deterministic=true", "scheduler.milestones=[1]", "seed=7",
                     f"teacher.ckpt={teacher_ckpt}"]
    current["tag"] = "straight"
    run(compose_cfg(common + ["trainer.max_epochs=2"], tmp_path, name="straight"))
    current["tag"] = "part"
    run(compose_cfg(common + ["trainer.max_epochs=1"], tmp_path, name="part"))
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    current["tag"] = "resumed"
    resumed = run(compose_cfg(common + ["trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path, name="part"))
    assert resumed["epochs_done"] == 2
    a = torch.load(tmp_path / "straight" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "student.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def views(tag: str, epoch: int) -> dict[int, torch.Tensor]:
        return {int(i): v for t, e, _, _, batch, _ in steps if t == tag and e == epoch
                for i, v in zip(batch.idx, batch.views["strong"])}

    s1, s2, p1, r2 = views("straight", 1), views("straight", 2), views("part", 1), views("resumed", 2)
    assert len(s1) == len(s2) == 128 and p1.keys() == s1.keys() and r2.keys() == s2.keys()
    assert all(torch.equal(p1[i], s1[i]) for i in s1) and all(torch.equal(r2[i], s2[i]) for i in s2)
    assert all(not torch.equal(s1[i], s2[i]) for i in s1)


def test_teacher_logit_cache_is_refused_for_mlkd(tmp_path, teacher_ckpt):
    cfg = compose_cfg(TINY + ["distill=mlkd", "teacher_cache=augmented", f"teacher.ckpt={teacher_ckpt}"], tmp_path)
    with pytest.raises(ConfigError, match=r"teacher_cache=augmented: MLKD .*strong.*Set teacher_cache=off"):
        build_job(cfg)
    # the single-view variant is a plain logit method: the cache serves it
    build_job(compose_cfg(TINY + ["distill=mlkd_weak", "teacher_cache=augmented", f"teacher.ckpt={teacher_ckpt}"],
                          tmp_path, name="weak"))


def test_mlkd_weak_runs_on_one_view(tmp_path, teacher_ckpt, monkeypatch, one_thread):
    steps: list = []
    _capture(monkeypatch, MLKDWeak, steps)
    res = run(compose_cfg(TINY + ["distill=mlkd_weak", f"teacher.ckpt={teacher_ckpt}", "logger=csv"], tmp_path))
    assert res["status"] == "complete" and res["method"] == "mlkd_weak" and steps
    for _, _, s, t, batch, terms in steps:
        assert batch.views == {} and s.views == {} and t.views == {}
        _, full = mlkd_loss(s.logits, s.logits, t.logits, t.logits, batch.y)
        assert all(torch.equal(terms[k], full[k].detach()) for k in ("kd_weak", "cc", "bc"))
        assert torch.equal(terms["ce"], 0.1 * F.cross_entropy(s.logits.detach(), batch.y))
    header = next(csv.reader(open(next((tmp_path / "run").rglob("metrics.csv")))))
    assert {h[len("train/loss/"):] for h in header if h.startswith("train/loss/")} == {"ce", "kd_weak", "cc", "bc"}


def test_ls_composes_with_mlkd(tmp_path):
    for name in ("mlkd", "mlkd_weak"):
        cfg = compose_cfg([f"distill={name}", "distill/logit_transform=ls"], tmp_path)
        validate(cfg)
        assert cfg.method == f"{name}+ls" and isinstance(instantiate(cfg.distill).logit_transform, Standardize)


# ---------------------------------------------------------------- configs and recipes
# Jin-Ying/Multi-Level-Logit-Distillation @ 5ee473f configs/cifar100/ours/<pair>.yaml: (lr, epochs)
OFFICIAL_RECIPES = {
    "res56_res20": (0.025, 240), "res110_res32": (0.025, 240), "res32x4_res8x4": (0.025, 240),
    "wrn40_2_wrn16_2": (0.025, 240), "wrn40_2_wrn40_1": (0.025, 240), "vgg13_vgg8": (0.025, 240),
    "res50_mv2": (0.01, 480), "vgg13_mv2": (0.01, 480), "wrn40_2_shuv1": (0.01, 480),
    "res32x4_shuv1": (0.01, 960), "res32x4_shuv2": (0.01, 960),
}


@pytest.mark.parametrize("name", ["mlkd", "mlkd_weak"])
def test_every_dkd_table_pair_composes(tmp_path, name):
    for pair in PAIRS:
        cfg = compose_cfg([f"experiment=cifar100/dkd/{pair}", f"distill={name}"], tmp_path)
        validate(cfg)
        assert cfg.method == name and (cfg.distill.temperature, cfg.distill.w_ce, cfg.distill.w_kd) == (4.0, 0.1, 0.9)


def test_mlkd_experiments_are_the_official_recipes(tmp_path):
    assert set(OFFICIAL_RECIPES) == set(PAIRS)
    for pair, (lr, epochs) in OFFICIAL_RECIPES.items():
        cfg = compose_cfg([f"experiment=cifar100/mlkd/{pair}"], tmp_path)
        validate(cfg)
        assert cfg.distill._target_ == "kdx.distill.mlkd.MLKD" and cfg.method == "mlkd"
        assert (cfg.optim.lr, cfg.trainer.max_epochs, cfg.data.batch_size) == (lr, epochs, 64)
        assert list(cfg.scheduler.milestones) == [150, 180, 210] and cfg.optim.weight_decay == 5e-4
        base = compose_cfg([f"experiment=cifar100/dkd/{pair}"], tmp_path)
        assert (cfg.model.name, cfg.teacher.model.name) == (base.model.name, base.teacher.model.name)
        weak = compose_cfg([f"experiment=cifar100/mlkd_weak/{pair}"], tmp_path)
        validate(weak)
        assert weak.distill._target_ == "kdx.distill.mlkd.MLKDWeak" and weak.method == "mlkd_weak"
        assert (weak.optim.lr, weak.trainer.max_epochs) == (base.optim.lr, 240) and weak.optim.lr in (0.05, 0.01)
    assert compose_cfg(["experiment=cifar100/mlkd/res32x4_res8x4"], tmp_path).paper.mlkd == 77.08
    assert compose_cfg(["experiment=cifar100/mlkd/wrn40_2_wrn16_2"], tmp_path).paper.mlkd == 76.63
