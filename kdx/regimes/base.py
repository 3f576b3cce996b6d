"""The regimes' shared base: one LightningModule family (``module=distill|datafree``).

:class:`KDModule` owns what every regime has: evaluation (validation and test top-1/top-5, the teacher's own
accuracy once), the per-epoch history, the best epoch, checkpoint state, the optimiser and schedule (over the
student's parameters and the strategy's trainable parts), the training losses' logging and non-finite check, and
the teacher's device and hooks. The teacher is held outside the module's submodules, so it is never in
``parameters()``, the optimiser, a checkpoint or the DDP wrapper, and ``train()`` on the module cannot switch it out
of eval mode.

A regime is built by the composition root as ``instantiate(cfg.module)(parts)``: :class:`Parts` bundles the run's
objects; the regime's own settings are its config node's keys. What the orchestration reads from a regime is
declared here with its default: ``regime``, :meth:`fit_datamodule`, :meth:`trainer_kwargs`, :meth:`results_extra`.

No host synchronisation inside a training step: the loss and its terms are summed on the device
(:class:`kdx.regimes.window.TermWindow`) and read back only every ``trainer.log_every_n_steps`` steps (logged as
their per-step mean) and every ``perf.check_finite_every`` steps (the non-finite check), and at each epoch's end.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch import LightningDataModule
from torchmetrics.classification import MulticlassAccuracy

from kdx.errors import ConfigError, NonFiniteLossError
from kdx.regimes.step import StepParts
from kdx.regimes.window import TermWindow, stacked

log = logging.getLogger(__name__)


@dataclass
class Perf:
    """The ``perf`` node: memory format, compilation, and the non-finite loss check.

    The check reads the losses back at each logging point (every ``trainer.log_every_n_steps`` steps), also every
    ``check_finite_every`` steps when set, and at the end of every epoch, before its checkpoint: a run whose loss
    turns non-finite stops at the next check, naming the steps since the previous one and the term(s)."""

    channels_last: bool = False
    compile: bool = False
    check_finite: bool = True
    check_finite_every: Optional[int] = None

    def __post_init__(self) -> None:
        if self.check_finite_every is not None and (isinstance(self.check_finite_every, bool)
                                                    or int(self.check_finite_every) < 1):
            raise ConfigError(f"perf.check_finite_every={self.check_finite_every} must be a number of steps >= 1, or "
                              "null (check at the logging points only: trainer.log_every_n_steps)")


@dataclass
class Parts:
    """Everything a regime is built from (the composition root fills it)."""

    step: StepParts
    optimizer: Callable[..., torch.optim.Optimizer]
    scheduler: Optional[Callable[..., Any]]
    datamodule: LightningDataModule
    num_classes: int
    perf: Perf
    output_dir: Path
    seed: int
    split_losses: bool = False  # the optimiser steps on the task and the distillation gradients apart (optim=dot)


@dataclass
class _StepCounts:
    """The epoch's training-loss sum (on the device) and step count, and the images seen."""

    loss_sum: Optional[torch.Tensor] = None
    loss_n: int = 0
    images_seen: int = 0


def _accuracy(num_classes: int, k: int) -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=num_classes, top_k=min(k, num_classes), average="micro")


