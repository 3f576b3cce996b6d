"""Callbacks: kdx's own (the LR monitor that needs no logger, the teacher's pictures) and the ``callbacks`` config
group's instantiation (``conf/callbacks/``: one node per callback; null removes one)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.callbacks import LearningRateMonitor as _LightningLRMonitor
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """One callback per non-null node of ``cfg.callbacks`` (the progress bar included)."""
    nodes = cfg.get("callbacks") or {}
    return [instantiate(node) for node in nodes.values() if node is not None]


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with two guarantees kdx's resume relies on:

    - ``last.ckpt`` is the last *completed* epoch, always: Lightning (2.6) rewrites it only in an epoch where a
      top-k checkpoint was saved, so with ``save_top_k=1`` it lagged behind whenever ``val/acc1`` did not improve.
      An interruption (Ctrl-C, SIGTERM) saves nothing mid-epoch: kdx's batch order cannot resume exactly inside an
      epoch, so ``last.ckpt`` stays the last completed epoch and the interrupted epoch is run again.
    - file names count epochs from 1, as ``best_epoch`` and the history do (``best-epoch001.ckpt`` is epoch 1).
    """

    # after the parent's own save, in the same hook (the other one would mark the step saved and block its top-k)
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        # Lightning's own test, first: with neither every_n_train_steps nor train_time_interval it saves nothing
        # per step, but only after its per-step bookkeeping (kdx.bench_phases)
        if self._every_n_train_steps < 1 and self._train_time_interval is None:
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def _save_last_if_behind(self, trainer: Any) -> None:
        if not self.save_last or self._should_skip_saving_checkpoint(trainer) or trainer.sanity_checking:
            return
        if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _format_checkpoint_name(self, filename: Optional[str], metrics: dict[str, Any], prefix: Optional[str] = None,
                                auto_insert_metric_name: bool = True) -> str:
        if "epoch" in metrics:  # Lightning counts from 0
            metrics = dict(metrics, epoch=metrics["epoch"] + 1)
        return super()._format_checkpoint_name(filename, metrics, prefix, auto_insert_metric_name)


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


__all__ = ["Checkpoint", "LearningRateMonitor", "LogTeacherImages", "build_callbacks"]
