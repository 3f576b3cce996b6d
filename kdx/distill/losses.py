"""Logit distillation losses as pure functions of tensors (docs/methods.md#kd, #dkd).

Each function returns an unweighted scalar; the strategies in this package apply the
per-term weights and warm-up. Shapes: logits [B, C], target [B] (int64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float) -> Tensor:
    """Hinton KD: ``T² · batchmean KL(softmax(z_t/T) ‖ softmax(z_s/T))``."""
    log_p_s = F.log_softmax(logits_student / temperature, dim=1)
    log_p_t = F.log_softmax(logits_teacher / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * temperature**2


def _binary(p: Tensor, target_mask: Tensor) -> Tensor:
    """[p_y, 1 - p_y] per sample, from probabilities ``p`` [B, C]."""
    p_target = (p * target_mask).sum(dim=1, keepdim=True)
    p_other = (p * (1.0 - target_mask)).sum(dim=1, keepdim=True)
    return torch.cat([p_target, p_other], dim=1)


def dkd_terms(
    logits_student: Tensor, logits_teacher: Tensor, target: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Unweighted (TCKD, NCKD) of Decoupled KD, each with T² and the 1/B inside.

    Follows the official code: the student's binary probabilities are logged without
    a clamp, and the non-target distributions are taken by subtracting 1000 from the
    target logit *after* dividing by T, then a softmax over all C classes.
    """
    T = temperature
    mask = F.one_hot(target, logits_student.shape[1]).to(logits_student.dtype)
    z_s, z_t = logits_student / T, logits_teacher / T
    b_s = _binary(F.softmax(z_s, dim=1), mask)
    b_t = _binary(F.softmax(z_t, dim=1), mask)
    batch = logits_student.shape[0]
    # KL(b_t ‖ b_s) with log of the student's binary probabilities taken directly.
    # xlogy keeps 0·log 0 = 0 when the teacher is certain (as F.kl_div does).
    tckd = (torch.xlogy(b_t, b_t) - b_t * torch.log(b_s)).sum() / batch * T**2
    log_q_s = F.log_softmax(z_s - 1000.0 * mask, dim=1)
    log_q_t = F.log_softmax(z_t - 1000.0 * mask, dim=1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum() / batch * T**2
    return tckd, nckd


def dkd_loss(
    logits_student: Tensor,
    logits_teacher: Tensor,
    target: Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> Tensor:
    """DKD: ``α·TCKD + β·NCKD`` (no CE, no warm-up)."""
    tckd, nckd = dkd_terms(logits_student, logits_teacher, target, temperature)
    return alpha * tckd + beta * nckd


REFFAKD_SOFT_LOSSES = ("batchmean_ce", "kldiv_mean")


def reffakd_terms(
    logits_student: Tensor,
    target: Tensor,
    soft_targets: Tensor,
    alpha: float,
    temperature: float,
    float64: bool = True,
    soft_loss: str = "batchmean_ce",
) -> tuple[Tensor, Tensor]:
    """ReffAKD's weighted (soft, hard) terms (docs/methods.md#reffakd, step C, official code).

    ``hard = (1−α)·CE(z_s, y)``; the soft labels ``q`` are not re-tempered; ``p = softmax(z_s/T)``:

    - ``soft_loss='batchmean_ce'`` (the CIFAR-100 notebook): ``soft = α·T²·(1/B)Σ_b −Σ_c q_bc·log p_bc``;
    - ``soft_loss='kldiv_mean'`` (the Fashion-MNIST and Tiny-ImageNet notebooks, ``nn.KLDivLoss()`` with its
      default ``reduction='mean'``): ``soft = α·T²·(1/(B·C))Σ_bc q_bc·(log q_bc − log p_bc)``, a mean over all
      B·C elements, so its gradient is C times weaker than the batch mean's.

    Computed in float64 when ``float64`` (as official).
    """
    if soft_loss not in REFFAKD_SOFT_LOSSES:
        raise ValueError(f"distill.soft_loss={soft_loss!r}: choose one of {list(REFFAKD_SOFT_LOSSES)}.")
    dtype = torch.float64 if float64 else torch.promote_types(logits_student.dtype, torch.float32)
    z = logits_student.to(dtype)
    q = soft_targets.to(dtype)
    log_p = F.log_softmax(z / temperature, dim=1)
    if soft_loss == "batchmean_ce":
        soft = -(q * log_p).sum(dim=1).mean()
    else:
        soft = (torch.special.xlogy(q, q) - q * log_p).mean()
    return alpha * (soft * temperature**2), (1.0 - alpha) * F.cross_entropy(z, target)


def reffakd_loss(
    logits_student: Tensor,
    target: Tensor,
    soft_targets: Tensor,
    alpha: float,
    temperature: float,
    float64: bool = True,
    soft_loss: str = "batchmean_ce",
) -> Tensor:
    """ReffAKD: ``α·T²·soft(z_s/T, q) + (1−α)·CE(z_s, y)`` with ``q = soft_targets`` (batch rows);
    ``soft_loss`` as in :func:`reffakd_terms`."""
    soft, hard = reffakd_terms(logits_student, target, soft_targets, alpha, temperature, float64, soft_loss)
    return soft + hard
