"""OFD: a comprehensive overhaul of feature distillation (Heo et al., ICCV 2019), as in mdistiller.

Matched to ``megvii-research/mdistiller`` (``mdistiller/distillers/OFD.py``), itself a port of
``clovaai/overhaul-distillation`` (``CIFAR-100/distiller.py``), written anew.

- Margin per teacher channel from the BN right before the ReLU (weight γ, bias β), the mean of a
  N(β, γ²) response given that it is negative: with ``s = |γ|``, ``Φ`` the standard normal CDF,
  ``m_c = β − s·exp(−(β/s)²/2) / (√(2π)·Φ(−β/s))`` if ``Φ(−β/s) > 0.001``, else ``m_c = −3s``.
- Connector per stage: ``BN(Conv2d(C_s→C_t, k×k, padding (k−1)/2, no bias))``, conv weight
  ``N(0, 2/(k·k·C_t))``, BN weight 1, bias 0.
- Partial L2 per stage (source = connected student pre-ReLU map, target = teacher pre-ReLU map adaptively
  average-pooled to the source's size, detached):
  ``ℓ = (s−m)²·[s>m ∧ t≤m] + (s−t)²·[s>t ∧ m<t≤0] + (s−t)²·[t>0]``,
  ``L_i = Σ_{c,h,w} mean_b ℓ``
  (= the original's ``t' = max(t, m)``, ``(s−t')²·[s>t' ∨ t'>0]`` summed over everything / B, when m ≤ 0).
- ``L_OFD = Σ_i L_i / 2^(n−1−i)`` over the n stages (the last stage weighs 1, the one before ½, ...).

Official CIFAR-100 setting (mdistiller ``cfg.OFD`` + ``configs/cifar100/ofd.yaml``): features
``preact_feats[1:]`` of both models (stage outputs before their final ReLU; stem excluded); connector
channels ``get_stage_channels()[1:]``; both lists aligned to their *last* ``n = min(len)`` entries; margins
from *all* ``teacher.get_bn_before_relu()`` in order (not aligned: take the last n when the teacher has
more); kernel size 1; ``L = 1.0·CE + 0.001·L_OFD``; no KD, no warm-up; connectors train with the student
(240 epochs, LR 0.05, WD 5e-4). Quirk: mdistiller's ``OFD.train()`` (as the original) leaves the *teacher in
train mode* during training: its BN layers use batch statistics and update their running statistics
(forward under ``no_grad``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def _at_least_f32(x: Tensor) -> Tensor:
    """bf16/fp16 (autocast) promoted to float32; float32 and float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def ofd_margin(bn_weight: Tensor, bn_bias: Tensor) -> Tensor:
    """Per-channel margin ``E[x | x < 0]`` for ``x ~ N(bn_bias, bn_weight²)`` (``−3|γ|`` when ``Φ ≤ 0.001``).

    Computed in float64 (the official code uses Python floats and ``scipy.stats.norm.cdf``; here
    ``Φ(−β/s) = ½·erfc(β/(s√2))``), returned as float32 on the weights' device (``torch.FloatTensor``).
    A zero BN weight is rejected (the official code raises ``ZeroDivisionError``).
    """
    s = bn_weight.detach().double().abs()
    m = bn_bias.detach().double()
    if bool((s == 0).any()):
        raise ValueError("ofd_margin: a BN weight is zero (the official code divides by it)")
    cdf = 0.5 * torch.special.erfc(m / s / math.sqrt(2.0))
    truncated = -s * torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + m
    return torch.where(cdf > 0.001, truncated, -3 * s).float()


def ofd_loss(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """Partial L2 of one stage: ``Σ_{c,h,w} mean_b ℓ`` (see the module docstring), at least in float32.

    ``source``, ``target``: B×C×H×W of equal shape; ``margin``: ``C`` or broadcastable to them.
    The official three-mask form is used, so a positive margin behaves as in mdistiller (the official
    ``abs`` around the non-negative sum changes nothing and is left out).
    """
    s, t, m = _at_least_f32(source), _at_least_f32(target), _at_least_f32(margin)
    if m.dim() == 1:
        m = m.view(1, -1, 1, 1)
    loss = ((s - m) ** 2 * ((s > m) & (t <= m))
            + (s - t) ** 2 * ((s > t) & (t > m) & (t <= 0))
            + (s - t) ** 2 * (t > 0))
    return loss.mean(dim=0).sum()


def ofd_stages_loss(sources: Sequence[Tensor], targets: Sequence[Tensor], margins: Sequence[Tensor]) -> Tensor:
    """``Σ_i ofd_loss(source_i, pool(target_i), margin_i) / 2^(n−1−i)`` (unweighted ``L_OFD``).

    ``sources``: the student's pre-ReLU maps after the connectors; ``targets``: the teacher's pre-ReLU
    maps (adaptively average-pooled to each source's H×W and detached here); ``margins``: one per stage.
    """
    n = len(sources)
    if not n == len(targets) == len(margins):
        raise ValueError(f"OFD needs as many targets and margins as sources, got {n}, {len(targets)}, {len(margins)}")
    total: Tensor | float = 0.0
    for i, (src, tgt, margin) in enumerate(zip(sources, targets, margins)):
        tgt = F.adaptive_avg_pool2d(tgt, src.shape[-2:]).detach()
        total = total + ofd_loss(src, tgt, margin) / 2 ** (n - i - 1)
    return total  # type: ignore[return-value]


class OFDConnectors(nn.Module):
    """One ``Sequential(Conv2d, BatchNorm2d)`` per stage (``connectors[i]``, state-dict keys as mdistiller's
    ``ConnectorConvBN``); ``forward(list of student maps)`` → list of maps with the teacher's channels."""

    def __init__(self, s_channels: Sequence[int], t_channels: Sequence[int], kernel_size: int = 1) -> None:
        super().__init__()
        if len(s_channels) != len(t_channels):
            raise ValueError(f"OFD connectors: {len(s_channels)} student stages, {len(t_channels)} teacher stages")
        k = int(kernel_size)
        self.connectors = nn.ModuleList()
        for c_s, c_t in zip(s_channels, t_channels):
            conv = nn.Conv2d(int(c_s), int(c_t), kernel_size=k, padding=(k - 1) // 2, bias=False)
            bn = nn.BatchNorm2d(int(c_t))
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (k * k * int(c_t))))
            nn.init.ones_(bn.weight)
            nn.init.zeros_(bn.bias)
            self.connectors.append(nn.Sequential(conv, bn))

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [connector(f) for connector, f in zip(self.connectors, feats)]
