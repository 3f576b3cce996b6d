"""Build the objects of one run from a composed config and run it: fit, test, write results."""
from __future__ import annotations

import datetime as _dt
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

import kdx
from kdx.callbacks import build_callbacks, build_logger, log_config, log_results
from kdx.config import ConfigError, resolved, validate
from kdx.distill.none import CrossEntropy
from kdx.io import CheckpointError, atomic_torch_save, atomic_write_json, load_state_dict_file
from kdx.module import DistillModule
from kdx.sweep import prepare_job
from kdx.teachers.cache import CachedTeacher, cache_settings
from kdx.teachers.store import TeacherStore

log = logging.getLogger("kdx")


def git_revision() -> Optional[str]:
    root = Path(kdx.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def dataset_key(dm: Any) -> str:
    """The teacher-store key of a datamodule: its name, plus the subset when one is used."""
    key = str(dm.name)
    if getattr(dm, "subset", None):
        key += f"-subset{dm.subset}"
    return key


@dataclass
class RunContext:
    """What a teacher's ``prepare`` may use: the dataset identity and a way to train a teacher."""

    cfg: DictConfig
    dataset_key: str
    num_classes: int
    output_dir: Path

    def train_teacher(self, cfg: DictConfig) -> tuple[Path, dict[str, Any]]:
        tcfg = teacher_training_config(cfg, self.output_dir / "teacher")
        results = run(tcfg)
        return Path(results["teacher_path"]), results["teacher_meta"]


def teacher_training_config(cfg: DictConfig, output_dir: Path) -> DictConfig:
    """The config that trains ``cfg.teacher.model`` with CE (the teacher recipe, ``teacher.train``)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    recipe = c["teacher"].get("train") or {}
    c["task"], c["method"] = "train", "none"
    c["model"] = c["teacher"]["model"]
    c["distill"] = {"_target_": "kdx.distill.none.CrossEntropy"}
    c["ckpt_path"] = None
    c["seed"] = recipe.get("seed", c["seed"])
    if "seed" in (c.get("data") or {}):
        c["data"]["seed"] = c["seed"]  # data order and augmentation follow the teacher's own seed
    if recipe.get("max_epochs"):
        c["trainer"]["max_epochs"] = recipe["max_epochs"]
        if "total_epochs" in (c.get("scheduler") or {}):
            c["scheduler"]["total_epochs"] = recipe["max_epochs"]
    if recipe.get("lr"):
        c["optim"]["lr"] = recipe["lr"]
    if recipe.get("milestones") and "milestones" in (c.get("scheduler") or {}):
        c["scheduler"]["milestones"] = recipe["milestones"]
    c["paths"]["output_dir"] = str(output_dir)
    if isinstance(c.get("logger"), dict) and "save_dir" in c["logger"]:
        c["logger"]["save_dir"] = str(output_dir)  # the teacher's run logs beside its own files
    c.setdefault("train", {})["register_teacher"] = False  # the caller stores it under its own key
    out = OmegaConf.create(c)
    OmegaConf.set_struct(out, True)
    return out


def _strategy(cfg: DictConfig, is_train: bool):
    cls = get_class(cfg.distill._target_)
    if is_train and getattr(cls, "needs_teacher", True):
        log.info("task=train: plain cross-entropy training (the distill=%s settings are not used).", cfg.get("method"))
        return CrossEntropy()
    return instantiate(cfg.distill)


def _teacher(cfg: DictConfig, ctx: RunContext):
    tcfg = cfg.teacher
    cls = get_class(tcfg._target_)
    extra = cls.prepare(cfg, ctx) if hasattr(cls, "prepare") else {}
    if "model" in tcfg:
        # a teacher without a network (a label table) gets model=None, so the node is never built
        extra["model"] = {"num_classes": ctx.num_classes} if getattr(cls, "has_network", True) else None
    return instantiate_unwrapped(tcfg, **extra)


def instantiate_unwrapped(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate``, re-raising kdx's own errors (which name the setting) instead of Hydra's wrapper."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, (CheckpointError, ConfigError, FileNotFoundError, ValueError)):
            raise cause from None
        raise


@dataclass
class Job:
    """Everything one run is made of, built from the config (see :func:`build`)."""

    cfg: DictConfig
    ctx: RunContext
    datamodule: Any
    module: DistillModule
    trainer: pl.Trainer
    logger: Any
    is_train: bool
    method: str
    pair: str


def build(cfg: DictConfig) -> Job:
    """Validate and resolve ``cfg``, then build data, teacher, student, strategy, logger, trainer."""
    validate(cfg)
    cfg = resolved(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    is_train = cfg.task == "train" or cfg.method == "none"
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = instantiate_unwrapped(cfg.data)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and hasattr(dm, "setup"):
        dm.prepare_data()  # a missing dataset stops here, before any teacher is trained
        dm.setup("fit")  # idempotent: Lightning's own call later reuses the loaded arrays
    ctx = RunContext(cfg=cfg, dataset_key=dataset_key(dm), num_classes=int(dm.num_classes), output_dir=out)
    strategy = _strategy(cfg, is_train)
    if getattr(strategy, "needs_features", False):  # a wrong tap name stops here, before any teacher training
        from kdx.features import check_config_taps

        check_config_taps(cfg, ctx.num_classes)
    cache = cache_settings(cfg, strategy, dm)  # teacher.cache: a wrong combination stops before any teacher training
    teacher = _teacher(cfg, ctx) if strategy.needs_teacher else None
    if cache is not None:
        teacher = CachedTeacher(teacher, cache, dm, ctx.dataset_key, precision=str(cfg.trainer.precision),
                                channels_last=bool(cfg.perf.channels_last))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # same student init with or without a teacher
    student = instantiate_unwrapped(cfg.model, num_classes=ctx.num_classes)
    student_taps = teacher_taps = None
    if getattr(strategy, "needs_features", False):  # hooks + shape-dependent modules, before the optimiser
        from kdx.features import attach_feature_taps

        student_taps, teacher_taps = attach_feature_taps(strategy, student, teacher, dm.image_shape)

    scheduler = None
    if cfg.get("scheduler") and cfg.scheduler.get("_target_"):
        scheduler = instantiate(cfg.scheduler)
    trainer_extra: dict[str, Any] = {}
    if getattr(strategy, "data_free", False):  # NAYER: generator + memory bank instead of the training split
        from kdx.datafree.module import build_data_free

        module, dm, trainer_extra = build_data_free(cfg, strategy, student, teacher, dm, out)
    else:
        module = DistillModule(
            student=student,
            strategy=strategy,
            optimizer=instantiate(cfg.optim),
            scheduler=scheduler,
            num_classes=ctx.num_classes,
            teacher=teacher,
            has_heldout_val=bool(getattr(dm, "val_split", 0)),
            channels_last=bool(cfg.perf.channels_last),
            check_finite=bool(cfg.perf.check_finite),
            compile=bool(cfg.perf.get("compile", False)),
            student_taps=student_taps,
            teacher_taps=teacher_taps,
        )
    method = "none" if is_train else str(cfg.method)
    pair = cfg.model.name if teacher is None else f"{teacher.info.get('arch') or 'teacher'}-{cfg.model.name}"
    info = {"method": method, "dataset": ctx.dataset_key, "pair": pair, "seed": int(cfg.seed)}
    logger = build_logger(cfg, info)
    callbacks = build_callbacks(cfg, out, with_logger=logger is not None)
    trainer: pl.Trainer = instantiate(
        cfg.trainer, logger=logger if logger is not None else False, callbacks=callbacks, default_root_dir=str(out),
        **trainer_extra,
    )
    return Job(cfg, ctx, dm, module, trainer, logger, is_train, method, pair)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one job (``task=distill`` or ``task=train``) and return what ``results.json`` holds."""
    if cfg.get("task") == "reffakd_ae":  # ReffAKD stage A: the autoencoder and its soft-label table
        from kdx.teachers.reffakd_ae import run_stage_a

        return run_stage_a(cfg)
    done = prepare_job(cfg)  # resume=auto: complete → these results; interrupted → cfg.ckpt_path = last.ckpt
    if done is not None:
        return done
    job = build(cfg)
    cfg, ctx, dm, module, trainer, logger = job.cfg, job.ctx, job.datamodule, job.module, job.trainer, job.logger
    is_train, method, pair, out = job.is_train, job.method, job.pair, ctx.output_dir
    teacher = module.teacher
    max_epochs = int(cfg.trainer.max_epochs)
    if trainer.is_global_zero:
        log_config(logger, cfg)
        log.info("%s %s on %s → %s", "Training" if is_train else f"Distilling ({method})", pair, ctx.dataset_key, out)

    started = _dt.datetime.now().isoformat(timespec="seconds")
    t0 = time.time()
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
        test = trainer.test(module, datamodule=dm, verbose=False)[0]
    except BaseException:
        close_logger(logger, "failed")
        raise
    wall = time.time() - t0

    results: dict[str, Any] = {
        "status": "complete",
        "task": "train" if is_train else "distill",
        "method": method,
        "dataset": ctx.dataset_key,
        "data": dm.describe() if hasattr(dm, "describe") else {"name": ctx.dataset_key},
        "student": cfg.model.name,
        "teacher": None if teacher is None else teacher.info.get("arch"),
        "pair": pair,
        "seed": int(cfg.seed),
        "epochs": max_epochs,
        "epochs_done": int(trainer.current_epoch),
        "test_acc1_last": test.get("test/acc1"),
        "test_acc5_last": test.get("test/acc5"),
        "test_acc1_best": module.best.get("test_acc1"),
        "val_acc1_best": None if module.best.get("epoch") is None else module.best.get("val_acc1"),
        "best_epoch": module.best.get("epoch"),
        "best_selected_on": "held-out validation split" if module.has_heldout_val else "test split (mdistiller protocol)",
        "teacher_acc1": module.teacher_acc1,
        "teacher_info": None if teacher is None else teacher.info,
        "teacher_network": None if teacher is None else bool(getattr(teacher, "has_network", True)),
        "resources": _resources(module, wall),
        "wall_time_s": round(wall, 2),
        "started": started,
        "resumed_from": cfg.get("ckpt_path"),
        "git": git_revision(),
        "kdx_version": kdx.__version__,
        "torch": torch.__version__,
        "output_dir": str(out),
        "history": module.history,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if hasattr(module, "results_extra"):  # e.g. NAYER's memory bank and synthesis time
        results.update(module.results_extra())
    if trainer.is_global_zero:
        _export(trainer, module, cfg, ctx, results, is_train, dm)
        atomic_write_json(out / "results.json", results)
        log_results(logger, results)  # W&B: the run summary holds results.json's fields
        log.info("test/acc1 last %.2f, best-epoch %s → results in %s", results["test_acc1_last"] or float("nan"),
                 results["best_epoch"], out / "results.json")
    trainer.strategy.barrier()
    close_logger(logger, "success")
    if is_train and "teacher_path" not in results:
        results["teacher_path"] = str(out / "teacher.pt")
        results["teacher_meta"] = _read_json(out / "teacher.json")
    return results


def _resources(module: DistillModule, wall: float) -> dict[str, Any]:
    """Parameter counts and times of the run; a teacher adds its own (e.g. ReffAKD's AE and table build)."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    res: dict[str, Any] = {"student_params": count(module.student), "strategy_params": count(module.strategy),
                           "fit_and_test_time_s": round(wall, 2)}
    if module.teacher is not None:
        res["teacher_params"] = count(module.teacher)
        res.update(getattr(module.teacher, "resources", None) or {})
    return res


def close_logger(logger: Any, status: str) -> None:
    """Finish the logger's run, so the next run in this process (a teacher, then its student) gets its own."""
    if logger is None:
        return
    logger.finalize(status)
    experiment = getattr(logger, "_experiment", None)
    if experiment is not None and hasattr(experiment, "finish"):  # W&B
        experiment.finish(exit_code=0 if status == "success" else 1)


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def _export(trainer, module: DistillModule, cfg: DictConfig, ctx: RunContext, results, is_train: bool, dm) -> None:
    """``student.pt`` (last weights), ``student_best.pt``, and for task=train the teacher files."""
    out = ctx.output_dir
    state = {k: v.detach().cpu() for k, v in module.student.state_dict().items()}
    atomic_torch_save(state, out / "student.pt")
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best_path and Path(best_path).is_file():
        atomic_torch_save(load_state_dict_file(best_path, "checkpoint"), out / "student_best.pt")
    meta = {
        "arch": cfg.model.name,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "dataset": ctx.dataset_key,
        "num_classes": ctx.num_classes,
        "class_names": list(getattr(dm, "class_names", []) or []),
        "test_acc1": results["test_acc1_last"],
        "test_acc1_best": results["test_acc1_best"],
        "epochs": results["epochs"],
        "seed": results["seed"],
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "git": results["git"],
        "config": results["config"],
    }
    atomic_write_json(out / "student.json", meta)
    if not is_train:
        return
    atomic_torch_save(state, out / "teacher.pt")
    from kdx.io import sha256_file

    meta = dict(meta, sha256=sha256_file(out / "teacher.pt"))
    atomic_write_json(out / "teacher.json", meta)
    results["teacher_path"], results["teacher_meta"] = str(out / "teacher.pt"), meta
    if cfg.get("train", {}).get("register_teacher", True):
        store = TeacherStore(cfg.paths.teachers)
        with store.lock(ctx.dataset_key, cfg.model.name):
            if store.lookup(ctx.dataset_key, cfg.model.name) is None:
                path = store.put(ctx.dataset_key, cfg.model.name, out / "teacher.pt", meta)
                log.info("Registered this model as the %s teacher for '%s': %s", cfg.model.name, ctx.dataset_key, path)