class KDModule(pl.LightningModule):
    #: the strategies this regime runs: a strategy whose ``regime`` differs is refused at build time
    regime: ClassVar[str] = "distill"

    def __init__(self, parts: Parts) -> None:
        super().__init__()
        step = parts.step
        self.student = step.student
        self.strategy = step.strategy
        object.__setattr__(self, "teacher", step.teacher)  # deliberately not a registered submodule
        object.__setattr__(self, "parts", parts)
        self.step_parts = step
        self.optimizer_factory, self.scheduler_factory = parts.optimizer, parts.scheduler
        self.num_classes = int(parts.num_classes)
        self.has_heldout_val = bool(parts.datamodule.has_heldout_val)
        self.channels_last, self.check_finite = bool(parts.perf.channels_last), bool(parts.perf.check_finite)
        every = parts.perf.check_finite_every
        self.check_finite_every: Optional[int] = int(every) if every is not None else None
        self._unlogged, self._unchecked = TermWindow(), TermWindow()  # training losses not yet logged / checked
        # one metric set per evaluation loader: 0 = validation (held-out or test split), 1 = test split
        self.val_top1 = nn.ModuleList([_accuracy(self.num_classes, 1) for _ in range(2)])
        self.val_top5 = nn.ModuleList([_accuracy(self.num_classes, 5) for _ in range(2)])
        self.test_top1, self.test_top5 = _accuracy(self.num_classes, 1), _accuracy(self.num_classes, 5)
        self.teacher_top1 = _accuracy(self.num_classes, 1)
        teacher = self.teacher
        self.teacher_acc1: Optional[float] = None
        if teacher is not None and teacher.measures_accuracy and teacher.known_acc1 is not None:
            self.teacher_acc1 = float(teacher.known_acc1)
        self.history: list[dict[str, float]] = []
        self.best: dict[str, Any] = {"epoch": None, "val_acc1": float("-inf"), "test_acc1": None}
        # per-step counters on a plain object: an attribute set on the module itself goes through nn.Module's
        # __setattr__, tens of microseconds a step on a slow CPU (kdx.bench_phases)
        object.__setattr__(self, "_counts", _StepCounts())
        self._epoch_train_loss: Optional[float] = None
        if self.channels_last:
            self.student.to(memory_format=torch.channels_last)
            if teacher is not None:
                teacher.to(memory_format=torch.channels_last)
        if parts.perf.compile:  # in place: parameter names, checkpoints and hooks stay as they are
            self.student.compile()
            if teacher is not None:
                teacher.compile()

    # ------------------------------------------------------------------ what the orchestration reads
    def fit_datamodule(self) -> LightningDataModule:
        """The datamodule ``Trainer.fit`` and ``Trainer.test`` run on."""
        return self.parts.datamodule

    def trainer_kwargs(self) -> dict[str, Any]:
        """Trainer arguments this regime needs (the composition root refuses a conflicting ``trainer.*``)."""
        return {}

    def results_extra(self) -> dict[str, Any]:
        """What this regime adds to results.json (e.g. the data-free memory bank and synthesis times)."""
        return {}

    # ------------------------------------------------------------------ devices and teacher
    def _teacher_to_device(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)
            self.teacher.eval()

    def on_fit_start(self) -> None:
        self._teacher_to_device()
        if self.teacher is not None:  # e.g. teacher_cache: compute the missing logits once (kdx.teachers.cache)
            self.teacher.fill(self.trainer, self._prep)

    def on_train_epoch_start(self) -> None:
        if self.teacher is not None:  # e.g. the cache's stored view of each sample depends on the epoch
            self.teacher.set_epoch(self.current_epoch)

    def on_validation_start(self) -> None:
        self._check_window(self._unchecked)  # the epoch's last steps, before validation saves its checkpoint
        self._teacher_to_device()

    def on_test_start(self) -> None:
        self._teacher_to_device()

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # ------------------------------------------------------------------ losses
    def record_step(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        """A training step's bookkeeping in one call, without a host synchronisation, on one stacked copy of its
        losses: the non-finite check's window (:meth:`stop_if_not_finite`), the logged per-step means
        (``train/loss``, ``train/loss/<term>`` at each logging point and the epoch's end), and the epoch's training
        loss and images seen."""
        values, names, step, at_log = stacked(loss, terms), tuple(terms), self.global_step, self._logging_point()
        if self.check_finite:
            self._add_unchecked(values, names, step, at_log)
        self._add_unlogged(values, names, step, at_log)
        self._add_train_loss(values[0], batch_size)

    def stop_if_not_finite(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Sum the step's losses on the device; at a check (each logging point, every ``perf.check_finite_every``
        steps when set, each epoch's end) stop the run if one was not finite since the previous check."""
        if self.check_finite:
            self._add_unchecked(stacked(loss, terms), tuple(terms), self.global_step, self._logging_point())

    def _logging_point(self) -> bool:
        """Whether Lightning writes this training step's logged values (every ``trainer.log_every_n_steps``); no
        trainer (a step called directly): no."""
        trainer = self._trainer
        return trainer is not None and bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)

    def _add_unchecked(self, values: torch.Tensor, names: tuple[str, ...], step: int, at_log: bool) -> None:
        window = self._unchecked
        window.add(values, names, step)
        every = self.check_finite_every
        if at_log or (every is not None and window.steps >= every) or self._trainer is None:
            self._check_window(window)

    def _add_unlogged(self, values: torch.Tensor, names: tuple[str, ...], step: int, at_log: bool) -> None:
        self._unlogged.add(values, names, step)
        if at_log:
            self._log_window(on_step=True)

    def _log_window(self, on_step: bool) -> None:
        if not self._unlogged.steps:
            return
        self._check_window(self._unchecked)  # every step is checked before its value is written
        total, terms = self._unlogged.read()
        self._unlogged.reset()
        kw = dict(on_step=on_step, on_epoch=not on_step, batch_size=1)  # host values: no sync when the bar reads them
        self.log("train/loss", torch.tensor(total), prog_bar=True, **kw)
        for name, value in terms.items():
            self.log(f"train/loss/{name}", torch.tensor(value), **kw)
        for name, value in self._strategy_values().items():  # the latest step's (Strategy.logged_values)
            self.log(f"train/{name}", torch.tensor(value), **kw)

    def _strategy_values(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.strategy.logged_values().items()}

    @property
    def images_seen(self) -> int:
        """Training images the student has taken a step on (this rank; kept in checkpoints)."""
        return self._counts.images_seen

    def _add_train_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        counts = self._counts
        if counts.loss_n == 0:
            counts.loss_sum = loss.clone()
        else:
            counts.loss_sum.add_(loss)
        counts.loss_n += 1
        counts.images_seen += int(batch_size)

    def _check_window(self, window: TermWindow) -> None:
        """Raise :class:`NonFiniteLossError` if a loss summed in ``window`` was not finite (all ranks together)."""
        if not window.steps:
            return
        total, terms = window.read()
        first, last = window.first_step, window.last_step
        window.reset()
        bad = not math.isfinite(total)
        if self._trainer is not None and self._trainer.world_size > 1:  # every rank stops together, never a hang
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        bad_terms = [f"{k}={v:g}" for k, v in terms.items() if not math.isfinite(v)]
        cb = self._trainer.checkpoint_callback if self._trainer is not None else None
        last_good = (cb.last_model_path or cb.best_model_path) if cb is not None else ""
        if first == last:
            steps = f"global step {last}"
        else:  # the window's means: a non-finite step makes its whole window's mean non-finite
            every = f"every {self.check_finite_every} steps, " if self.check_finite_every else ""
            steps = (f"global steps {first}–{last} (checked {every}at each logging point and each epoch's end: "
                     "perf.check_finite_every, trainer.log_every_n_steps; values are means over these steps)")
        raise NonFiniteLossError(
            f"Non-finite loss at epoch {self.current_epoch + 1}, {steps}: loss={total:g}; "
            f"term(s) {', '.join(bad_terms) or 'unknown (rank > 0)'}. "
            + (f"Last good checkpoint: {last_good} (resume with ckpt_path={last_good}, e.g. with a lower "
               f"optim.lr)." if last_good else "No checkpoint was saved yet (the first epoch did not finish).")
        )

    def _close_train_loss(self) -> None:
        """The epoch's mean training loss (over ranks), once per epoch; a no-op when no step ran since."""
        counts = self._counts
        if counts.loss_n == 0:
            return
        mean = counts.loss_sum / counts.loss_n
        self._epoch_train_loss = float(self.trainer.strategy.reduce(mean, reduce_op="mean"))
        counts.loss_sum, counts.loss_n = None, 0

    def on_train_epoch_end(self) -> None:
        self._check_window(self._unchecked)  # before the epoch's checkpoint (without validation; with it: below)
        self._log_window(on_step=False)  # the steps since the last logging point
        self._close_train_loss()  # (already closed when this epoch's validation ran first)

    # ------------------------------------------------------------------ evaluation
    def _test_loader_idx(self) -> int:
        return 1 if self.has_heldout_val else 0

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y, idx = batch
        x = self._prep(x)
        logits = self.student(x)
        self.val_top1[dataloader_idx].update(logits, y)
        self.val_top5[dataloader_idx].update(logits, y)
        if (
            self.teacher is not None
            and self.teacher_acc1 is None
            and self.teacher.measures_accuracy
            and dataloader_idx == self._test_loader_idx()
        ):
            teacher = self.teacher.for_evaluation()
            self.teacher_top1.update(teacher(teacher.adapt_input(x), y, idx).logits, y)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for m in (*self.val_top1, *self.val_top5, self.teacher_top1):
                m.reset()
            return
        epoch = self.current_epoch + 1
        # Lightning validates inside the training epoch, before on_train_epoch_end: close this epoch's
        # training loss here so that the history row holds this epoch's value, not the previous one.
        self._epoch_train_loss = None
        self._close_train_loss()
        val1 = float(self.val_top1[0].compute()) * 100
        val5 = float(self.val_top5[0].compute()) * 100
        test1 = float(self.val_top1[1].compute()) * 100 if self.has_heldout_val else val1
        for m in (*self.val_top1, *self.val_top5):
            m.reset()
        if self.teacher is not None and self.teacher_acc1 is None and self.teacher.measures_accuracy:
            self.teacher_acc1 = float(self.teacher_top1.compute()) * 100
            self.teacher_top1.reset()
        if val1 > self.best["val_acc1"]:
            self.best = {"epoch": epoch, "val_acc1": val1, "test_acc1": test1}
        metrics = {"val/acc5": val5, "val/acc1_best": self.best["val_acc1"]}
        if self.has_heldout_val:
            metrics["test/acc1_epoch"] = test1
        if self.teacher_acc1 is not None:
            metrics["teacher/acc1"] = self.teacher_acc1
        if self.teacher is not None:
            metrics.update(self.teacher.metrics())
        self.log_dict(metrics, prog_bar=False, add_dataloader_idx=False, sync_dist=False)
        self.log("val/acc1", val1, prog_bar=True, add_dataloader_idx=False)
        row = {"epoch": epoch, "val_acc1": val1, "val_acc5": val5, "test_acc1": test1,
               "lr": float(self.trainer.optimizers[0].param_groups[0]["lr"]) if self.trainer.optimizers else None}
        if self._epoch_train_loss is not None:
            row["train_loss"] = self._epoch_train_loss
        row.update(self._strategy_values())  # e.g. CTKD's temperature at the epoch's last step
        self.history.append(row)

    def test_step(self, batch, batch_idx):
        x, y, idx = batch
        logits = self.student(self._prep(x))
        self.test_top1.update(logits, y)
        self.test_top5.update(logits, y)

    def on_test_epoch_end(self) -> None:
        self.log_dict(
            {"test/acc1": float(self.test_top1.compute()) * 100, "test/acc5": float(self.test_top5.compute()) * 100},
            add_dataloader_idx=False,
        )
        self.test_top1.reset()
        self.test_top5.reset()

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters plus any the strategy owns (AFD/RTK attention ...)."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        params += [p for p in self.strategy.parameters() if p.requires_grad]
        return params

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["kdx"] = {"history": self.history, "best": self.best, "teacher_acc1": self.teacher_acc1,
                             "images_seen": self.images_seen}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("kdx", {})
        self.history = list(state.get("history", []))
        self.best = dict(state.get("best", self.best))
        if state.get("teacher_acc1") is not None:
            self.teacher_acc1 = state["teacher_acc1"]
        self._counts.images_seen = int(state.get("images_seen", 0))


__all__ = ["KDModule", "Parts", "Perf"]
