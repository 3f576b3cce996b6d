"""W&B: run identity (group/name/job type/tags), what a run sends to W&B (config, results, curves, images), and the
W&B sweep config.

What kdx sends is checked at W&B's API: ``wandb.init`` is replaced by a recording run (:class:`RecordedRun`), so
the tests see the arguments, config updates, logged values, summary and metric definitions that kdx and
Lightning's ``WandbLogger`` hand to W&B, through the real ``python -m kdx`` path, without W&B's storage format.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write

from conftest import ROOT, TINY, compose_cfg
from kdx.config import validate
from kdx.loggers import SweepInfo, hydra_sweep, wandb_identity
from kdx.run import run

SWEEP_YAML = ROOT / "conf" / "wandb_sweep" / "dkd_cifar100.yaml"


# ------------------------------------------------------------------------------------ recording what W&B receives


class RecordedRun:
    """Stands in for ``wandb.init``'s run: records everything a run is given."""

    def __init__(self, **init: Any) -> None:
        self.init, self.id, self.name = init, "rec", init.get("name")
        self.config: dict[str, Any] = _Config()
        self.summary: dict[str, Any] = {}
        self.logged: list[dict[str, Any]] = []
        self.metrics: dict[str, dict[str, Any]] = {}
        self.exit_code = None

    def define_metric(self, name: str, step_metric: str | None = None, summary: str | None = None, **_: Any) -> None:
        self.metrics[name] = {"step_metric": step_metric, "summary": summary}

    def log(self, data: dict[str, Any], *_: Any, **__: Any) -> None:
        self.logged.append(dict(data))

    def finish(self, exit_code: int = 0, **_: Any) -> None:
        self.exit_code = exit_code

    def keys(self) -> set[str]:
        return {k for row in self.logged for k in row}


class _Config(dict):
    def update(self, values: dict[str, Any], allow_val_change: bool = False) -> None:  # wandb's Config.update
        dict.update(self, values)


@pytest.fixture
def wandb_runs(monkeypatch, tmp_path) -> list[RecordedRun]:
    """Every run ``wandb.init`` starts, in order."""
    import wandb

    runs: list[RecordedRun] = []

    def init(**kwargs: Any) -> RecordedRun:
        runs.append(RecordedRun(**kwargs))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return runs


WANDB = [o for o in TINY if not o.startswith("logger")] + ["logger=wandb", "logger.mode=offline"]


# ------------------------------------------------------------------------------------ identity


INFO = {"method": "dkd", "dataset": "cifar100", "pair": "resnet32x4-resnet8x4", "seed": 3}


def test_identity_of_a_single_run():
    ident = wandb_identity(INFO, {"tags": []}, None)
    assert ident == {"group": "cifar100/resnet32x4-resnet8x4", "name": "dkd-resnet32x4-resnet8x4-seed3",
                     "job_type": "dkd", "tags": ["cifar100", "resnet32x4-resnet8x4", "dkd"]}


def test_identity_in_a_sweep_and_user_settings_win():
    sweep = SweepInfo(dir="multirun/2026-11-25/07-43-11", job=4)
    ident = wandb_identity(INFO, {"tags": ["mine", "dkd"]}, sweep)
    assert ident["group"] == "multirun/2026-11-25/07-43-11" and ident["name"] == "dkd-resnet32x4-resnet8x4-seed3-job4"
    assert ident["job_type"] == "dkd" and ident["tags"] == ["mine", "dkd", "cifar100", "resnet32x4-resnet8x4"]
    agent = wandb_identity(INFO, {}, None, agent_run="x1y2")  # a run started by `wandb agent`
    assert agent["name"] == "dkd-resnet32x4-resnet8x4-seed3-x1y2" and agent["group"] == "cifar100/resnet32x4-resnet8x4"
    mine = wandb_identity(INFO, {"group": "g", "name": "n", "job_type": "j", "tags": []}, sweep)
    assert (mine["group"], mine["name"], mine["job_type"]) == ("g", "n", "j")
    # W&B refuses a tag over 64 characters (the run would not start): long pairs are shortened, still distinct
    long_pair = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k-timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    tags = wandb_identity(dict(INFO, pair=long_pair), {}, None)["tags"]
    assert all(len(t) <= 64 for t in tags) and tags[1].startswith("timm/vit_base") and tags[1] != long_pair[:64]
    long_sweep = SweepInfo(dir="multirun/" + ",".join(f"distill.beta={b}" for b in range(40)), job=0)
    group = wandb_identity(INFO, {}, long_sweep)["group"]
    assert len(group) == 128 and group.startswith("multirun/distill.beta=0,")


