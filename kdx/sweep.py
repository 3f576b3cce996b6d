"""Sweeps that survive being stopped: deterministic folders, skip/resume, a config fingerprint,
and the checks that keep Lightning's DDP and Hydra's launchers from fighting.

``resume=auto`` makes every job's folder a function of the command line, not of the clock
(see the resolvers below and ``conf/hydra/default.yaml``), so re-running a killed sweep finds its
jobs again: a job with a complete ``results.json`` is skipped, a job with ``checkpoints/last.ckpt``
continues from it. A fingerprint of the job's config, stored beside its results, makes sure a
folder is only ever reused by the config that made it.

This module is imported when the config is composed (for its resolvers): no torch at import time.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

log = logging.getLogger("kdx")

RESUME_MODES = ("never", "auto")
FINGERPRINT_FILE = "config_fingerprint.json"
# Keys that may differ between two runs of the same experiment: where things are, how progress is shown,
# where it is logged, and how the run was started. Everything else must match for a folder to be reused.
FINGERPRINT_EXCLUDE = (
    "paths", "ckpt_path", "resume", "sweep_name", "progress_bar", "logger", "hydra",
    "trainer.enable_progress_bar", "data.root", "data.npz_path", "data.cache_dir",
)
DEFAULT_NAME = "default"  # the folder of a run (or sweep) without any override


# --------------------------------------------------------------------------------------------------
# Folder names (OmegaConf resolvers, registered by kdx.config.register_resolvers)


def check_resume(value: Any) -> str:
    if value not in RESUME_MODES:
        from kdx.config import ConfigError

        raise ConfigError(f"resume={value!r} is not one of {', '.join(RESUME_MODES)} "
                          "(never: a new timestamped folder per run; auto: a folder named by the overrides, "
                          "complete jobs skipped, interrupted ones resumed).")
    return str(value)


def _override_key(text: str) -> str:
    key = text.split("=", 1)[0].strip()
    return key.lstrip("+~")


def _excluded(key: str, exclude: Iterable[str]) -> bool:
    return any(key == e or key.startswith(e + ".") or key.startswith(e + "/") for e in exclude)


def name_from_overrides(overrides: Iterable[str], exclude: Iterable[str] = ()) -> str:
    """A readable folder name from command-line overrides: sorted by key (the order of the overrides
    does not change the jobs), joined with ``__``, with excluded keys (paths, logger, resume, ...) left out.

    ``distill=none,kd seed=0,1`` → ``distill=none,kd__seed=0,1``; no override → ``default``.
    """
    from kdx.config import path_safe

    exclude = list(exclude)
    kept = sorted((str(o) for o in overrides if not _excluded(_override_key(str(o)), exclude)), key=_override_key)
    return path_safe("__".join(kept)) if kept else DEFAULT_NAME


def sweep_dir(resume: str, sweep_name: Optional[str], overrides: Any, exclude: Any, stamp: str, *_: Any) -> str:
    """``hydra.sweep.dir``. resume=never: ``multirun/<stamp>``; resume=auto: ``multirun/<sweep_name>``, or
    ``multirun/<the command line's overrides>`` when no ``sweep_name`` is set.

    Registered with ``use_cache``: the value is computed once, in the process that starts the sweep, from the
    command line's overrides (``hydra.overrides.task``: ``distill=none,kd``). Hydra copies that cache into every
    job's config (``load_sweep_config``), where ``hydra.overrides.task`` holds only the job's own overrides;
    without the cache each job would name a different sweep folder. Further arguments are only evaluated (to
    fill the cache of :func:`fixed_keys` in that same process).
    """
    if check_resume(resume) == "never":
        return f"multirun/{stamp}"
    if sweep_name:
        return f"multirun/{sweep_name}"
    exclude = list(exclude or []) + ["resume", "sweep_name"]
    return f"multirun/{name_from_overrides(list(overrides or []), exclude)}"


def fixed_keys(overrides: Any) -> list[str]:
    """The keys the command line sets to one value (not swept): ``distill=kd seed=0,1`` → ``["distill"]``.

    Registered with ``use_cache`` and evaluated inside ``hydra.sweep.dir``: computed where the sweep starts
    and copied into each job's config, like the sweep name (a job only sees its own overrides).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides or []])
    return [_override_key(o.get_key_element()) for o in parsed if not o.is_sweep_override()]


