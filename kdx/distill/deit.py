"""DeiT's distillation token (Touvron et al., ICML 2021), composable with the logit methods (``distill=deit``).

A distilled ViT (timm's ``deit_*_distilled_*``) has a class token and a distillation token, each with its own head;
in training it returns ``(cls_logits, dist_logits)`` (timm's ``set_distilled_training(True)``, switched on by this
strategy), in evaluation their mean. The class-token logits go to the base method (``distill.base``, any logit
strategy: plain CE as in DeiT, or KD, DKD, TopKD ... on the class token); the distillation-token logits learn from
the teacher:

- soft (``hard: false``): ``Σ_b KL(p_t^τ ‖ p_d^τ) · τ² / z_d.numel()`` (``F.kl_div`` of the two log-softmaxes,
  ``reduction='sum', log_target=True``);
- hard (``hard: true``): ``CE(z_d, argmax z_t)``;
- mixed as DeiT's ``DistillationLoss``: ``(1 − α)·base + α·distillation`` (each base term is scaled by ``1 − α``;
  terms ``ce``/… of the base and ``deit``).

Official source: facebookresearch/deit @ 7e160fe, ``losses.py`` (``DistillationLoss.forward``), defaults of
``main.py``: ``--distillation-alpha 0.5 --distillation-tau 1.0``, base criterion
``LabelSmoothingCrossEntropy(0.1)`` (``--smoothing 0.1``; with mixup on, timm's ``SoftTargetCrossEntropy`` on the
mixed labels: kdx has no mixup).
Quirk kept: the soft loss divides by the number of logits ``B·C`` (the "legacy PyTorch behaviour", DeiT issue 61),
not by the batch size. The teacher's logits are those the step gives (``teacher.input`` decides what it sees, e.g.
a 224×224 view for a 32×32 student); the base method's teacher transform applies to its own terms only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.base import DataInfo, ModelOutput, Strategy
from kdx.errors import ConfigError


def deit_soft_loss(dist_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """DeiT's soft distillation: ``Σ KL(p_t^τ ‖ p_d^τ) · τ² / numel`` (numel = B·C), in at least float32."""
    z_d = dist_logits.to(torch.promote_types(dist_logits.dtype, torch.float32))
    z_t = teacher_logits.to(z_d.dtype)
    kl = F.kl_div(F.log_softmax(z_d / tau, dim=1), F.log_softmax(z_t / tau, dim=1), reduction="sum", log_target=True)
    return kl * (tau * tau) / z_d.numel()


def deit_hard_loss(dist_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DeiT's hard distillation: cross-entropy to the teacher's argmax class."""
    return F.cross_entropy(dist_logits.float(), teacher_logits.argmax(dim=1))


class DeiT(Strategy):
    """``distill=deit``: ``(1 − α)·base(class token) + α·deit(distillation token)`` (see the module docstring)."""

    student_outputs = ("dist",)

    def __init__(self, base: Strategy, hard: bool = False, alpha: float = 0.5, tau: float = 1.0) -> None:
        super().__init__()
        logit_method = isinstance(base, Strategy) and base.regime == "distill" and not (
            base.needs_features or base.views or base.needs_head or base.student_outputs)
        if not logit_method:
            raise ConfigError(f"distill.base={type(base).__name__}: DeiT's class-token loss must be a logit method "
                              "(ce, kd, dkd, topkd ...: no feature taps, extra views, classifier or extra outputs).")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"distill.alpha={alpha}: DeiT mixes (1 − α)·base + α·distillation; give 0 ≤ α ≤ 1.")
        if float(tau) <= 0:
            raise ConfigError(f"distill.tau={tau}: the soft distillation's temperature must be positive.")
        self.base = base
        self.hard, self.alpha, self.tau = bool(hard), float(alpha), float(tau)

    def attach_data(self, info: DataInfo) -> None:
        self.base.attach_data(info)

    def attach_networks(self, student: nn.Module, teacher: nn.Module | None) -> None:
        try:
            switch = student.set_distilled_training
        except AttributeError:
            raise ConfigError(
                f"distill=deit needs a student with a distillation token ({type(student).__name__} has none): "
                "model=timm model.name=timm/deit_tiny_distilled_patch16_224 (or another deit_*_distilled_* model)."
            ) from None
        switch(True)  # training forwards return (class-token logits, distillation-token logits)
        self.base.attach_networks(student, teacher)

    def loss_terms(self, student: ModelOutput, teacher: ModelOutput, batch, epoch):
        base_teacher = None
        if self.base.needs_teacher:
            base_teacher = ModelOutput(self.base.transform_teacher(teacher.logits, batch.y))
        base = self.base(ModelOutput(student.logits), base_teacher, batch, epoch)
        z_d = student.extra["dist"]
        dist = deit_hard_loss(z_d, teacher.logits) if self.hard else deit_soft_loss(z_d, teacher.logits, self.tau)
        terms = {k: (1.0 - self.alpha) * v for k, v in base.items()}
        terms["deit"] = self.alpha * dist
        return terms


__all__ = ["DeiT", "deit_hard_loss", "deit_soft_loss"]
