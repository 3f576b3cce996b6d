"""``module=distill``: batches of the training split; each step is :func:`kdx.regimes.step.distill_step`."""
from __future__ import annotations

from kdx.distill.base import Batch
from kdx.regimes.base import KDModule
from kdx.regimes.step import distill_step


class DistillModule(KDModule):
    regime = "distill"

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        batch = Batch(self._prep(x), y, idx)
        loss, terms = distill_step(self.step_parts, batch, self.current_epoch + 1)  # strategies see 1-based epochs
        self.stop_if_not_finite(loss, terms)
        self.log_terms(loss, terms, batch_size=x.shape[0])
        self.track_train_loss(loss, x.shape[0])
        return loss


__all__ = ["DistillModule"]
