"""Callbacks and loggers built from the config (``logger=``, ``checkpoint``, ``progress_bar``)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class LoggerStartError(RuntimeError):
    pass


def build_callbacks(cfg: DictConfig, output_dir: Path, with_logger: bool) -> list[Any]:
    ck = cfg.checkpoint
    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=str(output_dir / "checkpoints"),
            filename="best-epoch{epoch:03d}",
            auto_insert_metric_name=False,
            monitor=ck.monitor,
            mode=ck.mode,
            save_top_k=ck.save_top_k,
            save_last=ck.save_last,
            every_n_epochs=ck.every_n_epochs,
        )
    ]
    bar = cfg.progress_bar
    if bar == "rich":
        callbacks.append(RichProgressBar(leave=True))
    elif bar == "tqdm":
        callbacks.append(TQDMProgressBar())
    elif bar not in ("none", None, False):
        raise ValueError(f"progress_bar={bar!r}: use rich, tqdm or none.")
    if with_logger:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    return callbacks


def build_logger(cfg: DictConfig, run_info: dict[str, Any]) -> Optional[Any]:
    """Instantiate ``cfg.logger`` (or none) and make sure it really starts.

    For W&B, unset ``group``/``name``/``job_type``/``tags`` are filled from the run: the group is
    ``<dataset>/<teacher>-<student>`` (a sweep's runs of one pair share it), the job type is the
    method, and the tags name the dataset, the pair and the method.
    """
    lcfg = cfg.get("logger")
    if not lcfg or not lcfg.get("_target_"):
        return None
    target = lcfg._target_
    extra: dict[str, Any] = {}
    if target.endswith("WandbLogger"):
        extra = {
            "group": lcfg.get("group") or f"{run_info['dataset']}/{run_info['pair']}",
            "name": lcfg.get("name") or f"{run_info['method']}-{run_info['pair']}-seed{run_info['seed']}",
            "job_type": lcfg.get("job_type") or run_info["method"],
            "tags": list(lcfg.get("tags") or []) + [run_info["dataset"], run_info["pair"], run_info["method"]],
        }
    try:
        logger = instantiate(lcfg, **extra)
        _ = logger.experiment  # start it now: a logger that cannot start must fail loudly, here
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
