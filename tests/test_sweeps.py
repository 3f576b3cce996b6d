"""Sweeps: resumable multiruns (resume=auto), launchers (basic, joblib, submitit), the teacher-store lock,
DDP inside sweeps, and an Optuna search — through the real CLI on tiny synthetic data."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_cfg, run_cli
from kdx.config import validate
from kdx.errors import ConfigError
from kdx.sweep.folders import name_from_overrides
from kdx.sweep.launch import check_launch
from kdx.sweep.resume import FINGERPRINT_FILE, prepare_job


def _without(keys: tuple[str, ...]) -> list[str]:
    return [a for a in TINY if not a.startswith(keys)]


def job_dirs(sweep: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(sweep.iterdir()) if (p / ".hydra").is_dir()}


def results(job: Path) -> dict:
    return json.loads((job / "results.json").read_text())


def only_sweep(root: Path) -> Path:
    (sweep,) = [p for p in (root / "multirun").iterdir() if p.is_dir()]
    return sweep


def ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


# ---------------------------------------------------------------------------------------------- fast checks


def test_sweep_name_is_the_sorted_command_line():
    a = name_from_overrides(["seed=0,1", "distill=none,kd", "paths.teachers=/x", "resume=auto"],
                            ["paths.teachers", "resume"])
    b = name_from_overrides(["distill=none,kd", "seed=0,1"])
    assert a == b == "distill=none,kd__seed=0,1"
    assert name_from_overrides([]) == "default"
    assert "/" not in name_from_overrides(["distill/teacher_transform=topk_scale"])


def test_hydra_dirs_follow_resume(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    cfg = compose_cfg(["resume=auto", "distill=dkd", "seed=1", "logger=csv"], tmp_path)  # job number 0
    assert OmegaConf.select(cfg, "hydra.run.dir") == "outputs/distill=dkd,seed=1"  # logger never names a folder
    assert OmegaConf.select(cfg, "hydra.sweep.subdir") == "distill=dkd,seed=1"  # no job number
    assert OmegaConf.select(cfg, "hydra.sweep.dir") == "multirun/distill=dkd__seed=1"
    named = compose_cfg(["resume=auto", "sweep_name=abl", "seed=1"], tmp_path)
    HydraConfig.instance().set_config(named)
    assert OmegaConf.select(named, "hydra.sweep.dir") == "multirun/abl"
    assert OmegaConf.select(named, "hydra.run.dir") == "outputs/abl/seed=1"
    never = compose_cfg(["seed=1"], tmp_path)
    assert OmegaConf.select(never, "hydra.sweep.subdir") == "0_seed=1"
    assert OmegaConf.select(never, "hydra.sweep.dir").startswith("multirun/20")  # multirun/<date>/<time>


def test_resume_value_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"resume='sometimes'.*never, auto"):
        validate(compose_cfg(["resume=sometimes"], tmp_path))


def test_prepare_job_skips_resumes_and_refuses_another_config(tmp_path, tiny):
    cfg = compose_cfg(tiny + ["resume=auto", "distill=kd"], tmp_path)
    out = tmp_path / "run"
    assert prepare_job(cfg) is None and cfg.ckpt_path is None  # a fresh folder: runs from scratch
    assert json.loads((out / FINGERPRINT_FILE).read_text())["config"]["distill.temperature"] == 4.0
    # where things are and how progress is shown do not make another experiment
    assert prepare_job(compose_cfg(tiny + ["resume=auto", "distill=kd", "logger=csv", "progress_bar=tqdm",
                                           f"paths.data_dir={tmp_path}"], tmp_path)) is None
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"x")
    cfg = compose_cfg(tiny + ["resume=auto", "distill=kd"], tmp_path)
    assert prepare_job(cfg) is None and cfg.ckpt_path == str(out / "checkpoints" / "last.ckpt")
    (out / "results.json").write_text(json.dumps({"status": "complete", "val_acc1_best": 12.5}))
    assert prepare_job(compose_cfg(tiny + ["resume=auto", "distill=kd"], tmp_path))["val_acc1_best"] == 12.5
    with pytest.raises(ConfigError) as err:
        prepare_job(compose_cfg(tiny + ["resume=auto", "distill=kd", "distill.temperature=2", "seed=4"], tmp_path))
    msg = str(err.value)
    assert "distill.temperature: 4.0 → 2" in msg and "seed: 0 → 4" in msg
    assert "sweep_name=" in msg and "delete the folder" in msg and str(out) in msg
    # resume=never starts over in place, as before (and records the new config)
    assert prepare_job(compose_cfg(tiny + ["distill=kd", "distill.temperature=2"], tmp_path)) is None


def test_folder_with_a_run_but_no_config_record_is_refused(tmp_path, tiny):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"cannot tell.*sweep_name="):
        prepare_job(compose_cfg(tiny + ["resume=auto"], tmp_path))


def _hydra(launcher: str, mode: str = "MULTIRUN", **launcher_args):
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    return OmegaConf.create({"mode": getattr(RunMode, mode), "launcher": {"_target_": launcher, **launcher_args}})


BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


def test_ddp_that_reruns_the_command_line_is_refused_in_basic_and_joblib_sweeps(tmp_path, tiny):
    ddp = compose_cfg(tiny + ["trainer=ddp_cpu"], tmp_path)
    for launcher, where in ((BASIC, "basic launcher"), (JOBLIB, "joblib")):
        with pytest.raises(ConfigError, match=where) as err:
            check_launch(ddp, _hydra(launcher))
        assert "hydra/launcher=kdx_slurm" in str(err.value) and "hydra/launcher=kdx_local" in str(err.value)
    check_launch(ddp, _hydra(BASIC, mode="RUN"))  # a single run: Lightning re-runs `python -m kdx ...`, fine
    check_launch(ddp, _hydra(SUBMITIT_LOCAL, tasks_per_node=2))  # one submitit task per rank
    check_launch(compose_cfg(tiny, tmp_path), _hydra(JOBLIB))  # single-device jobs
    with pytest.raises(ConfigError, match=r"hydra.launcher.tasks_per_node=2"):
        check_launch(ddp, _hydra(SUBMITIT_LOCAL, tasks_per_node=1))
    spawn = compose_cfg(tiny + ["trainer=ddp_cpu", "+trainer.strategy.start_method=spawn"], tmp_path)
    with pytest.raises(ConfigError, match=r"spawn/fork.*history"):
        check_launch(spawn, None)


def test_launcher_presets_are_sized_from_the_trainer(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    cfg = compose_cfg(["hydra/launcher=kdx_slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                       "hydra.launcher.partition=gpu"], tmp_path)
    HydraConfig.instance().set_config(cfg)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert launcher["partition"] == "gpu" and launcher["_target_"].endswith("SlurmLauncher")
    cfg = compose_cfg(["hydra/launcher=kdx_slurm", "trainer=ddp"], tmp_path)  # devices=-1
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(InterpolationResolutionError, match=r"trainer.devices=-1 cannot size a SLURM job"):
        OmegaConf.select(cfg, "hydra.launcher.tasks_per_node")
    cfg = compose_cfg(["hydra/launcher=kdx_local", "trainer=ddp_cpu"], tmp_path)
    HydraConfig.instance().set_config(cfg)
    assert (cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.gpus_per_node) == (2, 0)


# ---------------------------------------------------------------------------------------------- real sweeps


@pytest.mark.slow
def test_basic_sweep_2x2_then_the_same_command_skips_every_job(tmp_path):
    """distill × seed through Hydra's basic launcher; the same command again (here through joblib) finds the
    same folders and skips all four jobs without touching their results."""
    args = ["-m", *TINY, "distill=none,kd", "seed=0,1", "resume=auto", f"paths.teachers={tmp_path / 'teachers'}"]
    ok(run_cli(args, cwd=tmp_path))
    sweep = only_sweep(tmp_path)
    assert "distill=none,kd" in sweep.name and "seed=0,1" in sweep.name  # named by the command line, no date
    jobs = job_dirs(sweep)
    assert len(jobs) == 4 and not any(name[0].isdigit() for name in jobs)  # no job number in the names
    assert {(results(j)["method"], results(j)["seed"]) for j in jobs.values()} == {
        ("none", 0), ("none", 1), ("kd", 0), ("kd", 1)}
    before = {name: (j / "results.json").stat().st_mtime_ns for name, j in jobs.items()}
    out = ok(run_cli(args + ["hydra/launcher=kdx_joblib"], cwd=tmp_path))
    assert only_sweep(tmp_path) == sweep
    assert out.count("skipping: complete results in") == 4
    assert {name: (j / "results.json").stat().st_mtime_ns for name, j in job_dirs(sweep).items()} == before


@pytest.mark.slow
def test_joblib_sweep_trains_a_missing_teacher_once(tmp_path):
    """Two KD jobs start together (joblib, n_jobs=2) and need the same missing resnet14 teacher: one trains it
    under the teacher store's lock, the other waits and loads it."""
    args = ["-m", *_without(("model@teacher.model", "teacher.train.max_epochs")), "teacher_arch=resnet14",
            "teacher.train.max_epochs=2", "distill=kd,none", "seed=0,1", "resume=auto", "sweep_name=lock",
            "hydra/launcher=kdx_joblib", f"paths.teachers={tmp_path / 'teachers'}"]
    ok(run_cli(args, cwd=tmp_path))
    jobs = job_dirs(tmp_path / "multirun" / "lock")
    assert len(jobs) == 4 and all(results(j)["status"] == "complete" for j in jobs.values())
    kd = [j for j in jobs.values() if results(j)["method"] == "kd"]
    trained = [j for j in kd if (j / "teacher" / "results.json").is_file()]
    assert len(kd) == 2 and len(trained) == 1  # one teacher training run, in one job folder
    (waited,) = [j for j in kd if j not in trained]
    # the other job had started before the teacher existed: it waited on the lock, then loaded the stored one
    assert (waited / ".hydra" / "config.yaml").stat().st_mtime < (trained[0] / "teacher" / "results.json").stat().st_mtime
    assert (tmp_path / "teachers" / "synthetic" / "resnet14" / "teacher.pt").is_file()
    assert len({results(j)["teacher_info"]["sha256"] for j in kd}) == 1


