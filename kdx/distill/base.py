"""The seams every method plugs into.

- :class:`ModelOutput`: what a network (student or teacher) gives a strategy: logits and,
  when a strategy asks for taps, a dict of named intermediate features.
- :class:`Strategy`: ``(student_out, teacher_out, batch, epoch) -> {term: weighted loss}``. It
  may own trainable modules (their parameters join the student's optimiser), ask for the
  student's and the teacher's tapped features (``needs_features``), build modules whose shapes
  depend on those features (``build_feature_modules``), and hold a transform of teacher logits
  (identity by default).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor


class Batch(NamedTuple):
    """A training batch: images, int64 labels and int64 sample indices of the split."""

    x: Tensor
    y: Tensor
    idx: Tensor


@dataclass
class ModelOutput:
    """Logits and, for strategies with ``needs_features``, the tapped features in tap order."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)

    @property
    def feature_list(self) -> list[Tensor]:
        return list(self.features.values())


TeacherTransform = Callable[[Tensor, Tensor], Tensor]


class Strategy(nn.Module):
    """Base class of distillation strategies.

    Subclasses implement :meth:`loss_terms`. What the orchestration reads, declared here with its default:

    - ``needs_teacher``: whether the run needs a teacher (False for plain CE: the run then trains a
      network from labels, and its model may become a stored teacher).
    - ``needs_features``: whether ``student.features`` / ``teacher.features`` must hold the
      models' tapped features (``model.taps`` / ``teacher.model.taps``, else each model's
      defaults; see :mod:`kdx.features`). False for logit methods: no hooks are registered then.
    - ``regime``: the training regime that runs the strategy (``module=distill``; data-free strategies
      declare ``datafree``); the composition root refuses a mismatch.

    A strategy with ``needs_features`` gets :meth:`build_feature_modules` called once at build
    time, with the feature shapes from a dry forward, before the optimiser exists (so the
    modules it builds are trained with the student; the runner builds them after seeding, so
    every DDP rank builds the same ones).
    """

    needs_teacher: ClassVar[bool] = True
    needs_features: ClassVar[bool] = False
    regime: ClassVar[str] = "distill"

    def __init__(self, teacher_transform: Optional[TeacherTransform] = None) -> None:
        super().__init__()
        self.teacher_transform = teacher_transform

    def transform_teacher(self, logits_teacher: Tensor, target: Tensor) -> Tensor:
        """Teacher logits as the loss should see them (TopKD's scaling plugs in here)."""
        if self.teacher_transform is None:
            return logits_teacher
        return self.teacher_transform(logits_teacher, target)

    def build_feature_modules(
        self, teacher_shapes: Sequence[torch.Size], student_shapes: Sequence[torch.Size]
    ) -> None:
        """Build the shape-dependent modules (shapes are ``B×C×H×W`` of each tap, in tap order)."""

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