def test_hydra_sweep_from_the_hydra_config(tmp_path):
    cfg = compose_cfg(list(TINY), tmp_path)
    assert hydra_sweep() is None  # a single run
    _as_sweep_job(cfg, ROOT / "multirun" / "2026-11-25" / "07-43-11", 2)
    assert hydra_sweep() == SweepInfo(dir="multirun/2026-11-25/07-43-11", job=2)  # relative to the project root
    _as_sweep_job(cfg, tmp_path / "sweeps" / "a", 2)
    assert hydra_sweep() == SweepInfo(dir=(tmp_path / "sweeps" / "a").as_posix(), job=2)  # elsewhere: as given


# ------------------------------------------------------------------------------------ what a run sends


def _as_sweep_job(cfg, folder: Path, num: int) -> None:
    with read_write(cfg.hydra), open_dict(cfg):
        cfg.hydra.mode, cfg.hydra.sweep.dir, cfg.hydra.job.num = RunMode.MULTIRUN, str(folder), num
    HydraConfig.instance().set_config(cfg)


def test_sweep_jobs_share_a_group_named_after_the_sweep(tmp_path, wandb_runs, teacher_ckpt):
    """Two jobs of one Hydra sweep (their Hydra config in multirun mode): one W&B group, the sweep's folder."""
    sweep = tmp_path / "multirun" / "s"
    for num, method in enumerate(("none", "dkd")):
        cfg = compose_cfg(WANDB + [f"distill={method}", f"teacher.ckpt={teacher_ckpt}"], tmp_path, f"job{num}")
        _as_sweep_job(cfg, sweep, num)
        run(cfg)
    assert [r.init["group"] for r in wandb_runs] == [sweep.as_posix()] * 2
    assert [r.init["name"] for r in wandb_runs] == ["none-resnet8-seed0-job0", "dkd-resnet8-resnet8-seed0-job1"]
    assert [r.init["job_type"] for r in wandb_runs] == ["none", "dkd"]
    assert wandb_runs[1].init["tags"] == ["synthetic", "resnet8-resnet8", "dkd"]
    assert [r.exit_code for r in wandb_runs] == [0, 0]  # each finished, so the next job in a process starts its own


def test_run_sends_config_results_and_curves(tmp_path, wandb_runs, teacher_ckpt):
    results = run(compose_cfg(WANDB + ["distill=dkd", f"teacher.ckpt={teacher_ckpt}"], tmp_path))
    (r,) = wandb_runs
    assert r.init["mode"] == "offline" and r.init["group"] == "synthetic/resnet8-resnet8"
    # the resolved config (no interpolation left), as results.json records it
    assert r.config["distill"] == results["config"]["distill"] and r.config["distill"]["beta"] == 8.0
    assert r.config["paths"]["output_dir"] == str(tmp_path / "run")
    # results.json in the summary: every field but the config and the history (which goes as a table)
    for key in ("test_acc1_best", "test_acc1_last", "val_acc1_best", "teacher_acc1", "best_epoch", "seed", "method",
                "pair", "resources", "data", "teacher_info", "budget"):
        assert r.summary[key] == results[key], key
    assert "config" not in r.summary and "history" not in r.summary
    import wandb

    (table,) = [row["history"] for row in r.logged if "history" in row]
    assert isinstance(table, wandb.Table) and len(table.data) == len(results["history"])
    assert {"train/loss", "train/loss/ce", "train/loss/tckd", "train/loss/nckd", "val/acc1", "test/acc1",
            "teacher/acc1"} <= r.keys()
    assert r.metrics["val/acc1"]["summary"] == "max,last"  # accuracy is read at its best, not only its last


