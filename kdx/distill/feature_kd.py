"""The shape shared by mdistiller's feature baselines (AT, SP, PKT, RKD, NST, KD-SVD, FitNet, VID):
``w_ce·CE(student logits, y) + w_<term>·L_<term>(student taps, teacher taps)``, no KD term, no warm-up.

A subclass declares its tap sets (``student_taps``/``teacher_taps``), its term name and its feature loss
:meth:`FeatureKD.feature_loss`; the weights are its constructor's ``w_ce`` and ``w_<term>`` (the config keys).
Lists of stage features are paired the way mdistiller pairs them, ``zip(student, teacher)``: when the two
networks have different numbers of stages the extra ones of the longer list are silently dropped.
"""
from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kdx.distill.base import Strategy
from kdx.errors import ConfigError


class FeatureKD(Strategy):
    """``w_ce·CE + weight·feature_loss(student.taps, teacher.taps)``, the terms named ``ce`` and :attr:`term`."""

    term: ClassVar[str] = ""

    def __init__(self, w_ce: float, weight: float) -> None:
        super().__init__()
        self.w_ce = float(w_ce)
        self.weight = float(weight)

    def feature_loss(self, student: dict[str, list[Tensor]], teacher: dict[str, list[Tensor]]) -> Tensor:
        """The unweighted distillation loss of the tapped features ``{set: [tensor, ...]}``."""
        raise NotImplementedError

    def loss_terms(self, student, teacher, batch, epoch):
        return {
            "ce": self.w_ce * F.cross_entropy(student.logits, batch.y),
            self.term: self.weight * self.feature_loss(student.taps, teacher.taps),
        }


def chw(shape) -> tuple[int, ...]:
    """A tapped shape without its batch dimension, as plain ints."""
    return tuple(int(s) for s in shape[1:])


def positive_int(value, key: str) -> int:
    """``value`` as an int ≥ 1, else :class:`ConfigError` naming ``distill.<key>``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"distill.{key}={value!r}: must be a positive integer.")
    return value
