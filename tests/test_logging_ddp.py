"""Loggers (W&B offline, a logger that cannot start) and DDP on CPU (gloo, 2 processes)."""
from __future__ import annotations

import json

import pytest

from conftest import TINY, compose_cfg, run_cli
from kdx.errors import LoggerStartError
from kdx.run import build_job as build, run


def test_wandb_offline_writes_a_syncable_run_with_names(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(compose_cfg(tiny + ["logger=wandb", "distill=kd"], tmp_path))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "W&B offline run folder missing"
    # the run's data is written locally, ready for `wandb sync <folder>`
    assert list(runs[0].glob("*.wandb"))
    # the teacher trained first has its own W&B run, in its own folder
    teacher_runs = list((tmp_path / "run" / "teacher" / "wandb").glob("offline-run-*"))
    assert len(teacher_runs) == 1 and teacher_runs[0].name != runs[0].name


def test_logger_that_cannot_start_fails_loudly(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # the suite's "disabled" would make W&B a no-op
    with pytest.raises(LoggerStartError, match=r"logger=csv\|tensorboard\|none"):
        build(compose_cfg(tiny + ["logger=wandb", "logger.mode=bogus"], tmp_path))


def test_tensorboard_and_csv_loggers(tmp_path, tiny):
    run(compose_cfg(tiny + ["logger=tensorboard", "task=train"], tmp_path, name="tb"))
    assert list((tmp_path / "tb" / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_ddp_cpu_two_processes_distil_with_frozen_teacher(tmp_path):
    """trainer=ddp_cpu through the real CLI: teacher trained first (under DDP), then KD; rank 0 writes."""
    out = tmp_path / "ddp"
    args = [a for a in TINY if not a.startswith("logger")] + [
        "trainer=ddp_cpu", "distill=dkd", "logger=csv", f"hydra.run.dir={out}", f"paths.teachers={tmp_path / 'teachers'}",
        "data.train_size=256",
    ]
    proc = run_cli(args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete" and res["teacher_acc1"] is not None
    assert res["data"]["sizes"]["train"] == 256
    assert (tmp_path / "teachers" / "synthetic" / "resnet8" / "teacher.pt").is_file()
    assert (out / "teacher" / "results.json").is_file()
    # one results file, one set of checkpoints: only rank 0 wrote
    assert len(list(out.rglob("results.json"))) == 2