def test_reffakd_heatmap_is_logged_once_at_the_start_of_distillation(tmp_path, wandb_runs):
    ae = ["teacher.ae.epochs=1", "teacher.ae.milestones=[1]", "teacher.ae.samples_per_class=2"]
    run(compose_cfg(WANDB + ["distill=reffakd"] + ae, tmp_path))
    stage_a, distil = wandb_runs  # stage A (built first: the table was missing) logs to its own run
    assert stage_a.init["job_type"] == "reffakd_ae" and distil.init["job_type"] == "reffakd"
    import wandb

    images = [row["reffakd/similarity"] for row in distil.logged if "reffakd/similarity" in row]
    assert len(images) == 1 and isinstance(images[0][0], wandb.Image)


def test_datafree_synthetic_grids_reach_wandb(tmp_path, wandb_runs, teacher_ckpt):
    from test_nayer import NAYER_TINY

    run(compose_cfg(WANDB + NAYER_TINY + [f"teacher.ckpt={teacher_ckpt}", "trainer.max_epochs=2"], tmp_path))
    (r,) = wandb_runs
    assert sum("datafree/synthetic" in row for row in r.logged) == 2  # one grid per epoch
    assert {"train/gen/loss_epoch", "train/loss/kd"} <= r.keys()


# ------------------------------------------------------------------------------------ the W&B sweep config


def _sample(spec: dict[str, Any], rng: random.Random) -> Any:
    """One value of a W&B sweep parameter, as a random search would draw it."""
    if "values" in spec:
        return rng.choice(spec["values"])
    if "value" in spec:
        return spec["value"]
    return rng.uniform(float(spec["min"]), float(spec["max"]))


def agent_command(sweep: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """The command line ``wandb agent`` runs for these values (W&B's own argument formats, its macro rule:
    a ``${name}`` element becomes that list, or nothing when the name is unknown)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep.get("program", "")])
    out: list[str] = []
    for part in create_sweep_command(list(sweep["command"])):
        part = str(part)
        out += (macros.get(part[2:-1]) or []) if part.startswith("${") and part.endswith("}") else [part]
    return out


def test_wandb_sweep_config_drives_python_m_kdx(tmp_path, monkeypatch):
    sweep = yaml.safe_load(SWEEP_YAML.read_text())
    assert sweep["method"] in ("bayes", "random", "grid") and sweep["metric"]["goal"] == "maximize"
    assert (ROOT / sweep["program"]).is_file()
    values = {k: _sample(v, random.Random(0)) for k, v in sweep["parameters"].items()}
    command = agent_command(sweep, values)
    assert command[:4] == ["/usr/bin/env", "python", "-m", "kdx"]
    overrides = command[4:]
    assert {f"{k}={v}" for k, v in values.items()} <= set(overrides) and not any(o.startswith("-") for o in overrides)
    # Hydra composes exactly these overrides with the real config; kdx's own validation accepts it
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "run7")
    cfg = compose_cfg(overrides, tmp_path)
    validate(cfg)
    for key, value in values.items():
        assert float(_select(cfg, key)) == float(value), key
    assert cfg.method == "dkd" and cfg.model.name == "resnet8x4" and cfg.teacher.model.name == "resnet32x4"
    assert cfg.logger.mode == "online" and cfg.data.val_split == 5000
    assert cfg.hydra.run.dir == "outputs/wandb_sweep/sw1/run7"  # one folder per W&B run, even for parallel agents
    # every swept key exists in the config without the sweep's values, and the metric is one kdx puts in the summary
    plain = compose_cfg([o for o in overrides if o.split("=", 1)[0] not in values], tmp_path, "plain")
    assert all(_select(plain, k) is not None for k in values)
    assert sweep["metric"]["name"] == "val_acc1_best"  # a results.json field, which kdx puts in the summary


def _select(cfg, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key)
