"""VID: variational information distillation (Ahn et al., CVPR 2019), as in mdistiller.

Matched to ``megvii-research/mdistiller`` (``mdistiller/distillers/VID.py``; RepDistiller's
``distiller_zoo/VID.py:VIDLoss`` is the same but for the learned variance, see ``learn_var``), written anew.
Per feature pair (student ``f_s`` B×C_s×H_s×W_s, teacher ``f_t`` B×C_t×H_t×W_t):

- the larger map is adaptively average-pooled to ``(h, h)``, ``h`` the smaller of the two *heights*;
- ``μ = conv1x1(C_t→C_t)(ReLU(conv1x1(C_t→C_t)(ReLU(conv1x1(C_s→C_t)(f_s)))))`` (no bias, default init;
  mdistiller's mid width is the target width C_t);
- ``σ²_c = log(1 + exp(α_c)) + eps``, ``α`` initialised to ``log(exp(init_pred_var − eps) − 1)`` so that
  ``σ² = init_pred_var`` at the start;
- ``L_VID = mean_{b,c,h,w} ½·((μ − f_t)² / σ²_c + log σ²_c)``, summed over the feature pairs.

Official CIFAR-100 setting (mdistiller ``cfg.VID`` + ``configs/cifar100/vid.yaml``): pairs
``zip(student feats[1:], teacher feats[1:])`` (the stage outputs after their ReLU, stem excluded, paired from
the first stage), one ``VIDLoss(C_s, C_t, C_t)`` per pair, ``init_pred_var = 5.0``, ``eps = 1e-5``,
``L = 1.0·CE + 1.0·Σ L_VID``, no KD, no warm-up; regressors train with the student (240 epochs, LR 0.05,
WD 5e-4). Teacher in eval mode under ``no_grad``.

``distill=vid`` (:class:`VID`): ``w_ce·CE + w_vid·Σ_i VIDLoss_i(feats_s[1:][i], feats_t[1:][i])`` (terms ``ce``,
``vid``), one :class:`VIDLoss` per pair of ``zip(feats_s[1:], feats_t[1:])`` built at start-up from the tapped
shapes, training with the student. A teacher with more stages than the student has its extra ones dropped, as in
mdistiller; a student with more stages than the teacher stops at build with a :class:`~kdx.errors.ConfigError`
(mdistiller builds one regressor per zipped pair but loops over the student's stages: an ``IndexError``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.feature_kd import FeatureKD
from kdx.errors import ConfigError


def _at_least_f32(x: Tensor) -> Tensor:
    """bf16/fp16 (autocast) promoted to float32; float32 and float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def vid_loss(pred_mean: Tensor, pred_var: Tensor, target: Tensor) -> Tensor:
    """Gaussian NLL without ``½·log 2π``: ``mean ½·((μ − t)²/σ² + log σ²)``, at least in float32.

    ``pred_mean`` and ``target`` are B×C×H×W; ``pred_var`` is the per-channel variance (shape ``C``) or any
    tensor broadcastable to ``pred_mean``. The mean runs over every element of the broadcast result.
    """
    var = _at_least_f32(pred_var)
    if var.dim() == 1:
        var = var.view(1, -1, 1, 1)
    nll = 0.5 * ((_at_least_f32(pred_mean) - _at_least_f32(target)) ** 2 / var + torch.log(var))
    return nll.mean()


