"""What a finished run writes: ``results.json``'s record, the training budget it really ran, and the exported
weights (``student.pt``, ``student_best.pt``, and for a run that trained a network from labels the teacher files)."""
from __future__ import annotations

import datetime as _dt
import shlex
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

import kdx
from kdx.dist import is_rank_zero
from kdx.io import atomic_torch_save, atomic_write_json, load_state_dict_file, sha256_file
from kdx.labels import model_name


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


def training_budget(trainer: Any, max_epochs: int, images_seen: int) -> dict[str, Any]:
    """The budget a finished fit really ran, and whether it was the whole configured budget (``complete``):
    no ``limit_*_batches``, ``max_steps``, ``fast_dev_run`` or ``overfit_batches``, and every epoch done."""
    cuts = []
    limits = {"limit_train_batches": trainer.limit_train_batches, "limit_val_batches": trainer.limit_val_batches,
              "limit_test_batches": trainer.limit_test_batches}
    for key, value in limits.items():
        if value is not None and float(value) != 1.0:
            cuts.append(f"trainer.{key}={value}")
    if trainer.fit_loop.max_steps not in (None, -1):
        cuts.append(f"trainer.max_steps={trainer.fit_loop.max_steps}")
    if trainer.fast_dev_run:
        cuts.append(f"trainer.fast_dev_run={trainer.fast_dev_run}")
    if trainer.overfit_batches:
        cuts.append(f"trainer.overfit_batches={trainer.overfit_batches}")
    done = int(trainer.current_epoch)
    if done < max_epochs:
        cuts.append(f"stopped after {done} of {max_epochs} epochs")
    return {"epochs": int(max_epochs), "epochs_done": done, "steps": int(trainer.global_step),
            "images_seen": int(images_seen), "complete": not cuts, "cut": "; ".join(cuts) or None}


def export(trainer: Any, module: Any, cfg: DictConfig, dm: Any, results: dict[str, Any], trains_teacher: bool) -> None:
    """``student.pt`` (last weights), ``student_best.pt``, ``student.json``; for a run that trained a network from
    labels also ``teacher.pt`` and ``teacher.json`` (results then name them: ``teacher_path``, ``teacher_meta``)."""
    out = Path(cfg.paths.output_dir)
    state = {k: v.detach().cpu() for k, v in module.student.state_dict().items()}
    atomic_torch_save(state, out / "student.pt")
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best_path and Path(best_path).is_file():
        atomic_torch_save(load_state_dict_file(best_path, "checkpoint"), out / "student_best.pt")
    meta = {
        "arch": model_name(cfg.model),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "dataset": dm.dataset_key,
        "num_classes": int(dm.num_classes),
        "class_names": list(dm.class_names),
        "normalisation": {"mean": list(dm.mean), "std": list(dm.std)},
        "test_acc1": results["test_acc1_last"],
        "test_acc1_best": results["test_acc1_best"],
        "epochs": results["epochs"],
        "budget": results["budget"],
        "seed": results["seed"],
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "git": results["git"],
        "config": results["config"],
    }
    atomic_write_json(out / "student.json", meta)
    if not trains_teacher:
        return
    atomic_torch_save(state, out / "teacher.pt")
    meta = dict(meta, sha256=sha256_file(out / "teacher.pt"))
    atomic_write_json(out / "teacher.json", meta)
    results["teacher_path"], results["teacher_meta"] = str(out / "teacher.pt"), meta


def resources(module: Any, wall: float) -> dict[str, Any]:
    """Parameter counts and times of the run; a teacher adds its own (e.g. ReffAKD's AE and table build)."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    res: dict[str, Any] = {"student_params": count(module.student), "strategy_params": count(module.strategy),
                           "fit_and_test_time_s": round(wall, 2)}
    if module.teacher is not None:
        res["teacher_params"] = count(module.teacher)
        res.update(module.teacher.resources)
    return res




def resume_command(cfg: DictConfig) -> str:
    """The command that continues this run from its last checkpoint, in its own folder."""
    from hydra.core.hydra_config import HydraConfig

    out = Path(str(cfg.paths.output_dir))
    overrides: list[str] = []
    if HydraConfig.initialized():
        overrides = [str(o) for o in HydraConfig.get().overrides.task
                     if not str(o).split("=", 1)[0].lstrip("+~") in ("ckpt_path", "hydra.run.dir")]
    last = out / "checkpoints" / "last.ckpt"
    tail = [f"hydra.run.dir={out}"] + ([f"ckpt_path={last}"] if last.is_file() else [])
    return " ".join(["python -m kdx", *(shlex.quote(o) for o in overrides), *tail])


def failure_record(cfg: DictConfig, error: BaseException, signal_name: Optional[str] = None) -> dict[str, Any]:
    """What results.json holds for a run that stopped early: ``failed`` (an error) or ``interrupted`` (Ctrl-C,
    SIGTERM), the epoch its last checkpoint reached, that checkpoint, and the command that resumes it."""
    out = Path(str(cfg.paths.output_dir))
    last = out / "checkpoints" / "last.ckpt"
    done = 0
    if last.is_file():
        try:
            state = torch.load(last, map_location="cpu", weights_only=False)
            done = len((state.get("kdx") or {}).get("history") or [])
        except Exception:  # an unreadable checkpoint: say so, keep it
            done = None
    interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
    return {
        "status": "interrupted" if interrupted else "failed",
        "task": cfg.get("task"),
        "method": cfg.get("method"),
        "error": (f"stopped by {signal_name or 'Ctrl-C'}" if interrupted else f"{type(error).__name__}: {error}"),
        "epochs": cfg.trainer.get("max_epochs") if "trainer" in cfg else None,
        "epochs_done": done,
        "last_checkpoint": str(last) if last.is_file() else None,
        "resume_command": resume_command(cfg),
        "stopped": _dt.datetime.now().isoformat(timespec="seconds"),
        "git": git_revision(),
        "output_dir": str(out),
        "config": OmegaConf.to_container(cfg, resolve=False),
    }


def write_failure_record(cfg: DictConfig, error: BaseException,
                         signal_name: Optional[str] = None) -> Optional[dict[str, Any]]:
    """Write :func:`failure_record` into results.json (this process only if it is rank 0); never raises."""
    try:
        if not is_rank_zero():
            return None
        record = failure_record(cfg, error, signal_name)
        atomic_write_json(Path(str(cfg.paths.output_dir)) / "results.json", record)
        return record
    except Exception:  # the record is a courtesy: never hide the original error behind one of its own
        return None


__all__ = ["export", "failure_record", "git_revision", "resources", "resume_command", "training_budget",
           "write_failure_record"]
