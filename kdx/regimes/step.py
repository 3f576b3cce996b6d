"""The distillation step: one function that every regime and ``kdx.bench``'s bare loop call.

teacher (its taps captured) → the strategy's teacher transform → student (its taps captured) → the strategy's
weighted loss terms → their sum. No logging, no optimiser, no host synchronisation: callers do those.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from kdx.distill.base import Batch, ModelOutput, Strategy
from kdx.features import FeatureTaps, capture
from kdx.teachers.base import Teacher


@dataclass
class StepParts:
    """The objects a step runs: student, teacher (or None), strategy, and the feature taps when asked for."""

    student: nn.Module
    strategy: Strategy
    teacher: Optional[Teacher] = None
    student_taps: Optional[FeatureTaps] = None
    teacher_taps: Optional[FeatureTaps] = None


def distill_step(parts: StepParts, batch: Batch, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
    """``(loss, terms)`` of one batch; ``epoch`` is 1-based (the strategies' convention)."""
    x, y, idx = batch
    teacher_out = None
    if parts.teacher is not None:
        with capture(parts.teacher_taps) as teacher_feats:
            raw = parts.teacher(x, y, idx)
        teacher_out = ModelOutput(parts.strategy.transform_teacher(raw.logits, y), {**raw.features, **teacher_feats})
    with capture(parts.student_taps) as student_feats:
        logits = parts.student(x)
    terms = parts.strategy(ModelOutput(logits, student_feats), teacher_out, batch, epoch)
    loss = torch.stack([t.float() for t in terms.values()]).sum()
    return loss, terms


__all__ = ["StepParts", "distill_step"]
