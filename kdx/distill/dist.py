"""DIST, KD from a stronger teacher (Huang et al., NeurIPS 2022): Pearson-correlation relations.

With ``Y_s = softmax(z_s/τ)`` and ``Y_t = softmax(z_t/τ)`` (both [B, C]) and the correlation
``ρ(u, v) = <u - ū, v - v̄> / (‖u - ū‖·‖v - v̄‖ + 1e-8)`` (the 1e-8 is added to the product of the
norms, not inside a square root):

- inter-class relation ``L_inter = 1 - (1/B) Σ_b ρ(Y_s[b, :], Y_t[b, :])`` (each sample's row),
- intra-class relation ``L_intra = 1 - (1/C) Σ_c ρ(Y_s[:, c], Y_t[:, c])`` (each class's column),
- ``L_DIST = β·τ²·L_inter + γ·τ²·L_intra``.

Official source: hunto/DIST_KD, whose classification code is the submodule
hunto/image_classification_sota, ``lib/models/losses/dist_kd.py`` (class ``DIST``), used through
``lib/models/losses/kd_loss.py`` (``KDLoss``: ``kd='dist_t4'`` builds ``DIST(beta=1, gamma=1, tau=4)``).
The segmentation copy in DIST_KD (``segmentation/losses/dist_kd.py``) has no τ; zkxufo/TTM ships the
same classification copy.

Official CIFAR-100 recipe (``configs/strategies/distill/dist_cifar.yaml``): τ = 4, β = γ = 1,
``loss = 1·CE + 2·L_DIST`` (``ori_loss_weight`` 1, ``kd_loss_weight`` 2), batch 64, SGD 0.05
(0.01 for MobileNetV2/ShuffleNetV1/V2 per the README), momentum 0.9 without Nesterov, weight decay
5e-4, 240 epochs; the LR stays 0.05 for 120 "warm-up" epochs (warm-up LR = LR) and then decays ×0.1
every 30 epochs, i.e. 0.05 until epoch 150, then 0.005, 5e-4 and 5e-5 from epochs 180 and 210: the
usual 150/180/210 schedule. Only the logits are read; the teacher runs under ``no_grad``.

Quirk (kept): the loss is not invariant to rescaling the logits (softmax is taken first); it is
invariant to a per-sample shift of either side's logits, and the inter (intra) term to a positive
affine map of each probability row (column), up to the 1e-8.

Strategy (``distill=dist``, :class:`DIST`): ``w_ce·CE + w_dist·(β·τ²·L_inter + γ·τ²·L_intra)``, logged as
the terms ``ce``, ``inter`` and ``intra``; defaults w_ce 1, w_dist 2, β = γ = 1, τ = 4 (the CIFAR recipe
above). The CE is taken on the raw logits; a logit transform (``distill/logit_transform=ls``) feeds only the
DIST terms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.base import Strategy
from kdx.errors import ConfigError


def _float(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 logits under autocast are promoted; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _row_correlation(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """ρ between matching rows of ``a`` and ``b`` [R, K] → [R], eps added to the norm product."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def inter_class_relation(y_s: Tensor, y_t: Tensor, eps: float = 1e-8) -> Tensor:
    """``1 - mean_b ρ(y_s[b, :], y_t[b, :])`` for probabilities [B, C] (no τ² here)."""
    return 1.0 - _row_correlation(y_s, y_t, eps).mean()


def intra_class_relation(y_s: Tensor, y_t: Tensor, eps: float = 1e-8) -> Tensor:
    """``1 - mean_c ρ(y_s[:, c], y_t[:, c])`` for probabilities [B, C] (no τ² here)."""
    return inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1), eps)


def dist_terms(logits_student: Tensor, logits_teacher: Tensor, tau: float = 1.0) -> tuple[Tensor, Tensor]:
    """Unweighted ``(τ²·L_inter, τ²·L_intra)`` from logits [B, C]; float32 (float64 stays)."""
    y_s = torch.softmax(_float(logits_student) / tau, dim=1)
    y_t = torch.softmax(_float(logits_teacher) / tau, dim=1)
    return tau**2 * inter_class_relation(y_s, y_t), tau**2 * intra_class_relation(y_s, y_t)


def dist_loss(
    logits_student: Tensor, logits_teacher: Tensor, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0
) -> Tensor:
    """DIST: ``β·τ²·L_inter + γ·τ²·L_intra`` (no CE; the official CIFAR weight on this is 2)."""
    inter, intra = dist_terms(logits_student, logits_teacher, tau)
    return beta * inter + gamma * intra


class DIST(Strategy):
    """``w_ce·CE + w_dist·(β·τ²·L_inter + γ·τ²·L_intra)`` (see the module docstring)."""

    def __init__(
        self, beta: float = 1.0, gamma: float = 1.0, tau: float = 4.0, w_ce: float = 1.0, w_dist: float = 2.0,
        teacher_transform=None, logit_transform=None,
    ) -> None:
        super().__init__(teacher_transform, logit_transform)
        if not tau > 0:
            raise ConfigError(f"distill.tau={tau}: the DIST temperature must be > 0.")
        self.beta, self.gamma, self.tau, self.w_ce, self.w_dist = beta, gamma, tau, w_ce, w_dist

    def loss_terms(self, student, teacher, batch, epoch):
        z_s, z_t = self.transform_logits(student.logits, teacher.logits)
        inter, intra = dist_terms(z_s, z_t, self.tau)
        return {
            "ce": self.w_ce * F.cross_entropy(_float(student.logits), batch.y),
            "inter": self.w_dist * self.beta * inter,
            "intra": self.w_dist * self.gamma * intra,
        }