def job_subdir(resume: str, num: Any, override_dirname: str, overrides: Any = (), fixed: Any = (),
               exclude: Any = ()) -> str:
    """``hydra.sweep.subdir``. resume=never: ``<job number>_<override_dirname>``. resume=auto: the job's
    swept overrides only (``distill=kd,seed=1``; the fixed ones already name the sweep folder), sorted, without
    the job number, which depends on the order of the sweep; all of override_dirname when nothing is swept."""
    from kdx.config import path_safe

    if check_resume(resume) == "never":
        return f"{num}_{path_safe(override_dirname)}"
    skip = set(fixed or []) | set(exclude or []) | {"resume", "sweep_name"}
    swept = sorted((str(o) for o in overrides or [] if not _excluded(_override_key(str(o)), skip)), key=_override_key)
    if swept:
        return path_safe(",".join(swept))
    return path_safe(override_dirname) if override_dirname else DEFAULT_NAME


def run_dir(resume: str, sweep_name: Optional[str], override_dirname: str, stamped: str) -> str:
    """``hydra.run.dir``: ``outputs/<stamped>`` (resume=never), else ``outputs/[<sweep_name>/]<overrides>``."""
    from kdx.config import path_safe

    if check_resume(resume) == "never":
        return f"outputs/{stamped}"
    name = path_safe(override_dirname) if override_dirname else DEFAULT_NAME
    return f"outputs/{sweep_name}/{name}" if sweep_name else f"outputs/{name}"


def _devices_count(devices: Any, accelerator: Any = "gpu", count_local: bool = False) -> Optional[int]:
    """Processes per node that ``trainer.devices`` asks for; None for "all devices" when not counted here."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        if devices > 0:
            return devices
        return _local_gpus(accelerator) if count_local else None
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    text = str(devices).strip()
    if text.lstrip("-").isdigit():
        return _devices_count(int(text), accelerator, count_local)
    if text == "auto":
        if str(accelerator) == "cpu":
            return 1
        return _local_gpus(accelerator) if count_local else None
    return len([d for d in text.split(",") if d.strip()])  # "0,1"


def _local_gpus(accelerator: Any) -> int:
    if str(accelerator) == "cpu":
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def launcher_tasks(devices: Any, where: str = "slurm") -> int:
    """``hydra.launcher.tasks_per_node`` of kdx's submitit presets: one task per device (Lightning's DDP rank).

    SLURM must know the number before the job starts, so ``trainer.devices=-1``/``auto`` is refused there;
    a local launcher counts this machine's GPUs.
    """
    n = _devices_count(devices, count_local=(where == "local"))
    if n is None:
        from kdx.config import ConfigError

        raise ConfigError(
            f"trainer.devices={devices} cannot size a SLURM job (tasks_per_node = gpus_per_node = trainer.devices). "
            "Set trainer.devices=<GPUs per node>, e.g. trainer.devices=4."
        )
    return n


def launcher_gpus(accelerator: Any, devices: Any, where: str = "slurm") -> Optional[int]:
    """``hydra.launcher.gpus_per_node``: the devices on a GPU accelerator, none on CPU.

    submitit's local executor hides every GPU it was not asked for (CUDA_VISIBLE_DEVICES), so a GPU job
    must ask for them.
    """
    if str(accelerator) == "cpu":
        return 0 if where == "local" else None
    if str(accelerator) == "auto" and where == "local":
        import torch

        if not torch.cuda.is_available():  # Lightning's "auto" will pick the CPU here
            return 0
    return launcher_tasks(devices, where)


# --------------------------------------------------------------------------------------------------
# Fingerprint, skip, resume (called at the start of kdx.runner.run)


def fingerprint_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config without the keys in :data:`FINGERPRINT_EXCLUDE`, as a flat ``{dotted key: value}``."""
    from kdx.config import resolved
    from kdx.io import flatten

    if isinstance(cfg, DictConfig):
        container = OmegaConf.to_container(resolved(cfg), resolve=True)
    else:
        container = dict(cfg)
    flat = {k: v for k, v in sorted(flatten(container).items()) if not _excluded(k, FINGERPRINT_EXCLUDE)}
    return json.loads(json.dumps(flat, default=str))  # as it reads back from the file (lists, str for odd types)