@pytest.mark.slow
def test_killed_sweep_rerun_skips_the_complete_job_and_resumes_the_other(tmp_path):
    """SIGKILL the whole sweep once one job is complete and the other has written checkpoints/last.ckpt, then
    run the same command: the complete job is skipped (results untouched), the other continues from its
    checkpoint to the last epoch."""
    args = [sys.executable, "-m", "kdx", "-m", *_without(("trainer.max_epochs",)), "distill=none",
            "trainer.max_epochs=1,8", "resume=auto", "sweep_name=kill", f"paths.teachers={tmp_path / 'teachers'}"]
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    sweep = tmp_path / "multirun" / "kill"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                jobs = job_dirs(sweep) if sweep.is_dir() else {}
                short = [j for n, j in jobs.items() if "trainer.max_epochs=1," in n + ","]
                long_ = [j for n, j in jobs.items() if "trainer.max_epochs=8" in n]
                if short and (short[0] / "results.json").is_file() and long_ and (
                        long_[0] / "checkpoints" / "last.ckpt").is_file():
                    break
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
    (short,) = [j for n, j in job_dirs(sweep).items() if "trainer.max_epochs=1," in n + ","]
    (long_,) = [j for n, j in job_dirs(sweep).items() if "trainer.max_epochs=8" in n]
    assert results(short)["status"] == "complete"
    assert not (long_ / "results.json").exists(), "the long job finished before the kill: the test proves nothing"
    killed_at = torch.load(long_ / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    done_before = killed_at["kdx"]["history"]
    assert 1 <= len(done_before) < 8
    short_bytes, short_mtime = (short / "results.json").read_bytes(), (short / "results.json").stat().st_mtime_ns

    out = ok(subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600))
    assert f"skipping: complete results in {short / 'results.json'}" in out
    assert (short / "results.json").read_bytes() == short_bytes
    assert (short / "results.json").stat().st_mtime_ns == short_mtime
    assert f"resuming from {long_ / 'checkpoints' / 'last.ckpt'}" in out and "Restored all states" in out
    res = results(long_)
    assert res["status"] == "complete" and res["resumed_from"] == str(long_ / "checkpoints" / "last.ckpt")
    assert res["epochs_done"] == 8 and [h["epoch"] for h in res["history"]] == list(range(1, 9))
    assert res["history"][: len(done_before)] == done_before  # the epochs before the kill were not re-run


