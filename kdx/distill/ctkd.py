"""CTKD: Curriculum Temperature for Knowledge Distillation (Li et al., AAAI 2023), global temperature.

Official source: zhengli97/CTKD @ 7d52522 -- ``models/temp_global.py`` (``Global_T``, gradient reversal),
``train_student.py`` (``CosineDecay``/``LinearDecay``, the loop over epochs), ``helper/loops.py``
(``train_distill``: how the temperature enters the losses), ``distiller_zoo/KD.py``, ``distiller_zoo/DKD.py``.

Temperature: one learnable scalar ``θ`` (initialised to 1) goes through a gradient-scaling layer and a sigmoid,

    τ = t_start + t_range · σ(GRL_λ(θ)),       GRL_λ: forward identity, backward multiplies the gradient by λ,

with ``t_start = 1`` and ``t_range = 20`` (the official flags are ``--t_start 1 --t_end 20``; ``t_end`` is the
range, not the end: τ ∈ (1, 21), τ = 1 + 20·σ(1) ≈ 15.62 at initialisation). The reversal comes from the sign
of λ: the schedule runs from ``decay_max = 0`` down to ``decay_min = -1``, so ``∂L/∂θ`` is multiplied by a
non-positive λ and the temperature *ascends* the distillation loss while the student descends it.

λ curriculum (:func:`ctkd_lambda`, 1-based epoch ``e``, evaluated once at the start of each epoch):
cosine ``λ(e) = decay_min + (decay_max - decay_min)·(1 + cos(π·min(e, L)/L))/2`` with ``L = decay_loops = 10``:
λ(1) ≈ -0.0245, λ(5) = -0.5, λ(e ≥ 10) = -1. Linear (official ``--cosine_decay 0``):
``λ(e) = -min(e, L-1)·(decay_max - decay_min)/L`` -- quirks kept: ``decay_min`` is not added back and the epoch is
clipped at ``L - 1``, so λ never reaches ``decay_min`` (with 0/-1/10 it stops at -0.9).

Distillation losses take the temperature as a tensor: :func:`kd_loss_learnable_t` is the official ``DistillKL``
(``batchmean`` KL of the ``τ``-softened distributions, times ``τ²``); :func:`dkd_loss_learnable_t` is the DKD loss of
the CTKD repository (α·TCKD + β·NCKD at τ, no warm-up). Gradient w.r.t. τ: the official code feeds teacher
*probabilities* to ``F.kl_div``; under PyTorch 2.x its derivative w.r.t. a target entry that is exactly 0 is NaN
(``xlogy`` composite), so τ's gradient is NaN as soon as one teacher probability underflows -- always for the
CTKD DKD's NCKD, whose target class gets ``exp(-1000)``. Under the PyTorch 1.11 the official code targets,
``kl_div``'s target gradient is masked to 0 where the target is 0. Here the KL terms use ``0·log 0 = 0`` with a
finite derivative (teacher log-probabilities from ``log_softmax``, or a masked log), which reproduces the
PyTorch 1.11 gradients: same values, finite gradients. Losses are computed in float32 (float64 for float64
logits) and returned as 0-dim tensors (the official ones have shape ``[1]``, from ``τ`` of shape ``[1]``); ``τ``
must be a one-element tensor or a float.

Official CIFAR-100 recipe (``scripts/run_cifar_distill.sh`` + ``train_student.py`` defaults), CTKD + KD:
``L = 0.1·CE + 0.9·KD_τ`` (``-r 0.1 -a 0.9 -b 0``), batch 64, SGD lr 0.05 (0.01 for MobileNetV2/ShuffleV1/V2),
momentum 0.9, weight decay 5e-4 -- applied to ``θ`` too, which is in the same SGD parameter group as the
student, and not reversed (the optimiser adds it after backward) -- 240 epochs, lr ×0.1 after epochs
150/180/210; ``--cosine_decay 1 --decay_max 0 --decay_min -1 --decay_loops 10``. CTKD + DKD (commented line in
the script): ``L = 1·CE + 0·KD_τ + 1·DKD_τ`` with ``dkd_alpha = 1``, ``dkd_beta = 2``, no DKD warm-up.
The instance-wise variant is not in the repository (README: code and logs on cloud drives only).

Strategies (``distill=ctkd``, ``distill=ctkd_dkd``): :class:`CTKD` is ``w_ce·CE + w_kd·KD_τ`` and
:class:`CTKDDKD` is ``w_ce·CE + w_dkd·DKD_τ`` (terms ``ce`` and ``kd`` / ``dkd``). Each owns one
:class:`GlobalTemperature` as a submodule, so ``θ`` joins the student's optimiser (same group, same weight
decay, as official) and its checkpoint; λ is :func:`ctkd_lambda` of the 1-based epoch, as the official loop
computes it at the start of each epoch. The CTKD+DKD script line (``--distill dkd -r 1 -a 0 -b 1 --dkd_alpha 1
--dkd_beta 2``, run with the script's CTKD flags) also adds ``0·KD_τ``: left out here (it adds 0 to the loss and,
under the PyTorch 1.11 semantics above, 0 to every gradient). A logit transform (``distill/logit_transform=ls``)
feeds the distillation term only, never the CE; CTKD+LS of the LS repository is ``CTKD`` with it. The τ of the
latest step is ``last_temperature`` (a detached 0-dim tensor on the loss's device, no host sync; None before the
first step) and its λ ``last_lambda``: a loss term cannot carry them, the caller logs them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdx.distill.base import Strategy
from kdx.errors import ConfigError


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``lambda_`` (a float, sign included)."""

    @staticmethod
    def forward(ctx, x: Tensor, lambda_: float) -> Tensor:
        ctx.lambda_ = float(lambda_)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.lambda_, None


