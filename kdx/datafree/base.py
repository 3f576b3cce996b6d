"""The data-free strategies' seam: a synthesiser plus the student's loss, run by the data-free regime.

A :class:`DataFreeStrategy` is a :class:`~kdx.distill.base.Strategy` whose ``regime`` is ``"datafree"``: the
student's loss terms are its nested ``loss`` strategy's (any kdx logit strategy; KD at T = 20 for NAYER), and it
adds the synthesis: per epoch, :meth:`synthesis_units` work units, each a :meth:`synthesis_step` (one optimiser step
on a generator or on images) that may hand back a batch of images for the regime's memory bank. The epoch's
synthesis units and student steps run in :meth:`rounds` equal rounds (each its synthesis units, then its student
steps). Student batches come from the bank, or (``uses_bank = False``: generator-only methods such as DAFL) are
drawn fresh from the synthesiser by :meth:`sample`. The regime (:mod:`kdx.regimes.datafree`) owns the bank,
the student steps, evaluation and checkpoints; the synthesiser's own state (generators, statistics, optimisers
that live across steps) goes through :meth:`synthesis_state` / :meth:`load_synthesis_state`.

A synthesiser's trainable parts are never registered submodules: they are not in the student's optimiser nor
in the DDP wrapper (under DDP each rank synthesises with its own generator and random stream, into its own bank).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn as nn
from torch import Tensor

from kdx.distill.base import Strategy


@dataclass
class SynthesisEnv:
    """What a synthesiser works with (the regime builds it once, at fit start)."""

    teacher: nn.Module  # the teacher network (frozen, eval mode)
    student: nn.Module
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    dataset: str
    rng: torch.Generator  # this rank's random stream (saved in checkpoints)
    device: torch.device
    prep: Callable[[Tensor], Tensor] = field(default=lambda x: x)  # the training step's input preparation


@dataclass
class SynthesisStep:
    """One synthesis work unit: its loss and weighted terms (logged), and images for the bank when it has some."""

    loss: Tensor
    terms: dict[str, Tensor]
    images: Optional[tuple[Tensor, Tensor]] = None  # (float images in [0, 1], int64 labels)


class DataFreeStrategy(Strategy):
    """Base of data-free strategies (``distill=nayer`` ...): see the module docstring."""

    regime = "datafree"
    needs_teacher = True
    #: student batches come from the regime's memory bank; False: each student step draws one from :meth:`sample`
    uses_bank: ClassVar[bool] = True

    def __init__(self, loss: Strategy, teacher_transform=None) -> None:
        super().__init__(teacher_transform)
        self.loss = loss

    # ---- the student's loss is the nested strategy's
    def transform_teacher(self, logits_teacher: Tensor, target: Tensor) -> Tensor:
        return self.loss.transform_teacher(super().transform_teacher(logits_teacher, target), target)

    def loss_terms(self, student, teacher, batch, epoch):
        return self.loss.loss_terms(student, teacher, batch, epoch)

    # ---- the synthesis, called by the regime (ep: the 0-based epoch; warmup: module.warmup)
    def prepare(self, class_names: list[str], dataset: str, num_classes: int) -> None:
        """At build time, before anything is trained: read what the data decide (a missing input stops here)."""

    def setup(self, env: SynthesisEnv) -> None:
        """Build the synthesiser for this data and teacher (at fit start, before any epoch)."""

    def on_epoch_start(self, env: SynthesisEnv, ep: int, warmup: int) -> None:
        """At the start of every training epoch."""

    def synthesis_units(self, ep: int, warmup: int) -> int:  # pragma: no cover - every synthesiser has one
        raise NotImplementedError

    def synthesis_step(self, env: SynthesisEnv, ep: int, unit: int, warmup: int) -> SynthesisStep:  # pragma: no cover
        raise NotImplementedError

    def rounds(self, ep: int, warmup: int) -> int:
        """Equal rounds the epoch's work runs in: each its share of the synthesis units, then its share of the
        student steps (the official ``ep_steps // kd_steps`` loop; 1 for methods that synthesise once per epoch)."""
        return 1

    def sample(self, env: SynthesisEnv, n: int) -> tuple[Tensor, Tensor]:  # pragma: no cover - uses_bank=False only
        """``n`` fresh images in [0, 1] and their labels for one student step (only when ``uses_bank`` is False)."""
        raise NotImplementedError

    def synthesis_state(self) -> dict[str, Any]:
        """The synthesiser's state for checkpoints (exact resume)."""
        return {}

    def load_synthesis_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`synthesis_state` (after :meth:`setup`)."""

    def describe(self) -> dict[str, Any]:
        """What results.json records about the synthesiser (e.g. the generator's size)."""
        return {}

    def images_per_epoch(self, ep: int, warmup: int) -> int:
        """Images this synthesiser adds to the bank in epoch ``ep`` (the budget of a run, before it runs; 0 for a
        synthesiser without a bank)."""
        return 0


class RoundSynthesis(DataFreeStrategy):
    """A synthesiser that runs ``n_rounds`` equal rounds per epoch, each of ``g_steps`` optimisation steps on one
    batch of ``synthesis_batch_size`` images that goes to the bank (DeepInversion, CMI, Fast's driver loop).
    Subclasses set the three attributes."""

    n_rounds: int
    g_steps: int
    synthesis_batch_size: int

    def synthesis_units(self, ep: int, warmup: int) -> int:
        return self.n_rounds * self.g_steps

    def rounds(self, ep: int, warmup: int) -> int:
        return self.n_rounds

    def images_per_epoch(self, ep: int, warmup: int) -> int:
        return self.n_rounds * self.synthesis_batch_size


__all__ = ["DataFreeStrategy", "RoundSynthesis", "SynthesisEnv", "SynthesisStep"]
