"""Run one job: ``task=distill|train`` (fit, test, results, exports, the teacher store) or ``task=reffakd_ae``.

:func:`run` is what the command line and the Python API call, and what the run context calls back for a sub-job
(a missing teacher's training, ReffAKD's stage A): the composition root (:mod:`kdx.build`) gets it as ``run_job``.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

import kdx
from kdx.build import build
from kdx.config import TASKS
from kdx.console import one_line_per_event
from kdx.errors import ConfigError
from kdx.io import atomic_write_json
from kdx.labels import model_name
from kdx.loggers import close_logger, log_config, log_results
from kdx.results import export, git_revision, resources, training_budget, write_failure_record
from kdx.sweep.resume import prepare_job
from kdx.teachers.reffakd_stage_a import run_stage_a
from kdx.teachers.store import TeacherStore

log = logging.getLogger("kdx")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one job and return what its ``results.json`` holds.

    A job that stops early writes its record into results.json first: ``failed`` (an error: its type and message)
    or ``interrupted`` (Ctrl-C, SIGTERM), with the epoch its last checkpoint reached and the command that resumes
    it (:func:`kdx.results.failure_record`); then the error goes on to the caller.
    """
    one_line_per_event()
    task = cfg.get("task")
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not one of {', '.join(TASKS)}.")
    received: list[str] = []
    try:
        with _sigterm_as_interrupt(received):
            return _TASKS[task](cfg)
    except BaseException as e:
        record = write_failure_record(cfg, e, received[0] if received else None)
        if record is not None:
            log.error("%s: %s. Epochs done: %s of %s. Record: %s. Resume: %s", record["status"].capitalize(),
                      record["error"].rstrip("."), record["epochs_done"], record["epochs"], Path(record["output_dir"]) / "results.json",
                      record["resume_command"])
        raise


@contextmanager
def _sigterm_as_interrupt(received: list[str]) -> Iterator[None]:
    """SIGTERM (a scheduler's stop, ``kill``) stops the run as Ctrl-C does, so it leaves its record; only where no
    one else handles SIGTERM (Lightning's SLURM environment installs its own) and in the main thread."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum, frame):
        received.append("SIGTERM")
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """``task=distill`` / ``task=train``: fit, test, write results.json and the exports."""
    done = prepare_job(cfg)  # resume=auto: complete → these results; interrupted → cfg.ckpt_path = last.ckpt
    if done is not None:
        return done
    job = build(cfg, run_job=run)
    cfg, ctx, dm, module, trainer, logger = job.cfg, job.ctx, job.datamodule, job.module, job.trainer, job.logger
    teacher, out = module.teacher, ctx.output_dir
    max_epochs = int(cfg.trainer.max_epochs)
    if trainer.is_global_zero:
        log_config(logger, cfg)
        what = "Training" if job.trains_teacher else f"Distilling ({job.method})"
        log.info("%s %s on %s → %s", what, job.pair, ctx.dataset_key, out)
        if teacher is not None:
            log.info("Teacher: %s", teacher.describe())
    started = _dt.datetime.now().isoformat(timespec="seconds")
    t0 = time.time()
    try:
        trainer.fit(module, datamodule=module.fit_datamodule(), ckpt_path=cfg.get("ckpt_path"))
        test = trainer.test(module, datamodule=module.fit_datamodule(), verbose=False)[0]
    except BaseException:
        close_logger(logger, "failed")
        raise
    wall = time.time() - t0
    results: dict[str, Any] = {
        "status": "complete",
        "task": "train" if job.trains_teacher else "distill",
        "method": job.method,
        "dataset": ctx.dataset_key,
        "data": dm.describe(),
        "student": model_name(cfg.model),
        "teacher": None if teacher is None else teacher.info.get("arch"),
        "pair": job.pair,
        "seed": int(cfg.seed),
        "epochs": max_epochs,
        "epochs_done": int(trainer.current_epoch),
        "budget": training_budget(trainer, max_epochs, module.images_seen),
        "test_acc1_last": test.get("test/acc1"),
        "test_acc5_last": test.get("test/acc5"),
        "test_acc1_best": module.best.get("test_acc1"),
        "val_acc1_best": None if module.best.get("epoch") is None else module.best.get("val_acc1"),
        "best_epoch": module.best.get("epoch"),
        "best_selected_on": "held-out validation split" if module.has_heldout_val else "test split (mdistiller protocol)",
        "teacher_acc1": module.teacher_acc1,
        "teacher_info": None if teacher is None else teacher.info,
        "teacher_network": None if teacher is None else teacher.network is not None,
        "resources": resources(module, wall),
        "wall_time_s": round(wall, 2),
        "started": started,
        "resumed_from": cfg.get("ckpt_path"),
        "git": git_revision(),
        "kdx_version": kdx.__version__,
        "torch": torch.__version__,
        "output_dir": str(out),
        "history": module.history,
        "config": OmegaConf.to_container(cfg, resolve=True),
        **module.results_extra(),
    }
    if trainer.is_global_zero:
        export(trainer, module, cfg, dm, results, job.trains_teacher)
        if job.trains_teacher and cfg.register_teacher:
            store = TeacherStore(cfg.paths.teachers)
            with store.lock(ctx.dataset_key, model_name(cfg.model)):
                store.register(ctx.dataset_key, model_name(cfg.model), Path(results["teacher_path"]), results["teacher_meta"])
        atomic_write_json(out / "results.json", results)
        log_results(logger, results)  # W&B: the run summary holds results.json's fields
        log.info("Test top-1 %s after the last epoch (%d), %s at the best epoch (%s, chosen on the %s); wall time "
                 "%.0f s → %s", _pct(results["test_acc1_last"]), results["epochs_done"], _pct(results["test_acc1_best"]),
                 results["best_epoch"], results["best_selected_on"], wall, out / "results.json")
    trainer.strategy.barrier()
    close_logger(logger, "success")
    if job.trains_teacher and "teacher_path" not in results:  # ranks > 0 read rank 0's exports
        results["teacher_path"] = str(out / "teacher.pt")
        results["teacher_meta"] = _read_json(out / "teacher.json")
    return results


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.2f} %"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


_TASKS: dict[str, Callable[[DictConfig], dict[str, Any]]] = {
    "distill": run_training,
    "train": run_training,
    "reffakd_ae": run_stage_a,
}




def build_job(cfg: DictConfig) -> Any:
    """The run's objects (:class:`kdx.build.Job`) without running it: :func:`kdx.build.build` with this runner."""
    return build(cfg, run_job=run)
__all__ = ["build_job", "run", "run_training"]
