"""Logit standardization, LS (Sun et al., CVPR 2024): a z-score of each logit row before the KD loss.

``standardize(z) = (z - mean(z)) / (eps + std(z))`` over the last dimension, with the unbiased
standard deviation (``torch.std`` default, divisor C - 1) and ``eps = 1e-7`` added to the std (not
under a square root). It is applied to BOTH the student's and the teacher's logits; the loss then
divides the standardized logits by a "base temperature" τ (so the effective temperature of each
sample is τ·std of its own logits). The transform has no parameters and keeps no statistics.

Official source: sunshangquan/logit-standardization-KD, function ``normalize`` (identical copies in
``mdistiller/distillers/KD.py``, ``DKD.py``, ``MLKD.py`` and ``CTKD/distiller_zoo/KD.py``).

How the official code combines it (CIFAR-100; ``tools/train.py --logit-stand --base-temp τ
--kd-weight w``, defaults τ = 2, w = 9; configs ``configs/cifar100/{kd,dkd,mlkd}/<pair>.yaml`` only
set the pair and the solver, the per-pair τ and w are in the log names ``logs/<M>/<m>,T,S,τ,w[,β]``):

- KD+LS: ``0.1·CE + w·τ²·KL(softmax(ŝ_t/τ) ‖ softmax(ŝ_s/τ))`` with ŝ = standardize(z), i.e.
  ``kdx.distill.losses.kd_loss(standardize(z_s), standardize(z_t), τ)``; 240 epochs, LR 0.05
  (0.01 for MobileNetV2/ShuffleNets), wd 5e-4, batch 64. τ, w = 2, 9 except resnet110/resnet20
  4, 12; vgg13/vgg8, resnet32x4/wrn_16_2, resnet32x4/wrn_40_2, wrn_40_2/MobileNetV2,
  vgg13/MobileNetV2 3, 9; ResNet50/MobileNetV2 3, 1.
- DKD+LS: CE weight 1, warm-up 20 epochs, ``α = 1·w``, ``β = β_cfg·w``, T = τ; standardization is
  applied to the raw logits BEFORE the division by T and before the -1000 target mask, i.e.
  ``dkd_terms(standardize(z_s), standardize(z_t), y, τ)``. β_cfg is the pair's DKD β (8 by default,
  2 or 6 in some configs; the log names give the β used, and say 2 where the configs of vgg13/vgg8,
  vgg13/MobileNetV2 and wrn_40_2/wrn_{16_2,40_1} say 6). (τ, w, β_cfg): resnet32x4/resnet8x4,
  resnet32x4/ShuffleV2 2, 9, 8; resnet32x4/wrn_16_2 2, 9, 2; resnet32x4/wrn_40_2 2, 9, 8;
  vgg13/vgg8, resnet110/resnet32, resnet110/resnet20, wrn_40_2/MobileNetV2, ResNet50/MobileNetV2
  2, 15, 2; wrn_40_2/wrn_16_2, wrn_40_2/wrn_40_1 2, 12, 2; resnet56/resnet20 3, 18, 2;
  wrn_40_2/resnet8x4 2, 18, 2; vgg13/MobileNetV2 3, 9, 2.
- MLKD+LS: ``KD.TEMPERATURE = τ`` and every KD/CC/BC term is weighted by w (CE 0.1 on each view);
  LS is applied only inside MLKD's KL terms (at τ and the fixed 3, 5, 2, 6), not in its
  class/batch-correlation terms. τ = 2; w = 9 except resnet32x4/ShuffleV2, vgg13/vgg8,
  vgg13/MobileNetV2 (w = 6). MLKD's own schedule (480 epochs, LR 0.025 or 0.01, strong aug).
- CTKD+LS (``CTKD/``, a RepDistiller-style script): ``0.1·CE + 9·T²·KL(standardized, T)`` with T the
  learned global temperature ``1 + 20·sigmoid(θ)`` (gradient reversal, cosine λ from 0 to -1 over
  10 loops); LR 0.05, batch 64. The script picks ``DistillKL_logit_stand`` when ``--logit_stand``
  is NOT given (and plain KD when it is): the condition is inverted, and the shipped run script
  passes no flag, so LS is on.

Note that in this repository's ``cfg.py`` the KD defaults are T = 2, CE 0.1, KD weight 9 (mdistiller:
4, 0.1, 0.9), so its KD configs give T = 2, w = 9 even without ``--logit-stand``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score of each row (last dim): ``(z - mean) / (eps + std_unbiased)``; float32 (float64 stays).

    A constant row maps to zeros (0 / eps). Shape is unchanged.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True)
    return (z - mean) / (eps + std)


class Standardize:
    """LS as a logit transform on both sides (``distill/logit_transform=ls``): ``standardize`` with its ``eps``."""

    def __init__(self, eps: float = 1e-7) -> None:
        self.eps = float(eps)

    def __call__(self, logits: Tensor) -> Tensor:
        return standardize(logits, self.eps)

    def __repr__(self) -> str:
        return f"Standardize(eps={self.eps})"
