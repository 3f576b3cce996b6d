"""Shared fixtures: compose the real Hydra config in-process and run it tiny on synthetic data."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from kdx.cli import CONFIG_DIR  # noqa: E402  (registers the resolvers)

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# a few-second job: 10 classes of 3×32×32 synthetic images, resnet8 teacher and student
TINY = [
    "data=synthetic",
    "data.num_classes=10",
    "data.train_size=128",
    "data.test_size=64",
    "data.batch_size=32",
    "model=resnet8",
    "teacher_arch=resnet8",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "logger=none",
    "progress_bar=none",
]


def compose_cfg(overrides: list[str], tmp_path: Path, name: str = "run", teachers: Path | None = None):
    """The composed config as `python -m kdx <overrides>` sees it, writing under tmp_path (its teacher store:
    ``tmp_path/teachers``, or ``teachers``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    out = tmp_path / name
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.teachers = str(teachers or tmp_path / "teachers")
        cfg.paths.root_dir = str(ROOT)
    return cfg


@pytest.fixture(scope="session")
def teacher_store(tmp_path_factory) -> Path:
    """One teacher store for the whole test run, holding the tiny job's resnet8 teacher (trained once, one epoch on
    the synthetic data): tests that need *a* teacher use it (``teachers=`` of :func:`compose_cfg`, or
    ``teacher.ckpt=`` with :func:`teacher_ckpt`) instead of training their own."""
    from kdx.run import run

    tmp = tmp_path_factory.mktemp("session_teacher")
    run(compose_cfg(TINY + ["task=train"], tmp, name="teacher_run"))
    return tmp / "teachers"


@pytest.fixture(scope="session")
def teacher_ckpt(teacher_store) -> Path:
    """The shared resnet8 teacher's weights (``teacher.ckpt=<this>``)."""
    return teacher_store / "synthetic" / "resnet8" / "teacher.pt"


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from a second one, and on a shared machine
    OpenMP's waiting threads made them several times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny():
    return list(TINY)


def cli_env() -> dict[str, str]:
    """The environment of a test's ``python -m kdx``: offline, no W&B, the tests' helper module (``kdx_test_helpers``)
    importable."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)


def run_cli(args: list[str], cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m kdx <args>`` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "kdx", *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def distill_module(student, strategy, optimizer, datamodule, num_classes, teacher=None, tmp_path: Path = ROOT):
    """A :class:`kdx.regimes.distill.DistillModule` built from its parts (what the composition root does)."""
    from kdx.regimes.base import Parts, Perf
    from kdx.regimes.distill import DistillModule
    from kdx.regimes.step import StepParts

    parts = Parts(StepParts(student, strategy, teacher), optimizer, None, datamodule, num_classes, Perf(), tmp_path, 0)
    return DistillModule(parts)
