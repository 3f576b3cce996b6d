"""Plain supervised training (``distill=none``): used for teachers and student baselines."""
from __future__ import annotations

import torch.nn.functional as F

from kdx.distill.base import Strategy


class CrossEntropy(Strategy):
    needs_teacher = False

    def __init__(self, w_ce: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.w_ce = w_ce
        self.label_smoothing = label_smoothing

    def loss_terms(self, student, teacher, batch, epoch):
        ce = F.cross_entropy(student.logits, batch.y, label_smoothing=self.label_smoothing)
        return {"ce": self.w_ce * ce}
