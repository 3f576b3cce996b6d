"""Learning-rate schedules stepped once per epoch, with 1-based epoch semantics (docs/methods.md#protocol).

A schedule is a ``LambdaLR`` whose factor for the epoch about to be trained, ``e`` (1-based),
is computed in closed form, so resuming from a checkpoint (which stores ``last_epoch``)
continues exactly.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _milestone_epochs(milestones: Sequence[float], total_epochs: int) -> list[int]:
    """Integers are epochs; floats in (0, 1) are fractions of ``total_epochs``."""
    out = []
    for m in milestones:
        if isinstance(m, float) and 0.0 < m < 1.0:
            out.append(int(round(m * total_epochs)))
        else:
            out.append(int(m))
    return sorted(out)


def _warm(e: int, warmup_epochs: int) -> float:
    return min(e / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0


class MultiStepSchedule:
    """``lr = lr0 · γ^{#{m : e > m}}`` (e = 151 is the first decayed epoch for m = 150)."""

    def __init__(self, milestones, gamma, warmup_epochs, total_epochs):
        self.milestones = _milestone_epochs(milestones, total_epochs)
        self.gamma, self.warmup_epochs = gamma, warmup_epochs

    def __call__(self, k: int) -> float:
        e = k + 1
        return _warm(e, self.warmup_epochs) * self.gamma ** sum(e > m for m in self.milestones)


class CosineSchedule:
    """Cosine from lr0 (epoch W+1) to eta_min (after the last epoch), linear warm-up over W."""

    def __init__(self, base_lr, eta_min, warmup_epochs, total_epochs):
        self.base_lr, self.eta_min = base_lr, eta_min
        self.warmup_epochs, self.total_epochs = warmup_epochs, total_epochs

    def __call__(self, k: int) -> float:
        e, W = k + 1, self.warmup_epochs
        if e <= W:
            return _warm(e, W)
        span = max(self.total_epochs - W, 1)
        progress = min((e - W - 1) / span, 1.0)
        lr = self.eta_min + (self.base_lr - self.eta_min) * 0.5 * (1 + math.cos(math.pi * progress))
        return lr / self.base_lr


def multistep(
    optimizer: Optimizer,
    total_epochs: int,
    milestones: Sequence[float] = (150, 180, 210),
    gamma: float = 0.1,
    warmup_epochs: int = 0,
) -> LambdaLR:
    return LambdaLR(optimizer, MultiStepSchedule(list(milestones), gamma, warmup_epochs, total_epochs))


def cosine(optimizer: Optimizer, total_epochs: int, eta_min: float = 0.0, warmup_epochs: int = 0) -> LambdaLR:
    lambdas = [CosineSchedule(g["lr"], eta_min, warmup_epochs, total_epochs) for g in optimizer.param_groups]
    return LambdaLR(optimizer, lambdas)


def constant(optimizer: Optimizer, total_epochs: int, warmup_epochs: int = 0) -> LambdaLR:
    return LambdaLR(optimizer, lambda k: _warm(k + 1, warmup_epochs))
