"""ReffAKD's own loss (docs/methods.md#reffakd, step C): ``α·T²·softCE(z_s/T, q) + (1−α)·CE(z_s, y)``.

The soft targets are the teacher's ``softmax(z_t / T)``. With the ReffAKD table teacher
(``teacher=reffakd``, whose logits are ``T·log Q[y]`` at the same T) that is exactly the class soft
label ``Q[y]``, not re-tempered, as in the official code. Logged terms: ``soft`` and ``ce``.
``soft_loss``: ``ce`` (the CIFAR-100 notebook) or ``kl_mean`` (``nn.KLDivLoss()`` with its default mean over B·C
entries: the Tiny-ImageNet and Fashion-MNIST notebooks), see :func:`kdx.distill.losses.reffakd_terms`.
"""
from __future__ import annotations

import torch

from kdx.distill.base import Strategy
from kdx.distill.losses import REFFAKD_SOFT_LOSSES, reffakd_terms


class ReffAKD(Strategy):
    def __init__(self, alpha: float = 0.5, temperature: float = 5.0, float64: bool = True, teacher_transform=None,
                 soft_loss: str = "ce") -> None:
        super().__init__(teacher_transform)
        if soft_loss not in REFFAKD_SOFT_LOSSES:
            raise ValueError(f"distill.soft_loss={soft_loss!r}: choose one of {', '.join(REFFAKD_SOFT_LOSSES)}.")
        self.soft_loss = soft_loss
        if temperature <= 0:
            raise ValueError(f"distill.temperature={temperature!r} must be > 0.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill.alpha={alpha!r} must lie in [0, 1].")
        self.alpha, self.temperature, self.float64 = float(alpha), float(temperature), bool(float64)

    def loss_terms(self, student, teacher, batch, epoch):
        dtype = torch.float64 if self.float64 else torch.float32
        q = torch.softmax(teacher.logits.to(dtype) / self.temperature, dim=1)
        soft, hard = reffakd_terms(student.logits, batch.y, q, self.alpha, self.temperature, self.float64,
                                   self.soft_loss)
        return {"soft": soft, "ce": hard}
