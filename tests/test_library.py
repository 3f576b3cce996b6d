"""kdx as a library: the wheel carries its configs and runs from any folder; a user's own config folder and
strategy class plug in without editing kdx (Hydra's --config-dir, a ``_target_`` outside the package)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT

ENV = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def _kdx(args: list[str], cwd: Path, pythonpath: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(ENV, PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, "-m", "kdx", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_the_wheel_runs_from_another_folder(tmp_path):
    """``pip install`` of the built wheel (not editable) into a fresh location, run from an unrelated folder."""
    dist, site, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                            "-w", str(dist)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("kdx-*.whl")
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-3000:]
    where = subprocess.run([sys.executable, "-c", "import kdx.cli as c; print(c.__file__); print(c.CONFIG_DIR)"],
                           cwd=elsewhere, env=dict(ENV, PYTHONPATH=str(site)), capture_output=True, text=True)
    module_file, config_dir = where.stdout.split()
    assert module_file.startswith(str(site)) and config_dir == str(site / "kdx" / "conf")  # the installed copy
    r = _kdx(["debug=tiny", "distill=dkd", f"hydra.run.dir={elsewhere / 'run'}",
              f"paths.teachers={tmp_path / 'teachers'}"], elsewhere, str(site))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((elsewhere / "run" / "results.json").read_text())
    assert res["status"] == "complete" and res["method"] == "dkd" and res["config"]["distill"]["beta"] == 8.0


def test_a_user_config_folder_and_strategy_plug_in_without_editing_kdx(tmp_path):
    """The user's own experiment and distill config (in their folder, found through --config-dir) and their own
    strategy class (importable from their code, named by _target_)."""
    (tmp_path / "mycode").mkdir()
    (tmp_path / "mycode" / "mymethods.py").write_text(textwrap.dedent('''
        import torch.nn.functional as F
        from kdx.distill.base import Strategy
        from kdx.distill.losses import kd_loss

        class HalfKD(Strategy):
            """CE plus half of Hinton's KD at temperature T."""

            def __init__(self, temperature: float = 4.0, teacher_transform=None):
                super().__init__(teacher_transform)
                self.temperature = temperature

            def loss_terms(self, student, teacher, batch, epoch):
                return {"ce": F.cross_entropy(student.logits, batch.y),
                        "half_kd": 0.5 * kd_loss(student.logits, teacher.logits, self.temperature)}
    '''))
    conf = tmp_path / "myconf"
    (conf / "distill").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "distill" / "halfkd.yaml").write_text("_target_: mymethods.HalfKD\ntemperature: 3.0\n")
    (conf / "experiment" / "tiny_halfkd.yaml").write_text(textwrap.dedent('''
        # @package _global_
        defaults:
          - /debug/tiny
          - override /distill: halfkd
        trainer:
          max_epochs: 2
    '''))
    r = _kdx(["--config-dir", str(conf), "experiment=tiny_halfkd", f"hydra.run.dir={tmp_path / 'run'}",
              f"paths.teachers={tmp_path / 'teachers'}"], tmp_path, f"{tmp_path / 'mycode'}{os.pathsep}{ROOT}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["method"] == "halfkd" and res["epochs_done"] == 2 and res["config"]["distill"]["temperature"] == 3.0
    assert res["config"]["data"]["_target_"].endswith("SyntheticDataModule")  # kdx's own debug=tiny, reused
    bad = _kdx(["--config-dir", str(conf), "experiment=tiny_halfkd", "+distill.temprature=2",
                f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path, f"{tmp_path / 'mycode'}{os.pathsep}{ROOT}")
    assert bad.returncode == 1 and "Did you mean 'distill.temperature'" in bad.stdout + bad.stderr
