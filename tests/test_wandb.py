"""W&B: run identity (group/name/job type/tags), what an offline run holds, images, and the W&B sweep config.

W&B 0.31 writes an offline run as one transaction log, ``<run>/wandb/offline-run-*/run-<id>.wandb`` (no
``wandb-summary.json`` or ``config.yaml`` until ``wandb sync``), plus media files under ``files/media``.
:func:`read_offline_run` reads that log with W&B's own protobuf records, so the tests see what a sync uploads.
"""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, TINY, compose_cfg
from kdx.callbacks import SweepInfo, hydra_sweep, wandb_identity
from kdx.config import validate
from kdx.runner import run

SWEEP_YAML = ROOT / "conf" / "wandb_sweep" / "dkd_cifar100.yaml"


# ------------------------------------------------------------------------------------ reading an offline run


def _records(path: Path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header, then LevelDB-style log blocks of 32 KiB."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def read_offline_run(wandb_dir: Path) -> dict[str, Any]:
    """The one offline run under ``wandb_dir``: identity, config, final summary, history keys and media files."""
    (run_dir,) = wandb_dir.glob("offline-run-*")
    (log_file,) = run_dir.glob("run-*.wandb")
    # W&B's service writes the log in the background: ``finish()`` may return before the file is complete
    deadline = time.monotonic() + 30
    while True:
        records = list(_records(log_file))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    out: dict[str, Any] = {"config": {}, "summary": {}, "history_keys": set(), "metrics": {}}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(group=r.run.run_group, job_type=r.run.job_type, tags=list(r.run.tags), name=r.run.display_name)
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "summary":
            for item in r.summary.update:  # a nested key (a media file's fields) is a path into dicts
                *parents, last = list(item.nested_key) or [item.key]
                node = out["summary"]
                for key in parents:
                    node = node.setdefault(key, {})
                node[last] = json.loads(item.value_json)
        elif kind == "history":
            out["history_keys"].update(i.key or i.nested_key[0] for i in r.history.item)  # media: [key, field]
        elif kind == "metric" and r.metric.name:
            out["metrics"][r.metric.name] = r.metric
    media = run_dir / "files" / "media"  # images/<key>_<step>_<hash>.png, table/<key>_<step>_<hash>.table.json
    out["media"] = sorted(p.relative_to(media).as_posix() for p in media.rglob("*") if p.is_file())
    return out


def _isolate_wandb(env: dict[str, str], root: Path) -> dict[str, str]:
    """Offline W&B whose settings and artifact staging (tables) stay in the test's folder, not in $HOME."""
    return dict(env, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(root),
                WANDB_DATA_DIR=str(root / "wandb_data"), WANDB_CACHE_DIR=str(root / "wandb_cache"),
                WANDB_CONFIG_DIR=str(root / "wandb_config"))


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    for key, value in _isolate_wandb({}, tmp_path).items():
        monkeypatch.setenv(key, value)


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
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    cfg = compose_cfg(list(TINY), tmp_path)
    assert hydra_sweep() is None  # a single run

    def as_sweep_job(folder: Path, num: int) -> None:
        with read_write(cfg.hydra), open_dict(cfg):
            cfg.hydra.mode, cfg.hydra.sweep.dir, cfg.hydra.job.num = RunMode.MULTIRUN, str(folder), num
        HydraConfig.instance().set_config(cfg)

    as_sweep_job(ROOT / "multirun" / "2026-11-25" / "07-43-11", 2)
    assert hydra_sweep() == SweepInfo(dir="multirun/2026-11-25/07-43-11", job=2)  # relative to the project root
    as_sweep_job(tmp_path / "sweeps" / "a", 2)
    assert hydra_sweep() == SweepInfo(dir=(tmp_path / "sweeps" / "a").as_posix(), job=2)  # elsewhere: as given


# ------------------------------------------------------------------------------------ a real offline sweep


@pytest.fixture(scope="module")
def offline_sweep(tmp_path_factory) -> Path:
    """``python -m kdx -m distill=none,dkd logger=wandb logger.mode=offline``, tiny: job 0 trains the resnet8
    (stored as the teacher), job 1 distils it with DKD. The sweep folder uses ``${now:...}`` as Hydra's default
    does, so the test also sees that every job resolves it to the same folder."""
    tmp = tmp_path_factory.mktemp("wandb_sweep")
    args = ["-m"] + [a for a in TINY if not a.startswith("logger")] + [
        "distill=none,dkd", "logger=wandb", "logger.mode=offline", f"paths.teachers={tmp / 'teachers'}",
        f"hydra.sweep.dir={tmp}/multirun/${{now:%H-%M-%S-%f}}",
    ]
    env = _isolate_wandb(dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1"), tmp)
    proc = subprocess.run([sys.executable, "-m", "kdx", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (sweep,) = (tmp / "multirun").iterdir()
    return sweep


def test_sweep_jobs_share_a_group_named_after_the_sweep(offline_sweep):
    jobs = sorted(p for p in offline_sweep.iterdir() if p.is_dir())
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1"]
    runs = [read_offline_run(p / "wandb") for p in jobs]
    assert {r["group"] for r in runs} == {offline_sweep.as_posix()}
    assert [r["name"] for r in runs] == ["none-resnet8-seed0-job0", "dkd-resnet8-resnet8-seed0-job1"]
    assert [r["job_type"] for r in runs] == ["none", "dkd"]
    assert runs[1]["tags"] == ["synthetic", "resnet8-resnet8", "dkd"]


def test_offline_run_holds_config_results_and_curves(offline_sweep):
    job = next(p for p in offline_sweep.iterdir() if p.name.startswith("1_"))
    r = read_offline_run(job / "wandb")
    results = json.loads((job / "results.json").read_text())
    # the resolved config (no interpolation left), as results.json records it
    cfg = r["config"]
    assert cfg["distill"]["beta"] == 8.0 and cfg["paths"]["output_dir"] == str(job) and cfg["method"] == "dkd"
    assert cfg["distill"] == results["config"]["distill"]
    # results.json in the summary: scalars, strings and nested dicts; the config is not repeated there
    s = r["summary"]
    for key in ("test_acc1_best", "test_acc1_last", "val_acc1_best", "teacher_acc1", "best_epoch", "seed", "method",
                "pair", "git", "wall_time_s"):
        assert s[key] == results[key], key
    assert s["resources"] == results["resources"] and s["data"] == results["data"]
    assert s["teacher_info"]["arch"] == "resnet8" and "config" not in s
    # the per-epoch history as a table (a media file), per-term loss curves, the teacher's accuracy
    assert s["history"]["_type"] == "table-file" and s["history"]["nrows"] == len(results["history"])
    assert any(m.startswith("table/history") for m in r["media"])
    assert {"train/loss", "train/loss/ce", "train/loss/tckd", "train/loss/nckd", "val/acc1", "test/acc1",
            "teacher/acc1"} <= r["history_keys"]
    assert s["teacher/acc1"] == results["teacher_acc1"] is not None
    # val/acc1 is summarised by its best value, not only its last
    assert r["metrics"]["val/acc1"].summary.max and s["val/acc1"]["max"] == results["val_acc1_best"]


# ------------------------------------------------------------------------------------ images


def test_reffakd_heatmap_is_logged_once_at_the_start_of_distillation(tmp_path, offline_wandb):
    base = [o for o in TINY if not o.startswith(("model@teacher", "teacher.train", "logger"))]
    ae = ["teacher.ae.epochs=1", "teacher.ae.milestones=[1]", "teacher.ae.samples_per_class=2"]
    run(compose_cfg(base + ["distill=reffakd", "logger=wandb", "logger.mode=offline"] + ae, tmp_path))
    r = read_offline_run(tmp_path / "run" / "wandb")  # the distillation's run (stage A has its own, in reffakd_ae/)
    assert r["job_type"] == "reffakd" and "reffakd/similarity" in r["history_keys"]
    assert len([m for m in r["media"] if m.startswith("images/reffakd/similarity") and m.endswith(".png")]) == 1


def test_nayer_synthetic_grids_reach_wandb(tmp_path, offline_wandb, offline_sweep):
    from test_nayer import NAYER_TINY

    teacher = offline_sweep.parent.parent / "teachers" / "synthetic" / "resnet8" / "teacher.pt"
    args = [o for o in TINY if not o.startswith("logger")] + NAYER_TINY + [
        f"teacher.ckpt={teacher}", "trainer.max_epochs=2", "logger=wandb", "logger.mode=offline"]
    run(compose_cfg(args, tmp_path))
    r = read_offline_run(tmp_path / "run" / "wandb")
    assert len([m for m in r["media"] if m.startswith("images/nayer/synthetic")]) == 2  # one grid per epoch
    assert {"train/gen/loss_epoch", "train/loss/kd"} <= r["history_keys"]


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


def test_wandb_sweep_config_drives_python_m_kdx(tmp_path, monkeypatch, offline_sweep):
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
    job = next(p for p in offline_sweep.iterdir() if p.name.startswith("1_"))
    assert sweep["metric"]["name"] in read_offline_run(job / "wandb")["summary"]


def _select(cfg, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key)