class VIDLoss(nn.Module):
    """The per-pair VID regressor with its variance; ``forward(f_s, f_t)`` → unweighted ``L_VID``.

    Submodule ``regressor`` (conv, ReLU, conv, ReLU, conv: state-dict keys ``regressor.0/2/4.weight``, as
    RepDistiller's ``VIDLoss`` and mdistiller's ``regressors[i]``) and ``log_scale`` (``C_t``).

    Quirks of mdistiller kept by default:

    - ``learn_var=False``: mdistiller keeps its ``log_scales`` in a plain Python list, so they are never
      registered nor given to the optimiser and ``σ²`` stays at ``init_pred_var``; ``log_scale`` is then a
      buffer here. ``learn_var=True`` makes it a trained parameter (RepDistiller and the paper).
    - pooling uses the heights only (output ``h×h``), so a non-square map is made square;
      ``fix_nonsquare_pool=True`` pools to the smaller map's ``(H, W)`` instead (identical on square maps).
    - ``σ² = log(1 + exp(α)) + eps`` is computed literally (not ``softplus``), overflowing for α ≳ 88.
    """

    def __init__(self, num_input_channels: int, num_mid_channel: int, num_target_channels: int,
                 init_pred_var: float = 5.0, eps: float = 1e-5, learn_var: bool = False,
                 fix_nonsquare_pool: bool = False) -> None:
        super().__init__()
        c_in, c_mid, c_out = int(num_input_channels), int(num_mid_channel), int(num_target_channels)
        self.regressor = nn.Sequential(
            nn.Conv2d(c_in, c_mid, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c_mid, c_mid, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c_mid, c_out, kernel_size=1, bias=False),
        )
        self.eps = float(eps)
        self.fix_nonsquare_pool = bool(fix_nonsquare_pool)
        alpha = torch.full((c_out,), math.log(math.exp(float(init_pred_var) - self.eps) - 1.0))
        if learn_var:
            self.log_scale = nn.Parameter(alpha)
        else:
            self.register_buffer("log_scale", alpha)

    def pred_var(self) -> Tensor:
        """``σ²`` per target channel, shape ``C_t``."""
        return torch.log(1.0 + torch.exp(self.log_scale)) + self.eps

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        s_h, t_h = f_s.shape[2], f_t.shape[2]
        if self.fix_nonsquare_pool:
            size = (min(s_h, t_h), min(f_s.shape[3], f_t.shape[3]))
            f_s = f_s if tuple(f_s.shape[2:]) == size else F.adaptive_avg_pool2d(f_s, size)
            f_t = f_t if tuple(f_t.shape[2:]) == size else F.adaptive_avg_pool2d(f_t, size)
        elif s_h > t_h:
            f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
        elif s_h < t_h:
            f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
        return vid_loss(self.regressor(f_s), self.pred_var(), f_t)


class VID(FeatureKD):
    """``distill=vid``: ``w_ce·CE + w_vid·Σ VID losses`` over ``zip(feats_s[1:], feats_t[1:])``."""

    student_taps = teacher_taps = ("feats",)
    term = "vid"

    def __init__(self, w_ce: float = 1.0, w_vid: float = 1.0, init_pred_var: float = 5.0, eps: float = 1e-5,
                 learn_var: bool = False, fix_nonsquare_pool: bool = False) -> None:
        super().__init__(w_ce, w_vid)
        if not float(eps) >= 0 or not float(init_pred_var) > float(eps):
            raise ConfigError(f"distill.init_pred_var={init_pred_var} and distill.eps={eps}: the initial variance "
                              "must exceed eps ≥ 0 (the variance is softplus(α) + eps).")
        self.init_pred_var, self.eps = float(init_pred_var), float(eps)
        self.learn_var, self.fix_nonsquare_pool = bool(learn_var), bool(fix_nonsquare_pool)
        self.regressors = nn.ModuleList()

    def build_feature_modules(self, teacher_shapes, student_shapes) -> None:
        feats_s, feats_t = student_shapes["feats"][1:], teacher_shapes["feats"][1:]
        if len(feats_s) > len(feats_t):
            raise ConfigError(
                f"distill=vid pairs feats[1:] of student and teacher, but the student (model) has {len(feats_s)} "
                f"stages and the teacher (teacher.model) {len(feats_t)}: mdistiller's VID fails there (it loops over "
                "the student's stages). Give the student fewer points (model.taps.feats) or choose another method."
            )
        self.regressors = nn.ModuleList(
            VIDLoss(int(s[1]), int(t[1]), int(t[1]), self.init_pred_var, self.eps, self.learn_var,
                    self.fix_nonsquare_pool)
            for s, t in zip(feats_s, feats_t)
        )

    def feature_loss(self, student, teacher):
        if not len(self.regressors):
            raise RuntimeError("VID has no regressors yet: build_feature_modules(teacher_shapes, student_shapes) "
                               "builds them (kdx.build.build calls it at start-up).")
        pairs = zip(self.regressors, student["feats"][1:], teacher["feats"][1:])
        return sum(vid(f_s, f_t) for vid, f_s, f_t in pairs)
