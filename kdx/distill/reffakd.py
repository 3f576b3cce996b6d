"""ReffAKD's own loss (docs/methods.md#reffakd): ``α·T²·soft(z_s/T, q) + (1−α)·CE(z_s, y)``.

The soft targets are the teacher's ``softmax(z_t / T)``. With the ReffAKD table teacher
(``teacher=reffakd``, whose logits are ``T·log Q[y]`` at the same T) that is exactly the class soft
label ``Q[y]``, not re-tempered, as in the official code. ``soft_loss`` is the soft term the authors
used per dataset (:func:`kdx.distill.losses.reffakd_terms`): ``batchmean_ce`` (CIFAR-100 notebook, the
default) or ``kldiv_mean`` (``nn.KLDivLoss()``'s mean over B·C: Fashion-MNIST and Tiny-ImageNet notebooks).
Logged terms: ``soft`` and ``ce``.
"""
from __future__ import annotations

import torch

from kdx.distill.base import Strategy
from kdx.distill.losses import REFFAKD_SOFT_LOSSES, reffakd_terms
from kdx.errors import ConfigError


class ReffAKD(Strategy):
    def __init__(self, alpha: float = 0.5, temperature: float = 5.0, float64: bool = True,
                 soft_loss: str = "batchmean_ce", teacher_transform=None) -> None:
        super().__init__(teacher_transform)
        if temperature <= 0:
            raise ValueError(f"distill.temperature={temperature!r} must be > 0.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill.alpha={alpha!r} must lie in [0, 1].")
        if soft_loss not in REFFAKD_SOFT_LOSSES:
            raise ConfigError(f"distill.soft_loss={soft_loss!r}: choose one of {list(REFFAKD_SOFT_LOSSES)} "
                              "(batchmean_ce: the CIFAR-100 notebook; kldiv_mean: Fashion-MNIST, Tiny-ImageNet).")
        self.alpha, self.temperature, self.float64 = float(alpha), float(temperature), bool(float64)
        self.soft_loss = soft_loss

    def loss_terms(self, student, teacher, batch, epoch):
        dtype = torch.float64 if self.float64 else torch.float32
        q = torch.softmax(teacher.logits.to(dtype) / self.temperature, dim=1)
        soft, hard = reffakd_terms(student.logits, batch.y, q, self.alpha, self.temperature, self.float64,
                                   self.soft_loss)
        return {"soft": soft, "ce": hard}
