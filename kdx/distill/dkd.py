"""Decoupled KD (docs/methods.md#dkd): ``w_ce·CE + min(e/W,1)·(α·TCKD + β·NCKD)``.

TCKD and NCKD are logged as separate terms (already weighted by α, β and the warm-up).
"""
from __future__ import annotations

import torch.nn.functional as F

from kdx.distill.base import Strategy, warmup_factor
from kdx.distill.losses import dkd_terms


class DKD(Strategy):
    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        w_ce: float = 1.0,
        warmup: int = 20,
        teacher_transform=None,
        logit_transform=None,
    ) -> None:
        super().__init__(teacher_transform, logit_transform)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.w_ce, self.warmup = w_ce, warmup

    def loss_terms(self, student, teacher, batch, epoch):
        z_s, z_t = self.transform_logits(student.logits, teacher.logits)  # LS: before T and the target mask
        tckd, nckd = dkd_terms(z_s, z_t, batch.y, self.temperature)
        w = warmup_factor(epoch, self.warmup)
        return {
            "ce": self.w_ce * F.cross_entropy(student.logits, batch.y),
            "tckd": w * self.alpha * tckd,
            "nckd": w * self.beta * nckd,
        }
