"""The seams every method plugs into (see DESIGN.md, "The seams").

- :class:`ModelOutput`: what a network (student or teacher) gives a strategy: logits and,
  when a strategy asks for taps, a dict of named intermediate features.
- :class:`Strategy`: ``(student_out, teacher_out, batch, epoch) -> {term: weighted loss}``. It
  may own trainable modules (their parameters join the student's optimiser), declare the
  feature taps it needs, and hold a transform of teacher logits (identity by default).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch.nn as nn
from torch import Tensor


class Batch(NamedTuple):
    """A training batch: images, int64 labels and int64 sample indices of the split."""

    x: Tensor
    y: Tensor
    idx: Tensor


@dataclass
class ModelOutput:
    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


TeacherTransform = Callable[[Tensor, Tensor], Tensor]


class Strategy(nn.Module):
    """Base class of distillation strategies.

    Subclasses implement :meth:`loss_terms`. Class attributes:

    - ``needs_teacher``: whether the module must build a teacher (False for plain CE).
    - ``student_taps`` / ``teacher_taps``: module names whose outputs the strategy needs
      (empty for logit methods: no hooks are registered then).
    """

    needs_teacher: bool = True
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()

    def __init__(self, teacher_transform: Optional[TeacherTransform] = None) -> None:
        super().__init__()
        self.teacher_transform = teacher_transform

    def transform_teacher(self, logits_teacher: Tensor, target: Tensor) -> Tensor:
        """Teacher logits as the loss should see them (TopKD's scaling plugs in here)."""
        if self.teacher_transform is None:
            return logits_teacher
        return self.teacher_transform(logits_teacher, target)

    def loss_terms(
        self, student: ModelOutput, teacher: Optional[ModelOutput], batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """Weighted loss terms; ``epoch`` is 1-based (the first epoch is 1)."""
        raise NotImplementedError

    def forward(self, student, teacher, batch, epoch):  # noqa: D102 - nn.Module entry point
        return self.loss_terms(student, teacher, batch, epoch)


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """``min(e / W, 1)`` with the 1-based epoch ``e`` (epoch 1 gives 1/W); W ≤ 0 means none."""
    if warmup_epochs <= 0:
        return 1.0
    return min(epoch / warmup_epochs, 1.0)
