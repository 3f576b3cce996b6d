"""The distillation step: one function that every regime and ``kdx.bench``'s bare loop call.

teacher (its taps captured) → the strategy's teacher transform → student (its taps captured) → the strategy's
weighted loss terms → their sum. No logging, no optimiser, no host synchronisation: callers do those.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from kdx.distill.base import Batch, ModelOutput, Strategy
from kdx.features import TapSets, capture
from kdx.teachers.base import Teacher


@dataclass
class StepParts:
    """The objects a step runs: student, teacher (or None), strategy, the tap sets the strategy reads, and the
    networks' classifiers when it asks for them (``Strategy.needs_head``)."""

    student: nn.Module
    strategy: Strategy
    teacher: Optional[Teacher] = None
    student_taps: Optional[TapSets] = None
    teacher_taps: Optional[TapSets] = None
    student_head: Optional[nn.Module] = None
    teacher_head: Optional[nn.Module] = None


def distill_step(parts: StepParts, batch: Batch, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
    """``(loss, terms)`` of one batch; ``epoch`` is 1-based (the strategies' convention).

    Each network runs on ``batch.x`` (its taps captured there) and then on each extra view of the batch, in the
    order of ``batch.views`` (a forward each, as the official multi-view methods do).
    """
    x, y, idx = batch.x, batch.y, batch.idx
    strategy = parts.strategy
    teacher_out = None
    if parts.teacher is not None:
        bn = parts.teacher.batch_norm_batch_stats() if strategy.teacher_bn_batch_stats else nullcontext()
        with bn, capture(parts.teacher_taps) as teacher_feats:
            raw = parts.teacher(x, y, idx)
        views = {v: strategy.transform_teacher(parts.teacher(xv, y, idx).logits, y) for v, xv in batch.views.items()}
        teacher_out = ModelOutput(strategy.transform_teacher(raw.logits, y), teacher_feats, views, parts.teacher_head)
    with capture(parts.student_taps) as student_feats:
        logits = parts.student(x)
    views = {v: parts.student(xv) for v, xv in batch.views.items()}
    terms = strategy(ModelOutput(logits, student_feats, views, parts.student_head), teacher_out, batch, epoch)
    loss = torch.stack([t.float() for t in terms.values()]).sum()
    return loss, terms


__all__ = ["StepParts", "distill_step"]
