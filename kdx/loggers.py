"""Loggers built from the config (``logger=wandb|csv|tensorboard|none``), the W&B identity of a run, and what
goes to the logger besides Lightning's metrics (the resolved config, results.json's fields)."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdx.errors import LoggerStartError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepInfo:
    """The Hydra multirun a job belongs to: its folder (the sweep's identity) and the job's number."""

    dir: str
    job: int


def hydra_sweep() -> Optional[SweepInfo]:
    """This job's Hydra sweep, or ``None`` for a single run (and outside Hydra: tests, the Python API).

    The sweep folder is given relative to the working folder (``multirun/2026-11-25/07-43-11``) when it
    lies under it: readable in W&B, and the same string for every job of one ``-m`` invocation (Hydra
    resolves ``${now:...}`` once per sweep), whichever launcher runs the jobs.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.get("mode") != RunMode.MULTIRUN:
        return None
    folder = Path(str(hc.sweep.dir))
    if folder.is_absolute():
        try:
            folder = folder.relative_to(Path(str(hc.runtime.cwd)))
        except ValueError:
            pass
    return SweepInfo(dir=folder.as_posix(), job=int(hc.job.num))


def _fit(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters: its start and a hash, so distinct long values stay distinct."""
    if len(text) <= limit:
        return text
    return text[: limit - 9] + "~" + hashlib.sha1(text.encode()).hexdigest()[:8]


def wandb_identity(run_info: Mapping[str, Any], lcfg: Mapping[str, Any], sweep: Optional[SweepInfo],
                   agent_run: Optional[str] = None) -> dict[str, Any]:
    """W&B ``group``, ``name``, ``job_type`` and ``tags`` of a run; values set in ``logger.*`` win.

    - group: the Hydra sweep's folder under ``-m`` (one W&B group per sweep, so its runs are compared
      side by side), else ``<dataset>/<pair>`` (the single runs of one pair together);
    - name: ``<method>-<pair>-seed<seed>``, plus ``-job<n>`` in a Hydra sweep, or ``-<run id>`` for a run
      started by ``wandb agent`` (``agent_run``): jobs differing only in a hyper-parameter would otherwise
      share a name;
    - job_type: the method label; tags: the user's ``logger.tags``, then dataset, pair and method.
    W&B refuses tags over 64 characters (the run would not start); tags and the job type are kept within
    64 characters and the group within 128 (a sweep named by its overrides can be longer), start + hash.
    """
    method, pair, dataset = str(run_info["method"]), str(run_info["pair"]), str(run_info["dataset"])
    name = f"{method}-{pair}-seed{run_info['seed']}"
    if sweep is not None:
        name += f"-job{sweep.job}"
    elif agent_run:
        name += f"-{agent_run}"
    tags: list[str] = []
    for tag in [*(lcfg.get("tags") or []), dataset, pair, method]:
        tag = _fit(str(tag), 64)
        if tag not in tags:
            tags.append(tag)
    return {
        "group": _fit(str(lcfg.get("group") or (sweep.dir if sweep is not None else f"{dataset}/{pair}")), 128),
        "name": lcfg.get("name") or name,
        "job_type": _fit(str(lcfg.get("job_type") or method), 64),
        "tags": tags,
    }


def _define_wandb_metrics(experiment: Any) -> None:
    """Summaries a runs table needs: W&B keeps the last value of a metric, but accuracy is read at its best.

    ``val/acc1`` and ``val/acc5`` keep their maximum and last value, ``train/loss`` its minimum and last.
    Each keeps Lightning's x-axis (``trainer/global_step``), which an exact definition would otherwise drop.
    """
    for name, summary in (("val/acc1", "max,last"), ("val/acc5", "max,last"), ("train/loss", "min,last")):
        experiment.define_metric(name, step_metric="trainer/global_step", summary=summary)


def build_logger(cfg: DictConfig, run_info: dict[str, Any]) -> Optional[Any]:
    """Instantiate ``cfg.logger`` (or none) and make sure it really starts (see :func:`wandb_identity`)."""
    lcfg = cfg.get("logger")
    if not lcfg or not lcfg.get("_target_"):
        return None
    target = lcfg._target_
    is_wandb = target.endswith("WandbLogger")
    extra: dict[str, Any] = {}
    if is_wandb:  # `wandb agent` gives its run its id (and a sweep id) in the environment
        agent_run = os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None
        extra = wandb_identity(run_info, lcfg, hydra_sweep(), agent_run)
    try:
        logger = instantiate(lcfg, **extra)
        experiment = logger.experiment  # start it now: a logger that cannot start must fail loudly, here
        if is_wandb:
            _define_wandb_metrics(experiment)
    except Exception as e:
        name = target.rsplit(".", 1)[-1]
        raise LoggerStartError(
            f"The logger ({name}, from logger=...) could not start: {type(e).__name__}: {e}. "
            "Fix its settings (for W&B: logger.mode=offline|online|disabled, logger.project, WANDB_API_KEY "
            "for online), or choose another with logger=csv|tensorboard|none."
        ) from e
    return logger


def log_config(logger: Any, cfg: DictConfig) -> None:
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))


def log_results(logger: Any, results: Mapping[str, Any]) -> None:
    """``results.json`` into the run summary of a W&B logger (no-op for others), on rank 0.

    Every field goes in as it is (nested dicts such as ``data``, ``resources`` and ``teacher_info`` stay
    dicts, which W&B shows as ``resources.student_params``), except ``config``, which is the run config
    already, and ``history``, which becomes a table (one row per epoch, the epoch's mean training loss
    included, which the step-wise curves do not give).
    """
    if not _is_wandb(logger):
        return
    experiment = logger.experiment
    experiment.summary.update({k: v for k, v in results.items() if k not in ("history", "config")})
    history = results.get("history") or []
    if history:
        import wandb

        columns = list(dict.fromkeys(k for row in history for k in row))
        rows = [[row.get(c) for c in columns] for row in history]
        experiment.log({"history": wandb.Table(columns=columns, data=rows)})


def close_logger(logger: Any, status: str) -> None:
    """Finish the logger's run, so the next run in this process (a teacher, then its student) gets its own."""
    if logger is None:
        return
    logger.finalize(status)
    if _is_wandb(logger) and logger._experiment is not None:  # W&B: the next run in this process gets its own
        logger._experiment.finish(exit_code=0 if status == "success" else 1)


def _is_wandb(logger: Any) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


__all__ = ["SweepInfo", "build_logger", "close_logger", "hydra_sweep", "log_config", "log_results", "wandb_identity"]