class GlobalTemperature(nn.Module):
    """CTKD's global temperature ``τ = t_start + t_range·σ(GRL_λ(θ))``; ``θ`` starts at ``init`` (official 1)."""

    def __init__(self, t_start: float = 1.0, t_range: float = 20.0, init: float = 1.0) -> None:
        super().__init__()
        self.t_start, self.t_range = float(t_start), float(t_range)
        self.global_t = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, lambda_: float) -> Tensor:
        """The temperature, shape ``[1]``, float32; ``lambda_`` scales ``θ``'s gradient (see :func:`ctkd_lambda`)."""
        return self.t_start + self.t_range * torch.sigmoid(GradientReversal.apply(self.global_t, lambda_))


def ctkd_lambda(
    epoch: int, decay_max: float = 0.0, decay_min: float = -1.0, decay_loops: float = 10, cosine: bool = True
) -> float:
    """λ for 1-based ``epoch``: official ``CosineDecay`` (``cosine=True``) or ``LinearDecay`` (quirks kept)."""
    i = max(epoch, 0)
    if cosine:
        i = min(i, decay_loops)
        value = (math.cos(i * math.pi / decay_loops) + 1.0) * 0.5
        return value * (decay_max - decay_min) + decay_min
    if i >= decay_loops:
        i = decay_loops - 1
    return i * -((decay_max - decay_min) / decay_loops)


