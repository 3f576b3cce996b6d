"""DDP under Hydra's launchers: the checks that keep Lightning's process launching and Hydra's from
fighting, the submitit-local rank export, the sizing resolvers of kdx's launcher presets, and the
sweep-start guard (a Hydra callback).

Imported when the config is composed (for its resolvers): torch and Lightning are imported lazily, inside
the functions that need them.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from kdx.errors import ConfigError

log = logging.getLogger("kdx")


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


def linear_lr(base_lr: float, base_batch: int, batch_size: int, devices: Any = 1, num_nodes: Any = 1,
              accelerator: Any = "auto") -> float:
    """The learning rate by the linear scaling rule (Goyal et al. 2017), the ``kdx_linear_lr`` resolver of the
    ImageNet recipes: ``base_lr`` for every ``base_batch`` samples of the global batch, ``batch_size`` (per process)
    × the trainer's processes (devices × nodes; ``devices=-1``/``auto`` counts this machine's GPUs)."""
    processes = ddp_processes({"devices": devices, "num_nodes": num_nodes, "accelerator": accelerator}) or 1
    return float(base_lr) * int(batch_size) * processes / int(base_batch)


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


def check_writable(folder: Any, setting: str) -> None:
    """Raise :class:`ConfigError` naming ``setting`` when ``folder`` cannot be created or written."""
    path = Path(str(folder))
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".kdx-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"The output folder {path} cannot be written ({e.strerror or e}): choose another with "
                          f"{setting}=<folder>, or free that one.") from None


def _cache_fixed_keys(config: DictConfig) -> None:
    """Compute the command line's fixed keys here, where the sweep starts, into the config's resolver cache, which
    Hydra copies into every job: kdx's ``hydra.sweep.dir`` does that itself, but a user's ``hydra.sweep.dir=...``
    replaces it, and each job would then take all of its own overrides as fixed (and name its folder by them)."""
    key = "_kdx_fixed_keys"
    with open_dict(config.hydra):
        config.hydra[key] = "${kdx_fixed_keys:${hydra.overrides.task}}"
        try:
            config.hydra[key]  # evaluating it fills the cache
        finally:
            del config.hydra[key]


class LaunchGuard(Callback):
    """Hydra callback: checks that need no job, before Hydra creates the first job folder.

    - a single run: its output folder (``hydra.run.dir``) can be written;
    - a sweep: its folder (``hydra.sweep.dir``) can be written, and its launcher fits its trainer (DDP under a
      launcher that would re-run the command line is refused). The launch check runs again in every job (kdx.cli),
      where each job's own overrides are known; this one catches the common case (``trainer=ddp`` for the whole
      sweep) before a single job is launched or submitted.

    Hydra turns a callback's exception into a warning and goes on, so a failed check logs its one line and exits.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._exit_on_error(lambda: check_writable(config.hydra.run.dir, "hydra.run.dir"))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._exit_on_error(lambda: check_writable(config.hydra.sweep.dir, "hydra.sweep.dir"))
        _cache_fixed_keys(config)
        try:
            trainer = config.trainer
            OmegaConf.to_container(trainer, resolve=True)
        except Exception:  # a value only a job can resolve: the job checks itself
            return
        self._exit_on_error(lambda: check_launch(config, config.hydra))

    @staticmethod
    def _exit_on_error(check: Any) -> None:
        try:
            check()
        except Exception as e:
            cause = e if isinstance(e, ConfigError) else e.__cause__ or e.__context__
            if not isinstance(cause, ConfigError):  # e.g. a launcher value resolved only later: leave it to Hydra
                return
            log.error("ConfigError: %s", cause)
            raise SystemExit(1) from None
