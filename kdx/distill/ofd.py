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

``distill=ofd`` (:class:`OFDStrategy`): connectors from the tapped ``preact_feats[1:]`` shapes, margins from the
teacher's ``bn_before_relu`` modules (``attach_networks``, kept as buffers), ``teacher_bn_train`` (official:
true) sets ``teacher_bn_batch_stats``; false is the fix (the teacher's BN in eval mode, running statistics kept).
Margins: mdistiller indexes them from the first while the features are aligned to the last n, which only runs
when both networks have as many stages; here the last n margins are taken (the same whenever mdistiller runs).
A teacher without ``bn_before_relu`` (ShuffleNets) stops at build, as mdistiller cannot run it either.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.base import Strategy
from kdx.errors import ConfigError


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


class OFDStrategy(Strategy):
    """``distill=ofd``: ``w_ce·CE + w_ofd·L_OFD`` over both networks' ``preact_feats[1:]``."""

    student_taps = teacher_taps = ("preact_feats",)

    def __init__(self, w_ce: float = 1.0, w_ofd: float = 0.001, kernel_size: int = 1,
                 teacher_bn_train: bool = True) -> None:
        super().__init__()
        if isinstance(kernel_size, bool) or int(kernel_size) != kernel_size or kernel_size < 1:
            raise ConfigError(f"distill.kernel_size={kernel_size!r} must be a positive integer.")
        self.w_ce, self.w_ofd, self.kernel_size = float(w_ce), float(w_ofd), int(kernel_size)
        self.teacher_bn_batch_stats = bool(teacher_bn_train)
        self.teacher_margins: list[Tensor] = []
        self.connectors: Optional[OFDConnectors] = None
        self.n = 0

    @staticmethod
    def _margin_layers(teacher: Optional[nn.Module]) -> list[str]:
        names = getattr(teacher, "bn_before_relu", None)
        if not names:
            who = "has no network" if teacher is None else f"({type(teacher).__name__}) declares none"
            raise ConfigError(
                f"distill=ofd takes its margins from the teacher's BatchNorm layers before each stage's last ReLU "
                f"(bn_before_relu), and the teacher {who} (mdistiller's ShuffleNets raise NotImplementedError "
                "there). Choose another teacher (teacher_arch=...)."
            )
        return list(names)

    def check_networks(self, student: Optional[nn.Module], teacher: Optional[nn.Module]) -> None:
        if teacher is not None:  # refused at start-up, before a missing teacher would be trained
            self._margin_layers(teacher)

    def attach_networks(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        names = self._margin_layers(teacher)
        modules = dict(teacher.named_modules())
        self.teacher_margins = [ofd_margin(modules[name].weight, modules[name].bias).cpu() for name in names]

    def build_feature_modules(self, teacher_shapes, student_shapes) -> None:
        t_ch = [int(s[1]) for s in teacher_shapes["preact_feats"][1:]]
        s_ch = [int(s[1]) for s in student_shapes["preact_feats"][1:]]
        n = min(len(t_ch), len(s_ch), len(self.teacher_margins))
        margins = self.teacher_margins[len(self.teacher_margins) - n:]
        if n == 0 or [m.numel() for m in margins] != t_ch[len(t_ch) - n:]:
            raise ConfigError(
                f"distill=ofd: the teacher's last {n} bn_before_relu layers have {[m.numel() for m in margins]} "
                f"channels, its last {n} preact_feats[1:] taps {t_ch[len(t_ch) - n:]}: they must be the same "
                "points (teacher.model.taps.preact_feats)."
            )
        self.n, self.teacher_margins = n, []
        for i, m in enumerate(margins):
            self.register_buffer(f"margin_{i}", m)
        self.connectors = OFDConnectors(s_ch[len(s_ch) - n:], t_ch[len(t_ch) - n:], self.kernel_size)

    def loss_terms(self, student, teacher, batch, epoch):
        if self.connectors is None:
            raise RuntimeError("OFDStrategy has no connectors yet: kdx.build.build calls attach_networks and "
                               "build_feature_modules first.")
        n = self.n
        sources = self.connectors(student.taps["preact_feats"][1:][-n:])
        margins = [getattr(self, f"margin_{i}") for i in range(n)]
        loss = ofd_stages_loss(sources, teacher.taps["preact_feats"][1:][-n:], margins)
        return {"ce": self.w_ce * F.cross_entropy(student.logits, batch.y), "ofd": self.w_ofd * loss}
