"""Hinton KD (docs/methods.md#kd): ``w_ce·CE + w_kd·T²·KL(p_t^T ‖ p_s^T)``.

Defaults are mdistiller's (w_ce 0.1, w_kd 0.9, T 4); ``distill=kd_crd`` uses the CRD/AFD
weighting (w_ce 1.0, w_kd 0.9) that produced the KD columns of the DKD tables.
"""
from __future__ import annotations

import torch.nn.functional as F

from kdx.distill.base import Strategy
from kdx.distill.losses import kd_loss


class KD(Strategy):
    def __init__(
        self, temperature: float = 4.0, w_ce: float = 0.1, w_kd: float = 0.9, teacher_transform=None,
        logit_transform=None,
    ) -> None:
        super().__init__(teacher_transform, logit_transform)
        self.temperature = temperature
        self.w_ce = w_ce
        self.w_kd = w_kd

    def reads_labels(self) -> bool:
        return float(self.w_ce) != 0.0 or self.teacher_transform is not None

    def loss_terms(self, student, teacher, batch, epoch):
        z_s, z_t = self.transform_logits(student.logits, teacher.logits)
        return {
            "ce": self.w_ce * F.cross_entropy(student.logits, batch.y),
            "kd": self.w_kd * kd_loss(z_s, z_t, self.temperature),
        }
