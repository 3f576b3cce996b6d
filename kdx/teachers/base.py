"""Teachers: sources of soft targets, ``(x, y, idx) -> ModelOutput``.

A teacher is never trained by the student's optimiser: it is held outside the
LightningModule's submodules (so it is not in ``parameters()``, checkpoints, or DDP).
A teacher class may define ``prepare(cfg, ctx) -> dict`` (a classmethod): the runner calls
it before instantiating the teacher and passes what it returns as extra arguments; that is
where a missing artifact (a teacher checkpoint, a soft-label table) is found or built.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch.nn as nn
from torch import Tensor

from kdx.distill.base import ModelOutput


class Teacher(nn.Module):
    #: whether the teacher's own test accuracy means anything (False for label tables)
    measures_accuracy: bool = True
    #: test accuracy recorded with the checkpoint (None: the module measures it once)
    known_acc1: Optional[float] = None
    #: a short description for results files (architecture, checkpoint, sha256 ...)
    info: dict

    def forward(self, x: Tensor, y: Tensor, idx: Tensor) -> ModelOutput:  # pragma: no cover
        raise NotImplementedError

    # Hooks the module calls around training (no-ops here; the teacher-logit cache uses them)
    def fill(self, trainer: Any, prep: Callable[[Tensor], Tensor]) -> None:
        """At fit start, before the first step: build what training steps will read."""

    def set_epoch(self, epoch: int) -> None:
        """At the start of each training epoch (0-based)."""

    def metrics(self) -> dict[str, float]:
        """Extra values logged with each validation."""
        return {}

    def for_evaluation(self) -> "Teacher":
        """The teacher that scores held-out images (its own accuracy); a cache of training logits defers."""
        return self
