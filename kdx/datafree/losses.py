"""NAYER's generator losses (docs/methods.md#nayer), as pure functions of tensors.

- :func:`batch_moments`: per-channel mean and biased variance of a BN layer's input over (N, H, W).
- :func:`bn_statistics_loss`: ``Σ_l ‖σ²_run − σ̃²‖₂ + ‖μ_run − μ̃‖₂`` with the batch statistics mixed
  with momentum statistics, ``μ̃ = (1 − m)·μ_batch + m·μ_mmt`` (official ``DeepInversionHook``).
- :func:`onehot_ce`: ``mean_b(−Σ_c y_bc log softmax(t)_bc)``.
- :func:`adversarial_loss`: ``−(1/B) Σ_b 1[argmax s_b = argmax t_b] · KL(σ(t_b) ‖ σ(s_b))`` (T = 1).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Moments = tuple[Tensor, Tensor]  # (mean [C], biased variance [C])


def batch_moments(x: Tensor) -> Moments:
    """Per-channel mean and biased variance of ``x`` ``[N, C, H, W]`` over (N, H, W), in float32."""
    x = x.float()
    c = x.shape[1]
    flat = x.transpose(0, 1).reshape(c, -1)
    return flat.mean(1), flat.var(1, unbiased=False)


def bn_statistics_loss(
    batch_stats: Sequence[Moments],
    running_stats: Sequence[Moments],
    momentum_stats: Optional[Sequence[Optional[Moments]]] = None,
    momentum: float = 0.9,
) -> Tensor:
    """Sum over BN layers of ``‖var_run − var̃‖₂ + ‖mean_run − meañ‖₂``.

    ``batch_stats[l]`` are the (mean, var) of layer l's input on this batch, ``running_stats[l]`` the
    layer's running (mean, var). Where ``momentum_stats[l]`` is given, the batch statistics are mixed
    first: ``meañ = (1 − momentum)·mean + momentum·mean_mmt`` (the same for var); without momentum
    statistics (``None``, or a ``None`` entry: the first synthesis loop) the batch statistics are used.
    """
    if len(batch_stats) != len(running_stats):
        raise ValueError(f"{len(batch_stats)} batch statistics but {len(running_stats)} running statistics")
    if not batch_stats:
        raise ValueError("bn_statistics_loss needs at least one BatchNorm layer (the teacher has none)")
    mmt = list(momentum_stats) if momentum_stats is not None else [None] * len(batch_stats)
    total = None
    for (mean, var), (r_mean, r_var), m in zip(batch_stats, running_stats, mmt):
        if m is not None:
            mean = (1 - momentum) * mean + momentum * m[0]
            var = (1 - momentum) * var + momentum * m[1]
        term = torch.linalg.vector_norm(r_var.to(var) - var) + torch.linalg.vector_norm(r_mean.to(mean) - mean)
        total = term if total is None else total + term
    return total


def onehot_ce(teacher_logits: Tensor, onehot_targets: Tensor) -> Tensor:
    """Cross-entropy with (one-hot or soft) targets: ``mean_b(−Σ_c y_bc log softmax(t)_bc)``."""
    return torch.sum(-onehot_targets * F.log_softmax(teacher_logits.float(), dim=-1), dim=-1).mean()


def adversarial_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``−mean_b(mask_b · KL(σ(t_b) ‖ σ(s_b)))`` with ``mask_b = 1[argmax s_b = argmax t_b]``.

    The generator maximises the student–teacher divergence only where they still agree.
    Gradients flow through both logits (as in the official code).
    """
    s, t = student_logits.float(), teacher_logits.float()
    mask = (s.argmax(1) == t.argmax(1)).to(s.dtype)
    kl = F.kl_div(F.log_softmax(s, dim=1), F.softmax(t, dim=1), reduction="none").sum(1)
    return -(kl * mask).mean()


__all__ = ["Moments", "adversarial_loss", "batch_moments", "bn_statistics_loss", "onehot_ce"]
