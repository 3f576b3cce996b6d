"""The distillation step: one function that every regime and ``kdx.bench``'s bare loop call.

teacher (on its own view of the batch, ``Teacher.adapt_input``; its taps captured) → the strategy's teacher
transform → student (its taps captured; the extra outputs the strategy declares, ``Strategy.student_outputs``) → the
strategy's weighted loss terms → their sum. No logging, no optimiser, no host synchronisation: callers do those.
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
    strategy, teacher = parts.strategy, parts.teacher
    teacher_out = None
    if teacher is not None:
        bn = teacher.batch_norm_batch_stats() if strategy.teacher_bn_batch_stats else nullcontext()
        with bn, capture(parts.teacher_taps) as teacher_feats:
            raw = teacher(teacher.adapt_input(x), y, idx)
        views = {v: strategy.transform_teacher(teacher(teacher.adapt_input(xv), y, idx).logits, y)
                 for v, xv in batch.views.items()}
        teacher_out = ModelOutput(strategy.transform_teacher(raw.logits, y), teacher_feats, views, parts.teacher_head)
    with capture(parts.student_taps) as student_feats:
        logits, extra = _student(parts, x)
    views = {v: _student(parts, xv)[0] for v, xv in batch.views.items()}
    terms = strategy(ModelOutput(logits, student_feats, views, parts.student_head, extra), teacher_out, batch, epoch)
    loss = torch.stack([t.float() for t in terms.values()]).sum()
    return loss, terms


def _student(parts: StepParts, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The student's logits and the extra outputs the strategy declared (``(logits, *extra)`` in training)."""
    out = parts.student(x)
    names = parts.strategy.student_outputs
    if not names:
        return out, {}
    if isinstance(out, Tensor) or len(out) != 1 + len(names):
        raise RuntimeError(f"{type(parts.strategy).__name__} expects the student to return (logits, "
                           f"{', '.join(names)}) in training; it returned {type(out).__name__}.")
    return out[0], dict(zip(names, out[1:]))


__all__ = ["StepParts", "distill_step"]
