"""FitNet: hint-based feature distillation (Romero et al., ICLR 2015), as in mdistiller.

Matched to ``megvii-research/mdistiller`` (``mdistiller/distillers/FitNet.py`` and the ``ConvReg`` of
``mdistiller/distillers/_common.py``; RepDistiller's ``HintLoss``/``models/util.py:ConvReg`` are the same),
written anew. With the student hint ``f_s`` (B×C_s×H_s×W_s) and the teacher hint ``f_t`` (B×C_t×H_t×W_t):

- regressor ``r(f_s) = ReLU(BN(conv(f_s)))`` (ReLU dropped with ``use_relu=False``), where ``conv`` is
  chosen from the heights only, in this order:
  ``H_s = 2·H_t``: Conv2d(C_s, C_t, 3, stride 2, padding 1);
  ``2·H_s = H_t``: ConvTranspose2d(C_s, C_t, 4, stride 2, padding 1);
  ``H_s ≥ H_t`` (same size included): Conv2d(C_s, C_t, kernel (1 + H_s − H_t, 1 + W_s − W_t)), no padding;
  any other smaller student: error. All convs keep PyTorch's default init and have a bias.
- ``L_hint = mean_{b,c,h,w} (r(f_s) − f_t)²`` (``F.mse_loss``, mean reduction).

Official CIFAR-100 setting (mdistiller ``cfg.FITNET`` + ``configs/cifar100/fitnet.yaml``): hint layer
``feats[2]`` (``HINT_LAYER = 2``: the output of the second stage, after its ReLU, for teacher and student),
``L = 1.0·CE + 100.0·L_hint``, no KD term, no warm-up, no separate hint-pretraining stage; the regressor's
parameters join the student's SGD (240 epochs, LR 0.05, decay 0.1 at 150/180/210, WD 5e-4, batch 64).
The teacher runs in eval mode under ``no_grad``.

``distill=fitnet`` (:class:`FitNet`): ``w_ce·CE + w_fitnet·fitnet_loss(regressor(feats_s[h]), feats_t[h])`` with
``h = hint_layer`` (terms ``ce``, ``fitnet``); the :class:`HintRegressor` is built at start-up from the two tapped
shapes and trains with the student. ``h`` indexes each network's own ``feats`` list (as in mdistiller, whatever
their lengths); an index outside either list, or a student hint smaller than the teacher's by other than 2×, stops
at build with a :class:`~kdx.errors.ConfigError` (the official code fails there too).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.feature_kd import FeatureKD
from kdx.errors import ConfigError


def _chw(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"a hint shape must be B×C×H×W or C×H×W, got {shape}")
    return shape  # type: ignore[return-value]


def _at_least_f32(x: Tensor) -> Tensor:
    """bf16/fp16 (autocast) promoted to float32; float32 and float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class HintRegressor(nn.Module):
    """mdistiller's ``ConvReg``: maps the student hint to the teacher hint's shape.

    Built from the two feature shapes (``B×C×H×W`` or ``C×H×W``). Submodules ``conv`` and ``bn`` (state-dict
    keys equal to the official ``ConvReg``). Quirks kept: the case is chosen from the heights only; a
    student smaller than the teacher but not by exactly 2× is rejected (the official code fails there too,
    with a ``TypeError`` from ``raise NotImplemented(...)``; here a ``NotImplementedError``).
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True) -> None:
        super().__init__()
        s_c, s_h, s_w = _chw(s_shape)
        t_c, t_h, t_w = _chw(t_shape)
        self.use_relu = bool(use_relu)
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise NotImplementedError(f"FitNet hint regressor: student height {s_h}, teacher height {t_h}")
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, f_s: Tensor) -> Tensor:
        out = self.bn(self.conv(f_s))
        return F.relu(out) if self.use_relu else out


def fitnet_loss(f_s_regressed: Tensor, f_t: Tensor) -> Tensor:
    """``mean (f_s_regressed − f_t)²`` over all elements, at least in float32 (unweighted hint loss)."""
    return F.mse_loss(_at_least_f32(f_s_regressed), _at_least_f32(f_t))


class FitNet(FeatureKD):
    """``distill=fitnet``: ``w_ce·CE + w_fitnet·mse(regressor(feats_s[hint_layer]), feats_t[hint_layer])``."""

    student_taps = teacher_taps = ("feats",)
    term = "fitnet"

    def __init__(self, w_ce: float = 1.0, w_fitnet: float = 100.0, hint_layer: int = 2) -> None:
        super().__init__(w_ce, w_fitnet)
        if isinstance(hint_layer, bool) or not isinstance(hint_layer, int):
            raise ConfigError(f"distill.hint_layer={hint_layer!r}: must be an integer index into the feats lists.")
        self.hint_layer = hint_layer
        self.regressor: HintRegressor | None = None

    def build_feature_modules(self, teacher_shapes, student_shapes) -> None:
        h, feats_s, feats_t = self.hint_layer, student_shapes["feats"], teacher_shapes["feats"]
        if not (-len(feats_s) <= h < len(feats_s) and -len(feats_t) <= h < len(feats_t)):
            raise ConfigError(f"distill.hint_layer={h}: the student has {len(feats_s)} feats and the teacher "
                              f"{len(feats_t)}; choose an index valid for both.")
        try:
            self.regressor = HintRegressor(feats_s[h], feats_t[h])
        except NotImplementedError:
            raise ConfigError(
                f"distill.hint_layer={h}: the student hint C×H×W={_chw(feats_s[h])} is smaller than the teacher's "
                f"{_chw(feats_t[h])} by other than 2×, which FitNet's regressor (official ConvReg) cannot map; "
                "choose another hint_layer."
            ) from None

    def feature_loss(self, student, teacher):
        if self.regressor is None:
            raise RuntimeError("FitNet has no regressor yet: build_feature_modules(teacher_shapes, student_shapes) "
                               "builds it (kdx.build.build calls it at start-up).")
        h = self.hint_layer
        return fitnet_loss(self.regressor(student["feats"][h]), teacher["feats"][h])
