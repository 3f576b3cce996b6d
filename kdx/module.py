"""One LightningModule for every teacher → student strategy (and plain training).

``training_step``: teacher → teacher transform → student → strategy → log each term → sum.
The teacher is held outside the module's submodules, so it is never in ``parameters()``,
the optimiser, a checkpoint or the DDP wrapper, and ``train()`` on this module cannot
switch it out of eval mode.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn
from torchmetrics.classification import MulticlassAccuracy

from kdx.distill.base import Batch, ModelOutput, Strategy
from kdx.features import FeatureTaps, capture
from kdx.teachers.base import Teacher

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops at once (see the message for how to resume)."""


def _accuracy(num_classes: int, k: int) -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=num_classes, top_k=min(k, num_classes), average="micro")


class DistillModule(pl.LightningModule):
    def __init__(
        self,
        student: nn.Module,
        strategy: Strategy,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Optional[Callable[..., Any]],
        num_classes: int,
        teacher: Optional[Teacher] = None,
        has_heldout_val: bool = False,
        channels_last: bool = False,
        check_finite: bool = True,
        compile: bool = False,
        student_taps: Optional[FeatureTaps] = None,
        teacher_taps: Optional[FeatureTaps] = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.strategy = strategy
        object.__setattr__(self, "teacher", teacher)  # deliberately not a registered submodule
        # feature hooks (kdx.features), only when the strategy asks: they capture in training_step only
        self.student_taps, self.teacher_taps = student_taps, teacher_taps
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.num_classes = num_classes
        self.has_heldout_val = has_heldout_val
        self.channels_last = channels_last
        self.check_finite = check_finite
        # one metric set per evaluation loader: 0 = validation (held-out or test split), 1 = test split
        self.val_top1 = nn.ModuleList([_accuracy(num_classes, 1) for _ in range(2)])
        self.val_top5 = nn.ModuleList([_accuracy(num_classes, 5) for _ in range(2)])
        self.test_top1, self.test_top5 = _accuracy(num_classes, 1), _accuracy(num_classes, 5)
        self.teacher_top1 = _accuracy(num_classes, 1)
        self.teacher_acc1: Optional[float] = None
        if teacher is not None and teacher.measures_accuracy and teacher.known_acc1 is not None:
            self.teacher_acc1 = float(teacher.known_acc1)
        self.history: list[dict[str, float]] = []
        self.best: dict[str, Any] = {"epoch": None, "val_acc1": float("-inf"), "test_acc1": None}
        self._train_loss_sum = torch.zeros(())
        self._train_loss_n = 0
        if channels_last:
            self.student.to(memory_format=torch.channels_last)
            if teacher is not None:
                teacher.to(memory_format=torch.channels_last)
        if compile:  # in place: parameter names, checkpoints and hooks stay as they are
            self.student.compile()
            if teacher is not None:
                teacher.compile()

    # ------------------------------------------------------------------ devices and teacher
    def _teacher_to_device(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)
            self.teacher.eval()

    def on_fit_start(self) -> None:
        self._teacher_to_device()
        if self.teacher is not None:  # e.g. teacher.cache: compute the missing logits once (kdx.teachers.cache)
            self.teacher.fill(self.trainer, self._prep)

    def on_train_epoch_start(self) -> None:
        if self.teacher is not None:  # e.g. the cache's stored view of each sample depends on the epoch
            self.teacher.set_epoch(self.current_epoch)

    def on_validation_start(self) -> None:
        self._teacher_to_device()

    def on_test_start(self) -> None:
        self._teacher_to_device()

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        x = self._prep(x)
        batch = Batch(x, y, idx)
        epoch = self.current_epoch + 1  # strategies see 1-based epochs
        teacher_out = None
        if self.teacher is not None:
            with capture(self.teacher_taps) as teacher_feats:
                raw = self.teacher(x, y, idx)
            teacher_out = ModelOutput(self.strategy.transform_teacher(raw.logits, y), {**raw.features, **teacher_feats})
        with capture(self.student_taps) as student_feats:
            logits = self.student(x)
        student_out = ModelOutput(logits, student_feats)
        terms = self.strategy(student_out, teacher_out, batch, epoch)
        loss = torch.stack([t.float() for t in terms.values()]).sum()
        if self.check_finite:
            self._stop_if_not_finite(loss, terms)
        bs = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/loss/{name}", value, batch_size=bs)
        self._train_loss_sum = self._train_loss_sum.to(loss.device) + loss.detach()
        self._train_loss_n += 1
        return loss

    def _stop_if_not_finite(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        bad = not bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:  # every rank stops together, never a hang in all-reduce
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        bad_terms = [f"{k}={float(v):g}" for k, v in terms.items() if not bool(torch.isfinite(v))]
        cb = self.trainer.checkpoint_callback
        last_good = (cb.last_model_path or cb.best_model_path) if cb is not None else ""
        raise NonFiniteLossError(
            f"Non-finite loss at epoch {self.current_epoch + 1}, global step {self.global_step}: "
            f"loss={float(loss):g}; term(s) {', '.join(bad_terms) or 'unknown (rank > 0)'}. "
            + (f"Last good checkpoint: {last_good} (resume with ckpt_path={last_good}, e.g. with a lower "
               f"optim.lr)." if last_good else "No checkpoint was saved yet (the first epoch did not finish).")
        )

    def _close_train_loss(self) -> None:
        """The epoch's mean training loss (over ranks), once per epoch; a no-op when no step ran since."""
        if self._train_loss_n == 0:
            return
        mean = self._train_loss_sum / self._train_loss_n
        self._epoch_train_loss = float(self.trainer.strategy.reduce(mean, reduce_op="mean"))
        self._train_loss_sum = torch.zeros((), device=self.device)
        self._train_loss_n = 0

    def on_train_epoch_end(self) -> None:
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
            self.teacher_top1.update(self.teacher.for_evaluation()(x, y, idx).logits, y)

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
        if getattr(self, "_epoch_train_loss", None) is not None:
            row["train_loss"] = self._epoch_train_loss
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
        checkpoint["kdx"] = {"history": self.history, "best": self.best, "teacher_acc1": self.teacher_acc1}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("kdx", {})
        self.history = list(state.get("history", []))
        self.best = dict(state.get("best", self.best))
        if state.get("teacher_acc1") is not None:
            self.teacher_acc1 = state["teacher_acc1"]
