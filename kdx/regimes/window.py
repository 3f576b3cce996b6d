"""Loss terms summed on the device between two host reads.

A training step adds its loss and weighted terms to a :class:`TermWindow` (one ``stack`` and one in-place add, no
host synchronisation); the regime reads the window back (one device→host copy) only where it logs or checks for a
non-finite loss, every N steps and at the end of an epoch (:mod:`kdx.regimes.base`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def stacked(loss: Tensor, terms: dict[str, Tensor]) -> Tensor:
    """``[loss, *terms]`` of one step, detached, as one float32 vector (no host synchronisation)."""
    return torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())])


class TermWindow:
    """Per-step sums of the total loss and of each term since the last :meth:`reset`, kept where the losses are.

    A strategy whose terms change from one step to the next (a term that appears after a warm-up) is summed per set
    of term names, so that each term's mean is over the steps that had it."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0  # steps added since the last reset
        self.first_step: Optional[int] = None  # the global step of the first of them
        self.last_step: Optional[int] = None
        self._groups: dict[tuple[str, ...], list] = {}  # term names → [sums (total first), steps]

    def add(self, values: Tensor, names: tuple[str, ...], step: int) -> None:
        """Add one step's :func:`stacked` losses, ``names`` being its terms' (an in-place add on the device)."""
        group = self._groups.get(names)
        if group is None:
            self._groups[names] = [values.clone(), 1]
        else:
            group[0].add_(values)
            group[1] += 1
        if self.first_step is None:
            self.first_step = step
        self.last_step = step
        self.steps += 1

    def read(self) -> tuple[float, dict[str, float]]:
        """The per-step means ``(total, {term: mean})`` of the window, as host floats (one device→host copy)."""
        if not self._groups:
            return float("nan"), {}
        host = torch.cat([sums for sums, _ in self._groups.values()]).tolist()
        total, sums, counts, pos = 0.0, {}, {}, 0
        for names, (_, n) in self._groups.items():
            total += host[pos]
            for i, name in enumerate(names, start=1):
                sums[name] = sums.get(name, 0.0) + host[pos + i]
                counts[name] = counts.get(name, 0) + n
            pos += len(names) + 1
        return total / self.steps, {k: sums[k] / counts[k] for k in sums}


__all__ = ["TermWindow", "stacked"]