@pytest.mark.slow
def test_submitit_local_runs_a_ddp_job_as_two_tasks(tmp_path):
    """hydra/launcher=kdx_local with trainer=ddp_cpu: submitit starts 2 tasks, each one a Lightning DDP rank
    (gloo); the job folder is shared and only rank 0 writes results."""
    args = ["-m", *TINY, "trainer=ddp_cpu", "distill=none", "hydra/launcher=kdx_local", "resume=auto",
            "sweep_name=sub", f"paths.teachers={tmp_path / 'teachers'}"]
    ok(run_cli(args, cwd=tmp_path))
    sweep = tmp_path / "multirun" / "sub"
    (job,) = job_dirs(sweep).values()
    res = results(job)
    assert res["status"] == "complete" and res["epochs_done"] == 1 and len(res["history"]) == 1
    assert len(list(sweep.rglob("results.json"))) == 1
    logs = {p.name: p.read_text() for p in (sweep / ".submitit").rglob("*_log.*")}
    task1 = "".join(text for name, text in logs.items() if "_1_log." in name)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in task1


@pytest.mark.slow
def test_ddp_sweep_under_the_basic_launcher_is_refused_before_any_job(tmp_path):
    proc = run_cli(["-m", *TINY, "trainer=ddp_cpu", "seed=0,1", f"paths.teachers={tmp_path / 'teachers'}"], cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "re-running the command line" in out and "hydra/launcher=kdx_slurm" in out
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob("checkpoints"))


@pytest.mark.slow
def test_optuna_searches_dkd_beta_and_temperature_on_a_held_out_split(tmp_path):
    args = ["-m", *TINY, "hydra/sweeper=dkd_optuna", "hydra.sweeper.n_trials=2", "resume=auto", "sweep_name=opt",
            f"paths.teachers={tmp_path / 'teachers'}"]
    out = ok(run_cli(args, cwd=tmp_path))
    jobs = job_dirs(tmp_path / "multirun" / "opt")
    assert len(jobs) == 2 and "Best value:" in out
    for job in jobs.values():
        res = results(job)
        assert res["method"] == "dkd" and res["best_selected_on"] == "held-out validation split"
        assert "distill.beta=" in job.name and "distill.temperature=" in job.name
    best = (tmp_path / "multirun" / "opt" / "optimization_results.yaml").read_text()
    assert max(results(j)["val_acc1_best"] for j in jobs.values()) == pytest.approx(
        float(best.split("best_value:")[1].split()[0]))
