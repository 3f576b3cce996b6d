"""``module=distill``: batches of the training split; each step is :func:`kdx.regimes.step.distill_step`.

With an optimiser that steps on the task and the distillation gradients apart (``optim=dot``,
:class:`kdx.optimizers.SplitLossOptimizer`), the step backpropagates the distillation terms (every term not in
``Strategy.task_terms``), calls ``step_kd``, then backpropagates the task terms and steps (the official DOT order);
the schedule is stepped once per epoch.
"""
from __future__ import annotations

import torch

from kdx.distill.base import Batch
from kdx.regimes.base import KDModule, Parts
from kdx.regimes.step import distill_step


class DistillModule(KDModule):
    regime = "distill"

    def __init__(self, parts: Parts) -> None:
        super().__init__(parts)
        self.automatic_optimization = not parts.split_losses

    def training_step(self, batch, batch_idx):
        x, y, idx, *extra = batch  # extra: {view: images} when the strategy asks for views (Strategy.views)
        views = {k: self._prep(v) for k, v in extra[0].items()} if extra else {}
        batch = Batch(self._prep(x), y, idx, views)
        loss, terms = distill_step(self.step_parts, batch, self.current_epoch + 1)  # strategies see 1-based epochs
        self.record_step(loss, terms, x.shape[0])  # logged and checked for non-finite values every N steps
        if not self.automatic_optimization:
            self._split_step(terms)
        return loss

    def _split_step(self, terms: dict[str, torch.Tensor]) -> None:
        """Distillation gradients → ``step_kd``; task gradients → ``step`` (a strategy with only task terms, e.g. a
        teacher trained from labels, gets a plain step: DOT is then SGD with momentum m)."""
        task_names = self.strategy.task_terms
        task = [v.float() for k, v in terms.items() if k in task_names]
        distil = [v.float() for k, v in terms.items() if k not in task_names]
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        if distil:
            self.manual_backward(torch.stack(distil).sum(), retain_graph=bool(task))
            opt.optimizer.step_kd()
            opt.zero_grad(set_to_none=True)
        if task:
            self.manual_backward(torch.stack(task).sum())
        opt.step()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if not self.automatic_optimization and self.lr_schedulers() is not None:
            self.lr_schedulers().step()


__all__ = ["DistillModule"]
