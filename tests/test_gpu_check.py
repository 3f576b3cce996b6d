"""`make gpu-check` (python -m kdx.gpu_check): on a machine without a CUDA GPU it says so and exits with status 0;
its table marks what bounds an epoch. (The measurement itself needs a GPU and is not a test.)"""
from __future__ import annotations

import subprocess
import sys

import kdx.gpu_check as gpu_check
from conftest import ROOT, cli_env


def test_no_gpu_exits_cleanly_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU is visible" in out and "make gpu-check" in out


def test_no_gpu_exit_status_of_the_command():
    env = dict(cli_env(), CUDA_VISIBLE_DEVICES="")  # hides any GPU, so this runs the no-GPU path everywhere
    proc = subprocess.run([sys.executable, "-m", "kdx.gpu_check"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "no CUDA GPU is visible" in proc.stdout, proc.stderr[-2000:]


def test_plan_and_table():
    cases = gpu_check.plan(512)
    assert len(cases) == 4 * 2 * 3 * 2 and len(set(cases)) == len(cases)
    assert {c[2] for c in cases[:32]} == {"fp32", "fast"} and {c[2] for c in cases[32:]} == {"compile"}
    rows = [
        {"method": "kd", "batch": 64, "mode": "fp32", "on_device": True, "kdx_img_s": 900.0, "model_img_s": 1000.0,
         "epoch_s": 50000 / 900, "peak_mb": 10.0},
        {"method": "kd", "batch": 64, "mode": "fp32", "on_device": False, "kdx_img_s": 400.0, "model_img_s": 1000.0,
         "epoch_s": 125.0, "peak_mb": 10.0},
        {"method": "afd", "batch": 512, "mode": "compile", "on_device": True, "skipped": "time budget"},
    ]
    text = gpu_check.table(rows, {(64, True): 5000.0, (64, False): 500.0})
    lines = text.splitlines()
    assert "| model (0.90 of it) |" in lines[2] and "| 55.6 |" in lines[2]
    assert "| data path (0.80 of it) |" in lines[3] and "skipped: time budget" in lines[4]


def test_real_run_config_and_data_path_on_cpu(tmp_path):
    """The real run's command line composes and validates; the data-path timer runs (here on the CPU)."""
    from kdx.bench import compose
    from kdx.config import validate

    cfg = compose(gpu_check.real_run_overrides(str(tmp_path), 3, 2, 64, tmp_path), tmp_path)
    validate(cfg)
    assert (cfg.data.name, cfg.model.name, cfg.teacher.model.name, cfg.distill._target_.rsplit(".", 1)[-1]) == (
        "cifar100", "resnet8x4", "resnet32x4", "KD")
    assert cfg.teacher.train.max_epochs == 3 and cfg.trainer.max_epochs == 2 and cfg.data.on_device
    for on_device in (False, True):
        assert gpu_check.data_rate(16, on_device, 3, tmp_path / str(on_device), accelerator="cpu") > 0