def fingerprint_digest(flat: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 12) -> list[str]:
    missing = object()
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            show = lambda v: "(absent)" if v is missing else json.dumps(v, default=str)  # noqa: E731
            diffs.append(f"{key}: {show(a)} → {show(b)}")
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
    return diffs


def is_rank_zero() -> bool:
    """True unless this process is a DDP rank > 0 (Lightning's popen children, SLURM or submitit tasks)."""
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _stored_fingerprint(out: Path) -> Optional[dict[str, Any]]:
    """The folder's fingerprint file, or one computed from the config recorded in its results.json."""
    stored = _read_json(out / FINGERPRINT_FILE)
    if stored and "config" in stored:
        return stored["config"]
    results = _read_json(out / "results.json")
    if results and isinstance(results.get("config"), dict):
        return fingerprint_config(results["config"])
    return None


def prepare_job(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """The resume/skip step before anything is built.

    Always: check ``resume=``, write the config fingerprint into the job folder (rank 0), after checking that
    a folder which already holds a run (resume=auto) was made by the same config. With ``resume=auto``:
    complete ``results.json`` → return it (the caller skips the job); else ``checkpoints/last.ckpt`` and no
    ``ckpt_path`` → set ``cfg.ckpt_path`` to it (the results record it as ``resumed_from``).
    """
    from kdx.config import ConfigError

    mode = check_resume(cfg.get("resume", "never"))
    out = Path(str(cfg.paths.output_dir))
    flat = fingerprint_config(cfg)
    last = out / "checkpoints" / "last.ckpt"
    results_path = out / "results.json"
    if mode == "auto" and (results_path.is_file() or last.is_file() or (out / FINGERPRINT_FILE).is_file()):
        old = _stored_fingerprint(out)
        if old is None:
            raise ConfigError(
                f"resume=auto: the job folder {out} holds a run (checkpoints or results) but no record of its config "
                f"({FINGERPRINT_FILE} or the config in results.json), so kdx cannot tell whether it is this experiment. "
                "Name another folder with sweep_name=<new name> (or hydra.run.dir=...), or delete the folder to start "
                "it again."
            )
        if fingerprint_digest(old) != fingerprint_digest(flat):
            diffs = "\n  ".join(_differences(old, flat))
            raise ConfigError(
                f"resume=auto: the job folder {out} holds a run of a different config, so it is neither reused nor "
                f"overwritten. Differences (folder → this run):\n  {diffs}\n"
                "Give this experiment its own folder with sweep_name=<new name>, or delete the folder to run it again "
                "with the new config (resume=never writes to a new timestamped folder instead)."
            )
        results = _read_json(results_path)
        if results and results.get("status") == "complete":
            log.info("skipping: complete results in %s (resume=auto)", results_path)
            return results
        if last.is_file() and not cfg.get("ckpt_path"):
            log.info("resuming from %s (resume=auto)", last)
            with read_write(cfg), open_dict(cfg):
                cfg.ckpt_path = str(last)
    if is_rank_zero():
        from kdx.io import atomic_write_json

        record = {"sha256": fingerprint_digest(flat), "created": _dt.datetime.now().isoformat(timespec="seconds"),
                  "excluded": list(FINGERPRINT_EXCLUDE), "config": flat}
        if mode == "never" or _read_json(out / FINGERPRINT_FILE) is None:
            atomic_write_json(out / FINGERPRINT_FILE, record)
    return None


# --------------------------------------------------------------------------------------------------
# DDP under Hydra launchers


SUBMITIT_LAUNCHERS = ("hydra_plugins.hydra_submitit_launcher.",)


def _strategy_reruns(strategy: Any) -> Optional[bool]:
    """How ``trainer.strategy`` starts its other processes, given more than one: True by re-running the command
    line (Lightning's popen launcher), False by spawning/forking, None: not a DDP-like strategy kdx knows."""
    if isinstance(strategy, (DictConfig, Mapping)) and strategy.get("_target_"):
        from hydra.utils import get_class
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

        cls = get_class(str(strategy["_target_"]))
        if issubclass(cls, DDPStrategy):
            return str(strategy.get("start_method", "popen")) == "popen"
        return issubclass(cls, (FSDPStrategy, DeepSpeedStrategy)) or None
    name = str(strategy or "auto")
    if name.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")):
        return False
    if name in ("auto",) or name.startswith(("ddp", "fsdp", "deepspeed")):
        return True
    return None


def ddp_processes(trainer: Mapping[str, Any], count_local: bool = True) -> Optional[int]:
    """Total DDP processes the trainer config asks for (devices × nodes); None when not countable here."""
    per_node = _devices_count(trainer.get("devices", 1), trainer.get("accelerator", "auto"), count_local)
    if per_node is None:
        return None
    return per_node * int(trainer.get("num_nodes", 1) or 1)


def reruns_command_line(trainer: Mapping[str, Any]) -> bool:
    """True when Lightning would start this trainer's other ranks by re-running ``sys.argv``."""
    n = ddp_processes(trainer)
    return bool(n and n > 1 and _strategy_reruns(trainer.get("strategy")))


def check_launch(cfg: DictConfig, hydra_cfg: Any) -> None:
    """Refuse launches that cannot give a correct run, before anything is built:

    - DDP started by spawn/fork (any run): kdx's results would lose the history kept in the worker processes;
    - in a multirun under Hydra's basic or the joblib launcher, DDP that re-runs the command line;
    - under submitit, a job whose task count is not the trainer's process count (one task per DDP rank).

    ``hydra_cfg`` is the ``hydra`` node (HydraConfig.get()), or None outside Hydra.
    """
    from kdx.config import ConfigError

    trainer = cfg.trainer
    n = ddp_processes(trainer)
    if n and n > 1 and _strategy_reruns(trainer.get("strategy")) is False:
        raise ConfigError(
            f"trainer.strategy={_strategy_name(trainer.get('strategy'))} with start_method spawn/fork: Lightning runs "
            "fit and test in new processes and hands back only the weights, so the run's history and best epoch "
            "(results.json: epochs_done, best_epoch, test_acc1_best) would be lost. Use the default start method "
            "(trainer.strategy.start_method=popen, or trainer.strategy=ddp); in a sweep, launch DDP jobs with "
            "hydra/launcher=kdx_local or hydra/launcher=kdx_slurm."
        )
    if hydra_cfg is None:
        return
    from hydra.types import RunMode

    if hydra_cfg.get("mode") != RunMode.MULTIRUN:
        return
    launcher = str((hydra_cfg.get("launcher") or {}).get("_target_", ""))
    if launcher.startswith(SUBMITIT_LAUNCHERS):
        _check_submitit_tasks(trainer, hydra_cfg.launcher)
        return
    if reruns_command_line(trainer):
        if "joblib" in launcher:
            what = "the joblib launcher, is a joblib worker process (python -m joblib.externals.loky...)"
        else:
            what = "Hydra's basic launcher, is the whole sweep (python -m kdx -m ...)"
        raise ConfigError(
            f"This multirun job asks for DDP with {ddp_processes(trainer)} processes (trainer.devices="
            f"{trainer.get('devices')}, trainer.num_nodes={trainer.get('num_nodes', 1)}, trainer.strategy="
            f"{_strategy_name(trainer.get('strategy'))}). Lightning starts the other ranks by re-running the command "
            f"line, which, under {what}, not this job. "
            "Launch each job as one DDP group instead: hydra/launcher=kdx_slurm (SLURM, tasks_per_node = "
            "trainer.devices) or hydra/launcher=kdx_local (this machine, one submitit task per device); or keep this "
            "launcher with single-device jobs (trainer.devices=1)."
        )


def _strategy_name(strategy: Any) -> str:
    if isinstance(strategy, (DictConfig, Mapping)) and strategy.get("_target_"):
        return str(strategy["_target_"]).rsplit(".", 1)[-1]
    return str(strategy)


def _check_submitit_tasks(trainer: Mapping[str, Any], launcher: Mapping[str, Any]) -> None:
    """One submitit task per DDP rank: Lightning then finds the ranks in the environment (SLURM's, or the
    one :func:`export_submitit_ranks` writes) and starts no process itself."""
    from kdx.config import ConfigError

    tasks = int(launcher.get("tasks_per_node", 1) or 1) * int(launcher.get("nodes", 1) or 1)
    wanted = ddp_processes(trainer, count_local="LocalLauncher" in str(launcher.get("_target_", "")))
    if wanted is None:
        raise ConfigError(f"trainer.devices={trainer.get('devices')} cannot size a submitit job: "
                          "set trainer.devices=<devices per node>.")
    if tasks != wanted:
        raise ConfigError(
            f"The submitit launcher starts {tasks} task(s) (hydra.launcher.nodes × tasks_per_node) but the trainer "
            f"asks for {wanted} process(es) (trainer.num_nodes × trainer.devices). Each DDP rank must be one "
            "submitit task: use hydra/launcher=kdx_slurm or hydra/launcher=kdx_local (sized from the trainer), or set "
            f"hydra.launcher.tasks_per_node={wanted // max(1, int(trainer.get('num_nodes', 1) or 1))} and "
            f"hydra.launcher.nodes={trainer.get('num_nodes', 1)}."
        )


def export_submitit_ranks() -> None:
    """Under submitit's *local* executor, tell Lightning which DDP rank this task is.

    submitit starts ``tasks_per_node`` processes but, unlike SLURM, leaves no variable Lightning reads. With
    ``LOCAL_RANK`` (and the rest of torch's env:// variables) set, Lightning's default cluster environment
    "creates processes externally" and joins them instead of re-running ``sys.argv`` — which here is
    ``python -m submitit.core._submit <folder>`` and cannot be re-run with Hydra overrides. Under SLURM,
    Lightning's SLURMEnvironment reads SLURM's variables itself, so nothing is exported there.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") != "local" or "LOCAL_RANK" in os.environ:
        return
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return
    dist = submitit.helpers.TorchDistributedEnvironment()
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(dist.master_port), "WORLD_SIZE": str(dist.world_size),
        "RANK": str(dist.rank), "LOCAL_RANK": str(dist.local_rank), "NODE_RANK": "0",
    })


class SweepGuard(Callback):
    """Hydra callback: check the sweep's launcher against its trainer once, before any job starts.

    The same check runs again in every job (kdx.cli), where each job's own overrides are known; this one
    catches the common case (``trainer=ddp`` for the whole sweep) before a single job is launched or
    submitted.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            trainer = config.trainer
            OmegaConf.to_container(trainer, resolve=True)
        except Exception:  # a value only a job can resolve: the job checks itself
            return
        from kdx.config import ConfigError

        try:
            check_launch(config, config.hydra)
        except Exception as e:  # Hydra turns a callback's exception into a warning and goes on: exit here
            cause = e if isinstance(e, ConfigError) else e.__cause__ or e.__context__
            if not isinstance(cause, ConfigError):  # e.g. a launcher value resolved only later: leave it to Hydra
                return
            log.error("ConfigError: %s", cause)
            raise SystemExit(1) from None