def _cast(logits_s: Tensor, logits_t: Tensor, temperature: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """Logits and τ (a 0-dim tensor) in float32, or float64 if the student's logits are float64."""
    dtype = torch.promote_types(logits_s.dtype, torch.float32)
    t = torch.as_tensor(temperature, device=logits_s.device).to(dtype).reshape(())
    return logits_s.to(dtype), logits_t.to(dtype), t


def kd_loss_learnable_t(logits_s: Tensor, logits_t: Tensor, temperature: Tensor | float) -> Tensor:
    """``τ² · (1/B) Σ_b KL(softmax(z_t/τ) ‖ softmax(z_s/τ))`` with a tensor ``τ`` (one element), differentiable.

    Equal to the official ``DistillKL`` in value; ``0·log 0 = 0`` with a finite gradient (module docstring).
    """
    z_s, z_t, t = _cast(logits_s, logits_t, temperature)
    log_p_s = F.log_softmax(z_s / t, dim=1)
    log_p_t = F.log_softmax(z_t / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum() / logits_s.shape[0]
    return kl * t * t


def _masked_kl_sum(p_t: Tensor, log_p_s: Tensor) -> Tensor:
    """``Σ p_t·(log p_t - log_p_s)`` over entries with ``p_t > 0`` (zero entries add 0 and get gradient 0)."""
    pos = p_t > 0
    log_p_t = torch.log(torch.where(pos, p_t, torch.ones_like(p_t)))
    return torch.where(pos, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t)).sum()


def dkd_loss_learnable_t(
    logits_s: Tensor, logits_t: Tensor, target: Tensor, alpha: float, beta: float, temperature: Tensor | float
) -> Tensor:
    """DKD of the CTKD repository at a tensor temperature: ``α·TCKD + β·NCKD`` (no CE, no warm-up).

    As official: binary probabilities ``[p_y, Σ_{c≠y} p_c]`` from the τ-softmax, the student's logged without a
    clamp; non-target distributions from ``z/τ - 1000·onehot(y)``; each KL summed over the batch, divided by
    ``B`` and multiplied by ``τ²``. Zero teacher entries contribute 0 with gradient 0 (PyTorch 1.11 semantics).
    """
    z_s, z_t, t = _cast(logits_s, logits_t, temperature)
    z_s, z_t = z_s / t, z_t / t
    gt = F.one_hot(target, z_s.shape[1]).to(z_s.dtype)
    p_s, p_t = F.softmax(z_s, dim=1), F.softmax(z_t, dim=1)
    b_s = torch.cat([(p_s * gt).sum(1, keepdim=True), (p_s * (1 - gt)).sum(1, keepdim=True)], dim=1)
    b_t = torch.cat([(p_t * gt).sum(1, keepdim=True), (p_t * (1 - gt)).sum(1, keepdim=True)], dim=1)
    batch = z_s.shape[0]
    tckd = _masked_kl_sum(b_t, torch.log(b_s)) * t**2 / batch
    q_t = F.softmax(z_t - 1000.0 * gt, dim=1)
    nckd = _masked_kl_sum(q_t, F.log_softmax(z_s - 1000.0 * gt, dim=1)) * t**2 / batch
    return alpha * tckd + beta * nckd


class CurriculumTemperature(Strategy):
    """What CTKD's strategies share: the temperature submodule, the λ curriculum, ``w_ce·CE``, and
    ``last_temperature`` / ``last_lambda``. Subclasses give the distillation term (:meth:`distill_terms`)."""

    def __init__(
        self, w_ce: float, t_start: float, t_range: float, decay_max: float, decay_min: float, decay_loops: int,
        cosine_decay: bool, teacher_transform=None, logit_transform=None,
    ) -> None:
        super().__init__(teacher_transform, logit_transform)
        if t_start < 0 or t_range <= 0:
            raise ConfigError(f"distill.t_start={t_start}, distill.t_range={t_range}: the temperature "
                              "t_start + t_range·σ(θ) must stay positive (t_start >= 0, t_range > 0).")
        if decay_loops <= 0:
            raise ConfigError(f"distill.decay_loops={decay_loops}: the λ curriculum needs at least one epoch.")
        self.w_ce = float(w_ce)
        self.decay = dict(decay_max=float(decay_max), decay_min=float(decay_min), decay_loops=decay_loops,
                          cosine=bool(cosine_decay))
        self.global_temperature = GlobalTemperature(t_start, t_range)
        self.last_temperature: Optional[Tensor] = None
        self.last_lambda: Optional[float] = None

    def temperature(self, epoch: int) -> Tensor:
        """τ for a step of the 1-based ``epoch`` (its gradient scaled by λ(epoch)); recorded as ``last_*``."""
        self.last_lambda = ctkd_lambda(epoch, **self.decay)
        tau = self.global_temperature(self.last_lambda)
        self.last_temperature = tau.detach().reshape(())
        return tau

    def distill_terms(self, z_s: Tensor, z_t: Tensor, target: Tensor, tau: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def logged_values(self) -> dict[str, Tensor | float]:
        if self.last_temperature is None:
            return {}
        return {"ctkd/temperature": self.last_temperature, "ctkd/lambda": float(self.last_lambda)}

    def loss_terms(self, student, teacher, batch, epoch):
        tau = self.temperature(epoch)
        z_s, z_t = self.transform_logits(student.logits, teacher.logits)
        z = student.logits
        ce = self.w_ce * F.cross_entropy(z.to(torch.promote_types(z.dtype, torch.float32)), batch.y)
        return {"ce": ce, **self.distill_terms(z_s, z_t, batch.y, tau)}


class CTKD(CurriculumTemperature):
    """CTKD + KD (``distill=ctkd``): ``w_ce·CE + w_kd·KD_τ``."""

    def __init__(
        self, w_ce: float = 0.1, w_kd: float = 0.9, t_start: float = 1.0, t_range: float = 20.0,
        decay_max: float = 0.0, decay_min: float = -1.0, decay_loops: int = 10, cosine_decay: bool = True,
        teacher_transform=None, logit_transform=None,
    ) -> None:
        super().__init__(w_ce, t_start, t_range, decay_max, decay_min, decay_loops, cosine_decay, teacher_transform,
                         logit_transform)
        self.w_kd = float(w_kd)

    def distill_terms(self, z_s: Tensor, z_t: Tensor, target: Tensor, tau: Tensor) -> dict[str, Tensor]:
        return {"kd": self.w_kd * kd_loss_learnable_t(z_s, z_t, tau)}


class CTKDDKD(CurriculumTemperature):
    """CTKD + DKD (``distill=ctkd_dkd``): ``w_ce·CE + w_dkd·(α·TCKD_τ + β·NCKD_τ)``, no warm-up."""

    def __init__(
        self, w_ce: float = 1.0, w_dkd: float = 1.0, alpha: float = 1.0, beta: float = 2.0, t_start: float = 1.0,
        t_range: float = 20.0, decay_max: float = 0.0, decay_min: float = -1.0, decay_loops: int = 10,
        cosine_decay: bool = True, teacher_transform=None, logit_transform=None,
    ) -> None:
        super().__init__(w_ce, t_start, t_range, decay_max, decay_min, decay_loops, cosine_decay, teacher_transform,
                         logit_transform)
        self.w_dkd, self.alpha, self.beta = float(w_dkd), float(alpha), float(beta)

    def distill_terms(self, z_s: Tensor, z_t: Tensor, target: Tensor, tau: Tensor) -> dict[str, Tensor]:
        return {"dkd": self.w_dkd * dkd_loss_learnable_t(z_s, z_t, target, self.alpha, self.beta, tau)}
