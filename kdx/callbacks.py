"""Callbacks: kdx's own (the LR monitor that needs no logger, the teacher's pictures) and the ``callbacks`` config
group's instantiation (``conf/callbacks/``: one node per callback; null removes one)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import LearningRateMonitor as _LightningLRMonitor
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """One callback per non-null node of ``cfg.callbacks`` (the progress bar included)."""
    nodes = cfg.get("callbacks") or {}
    return [instantiate(node) for node in nodes.values() if node is not None]


class LearningRateMonitor(_LightningLRMonitor):
    """Lightning's LR monitor, which does nothing when the run has no logger (Lightning's refuses to start)."""

    def on_train_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class LogTeacherImages(Callback):
    """Logs the teacher's pictures once when fitting starts (``Teacher.images``: key → PNG file, e.g. ReffAKD's
    class-similarity heat-map), so that a run shows the soft targets it distilled from; only with a logger that
    takes images (W&B)."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        from lightning.pytorch.loggers import WandbLogger

        teacher = pl_module.teacher
        logger = trainer.logger
        if teacher is None or not teacher.images or not trainer.is_global_zero or not isinstance(logger, WandbLogger):
            return
        for key, path in teacher.images.items():
            if Path(path).is_file():
                logger.log_image(key=key, images=[str(path)])
            else:
                log.warning("The teacher's image %s (%s) is missing: not logged.", key, path)


__all__ = ["LearningRateMonitor", "LogTeacherImages", "build_callbacks"]
