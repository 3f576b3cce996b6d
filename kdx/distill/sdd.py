"""SDD, scale decoupled distillation (Wei et al., CVPR 2024): logit losses on multi-scale region logits.

**Region logits** (:func:`multi_scale_logits`): the final feature map [B, C, H, W] (the one the model
global-pools for its classifier) is average-pooled to a 4×4 grid (``AdaptiveAvgPool2d(4)``); each
scale s of M is then ``AdaptiveAvgPool2d(s)`` OF THAT 4×4 GRID (not of the map: for H, W not multiples
of 4 this differs from pooling the map directly; a 2×2 map is up-sampled, its 4×4 cells repeating
pixels). Cells are flattened row-major, scales concatenated in the order of M (the global cell first),
and every cell goes through the model's own classifier: logits [B, K, N], N = Σ s² (1, 5 or 21).

**Losses** (region logits [B, K, N] of student and teacher, target [B] int64): the logits are
flattened region-major to [N·B, K] (row ``n·B + b``), the targets repeated N times, and the base loss
is taken per row. Each row gets a weight from the TEACHER's argmax: rows whose correctness
(argmax == y) differs from that of the sample's global row are "complementary" (weight 2), the others
"consistent" (weight 1); global rows always weigh 1. Then

- SDD-KD: ``Σ_r w_r·T²·KL_r / (N·B)`` (element-wise KL; NaN elements set to 0),
- SDD-DKD: ``Σ_r w_r·(α·TCKD_r + β·NCKD_r) / (N·B)``, TCKD/NCKD as in DKD (T², -1000 target mask
  after /T, student binary probabilities logged without clamp),
- SDD-NKD: ``Σ_r w_r·NKD_r / (N·B)``, where the official per-row NKD keeps the target class in its
  "non-target" term (``scatter_(1, label, 1)``); ``fix_non_target_mask=True`` removes it as in NKD.

A non-finite total is replaced by a constant 0 (no gradient), as in the official code. With M = [1]
(N = 1) each loss is its base loss on the global logits; the official distillers then call the
base loss on the model's ordinary logits (equal for maps whose size is a multiple of 4).

Official source: shicaiwei123/SDD-CVPR2024: ``mdistiller/models/cifar/utils.py`` (``SPP``), the
``*_sdd`` models (e.g. ``mdistiller/models/cifar/resnet.py`` ``ResNet_SDD.forward``),
``mdistiller/distillers/KD.py`` (``sdd_kd_loss``, ``SDD_KD``), ``SDD_DKD.py`` (``multi_dkd``),
``SDD_nkd.py`` (``multi_nkd_loss``); run as ``train_origin.py --cfg <cfg> --M [1,2,4]``.

Feature map per CIFAR model (32×32 input): resnet8x4/32x4/20/56/110 ``layer3`` output (8×8), WRN
``relu(bn1(block3))`` (8×8), VGG ``relu(block4)`` (4×4), ResNet50 ``layer4`` (4×4), ShuffleV1
``layer3`` (4×4), ShuffleV2 ``relu(bn2(conv2))`` (4×4), MobileNetV2 ``conv2`` (2×2); the classifier
is the model's fc/linear/classifier. Teacher and student both produce region logits (same M).

Official CIFAR-100 settings (mdistiller solver: batch 64, 240 epochs, ×0.1 at 150/180/210, wd 5e-4,
LR 0.05, 0.01 for MobileNetV2/ShuffleNet students; CE on the ordinary logits):
SDD-KD: T = 4, CE 0.1, KD 0.9, no warm-up. SDD-DKD: CE 1, α 1, β 8 (6 for vgg13/*, wrn40_2/mv2,
wrn40_2/wrn_*; 2 for res56/res20, res110/res32), T 4, linear warm-up over 20 epochs (``--warmup``).
SDD-NKD: reads the DKD config, so T = ``DKD.T`` = 4, γ = ``DKD.BETA`` (8, or the pair's 6/2 as for
DKD), CE 1, warm-up ``DKD.WARMUP`` = 20. M per pair (run scripts ``teacher_*.sh``): [1,2] for
vgg13→vgg8 (all three), resnet32x4→resnet8x4 (SDD-KD, SDD-NKD), ResNet50→vgg8 and wrn40_2→vgg8
(SDD-NKD); vgg13→MobileNetV2 SDD-NKD was run with both; [1,2,4] for the other listed pairs.

Strategies (``distill=sdd_kd`` :class:`SDDKD`, ``sdd_dkd`` :class:`SDDDKD`, ``sdd_nkd`` :class:`SDDNKD`): both
networks' ``final_map`` tap through their own classifier (``needs_head``; the teacher's without gradient), CE on
the ordinary student logits, and the weighted SDD term, logged as ``ce`` and ``kd`` / ``dkd`` / ``nkd``
(SDD-DKD/NKD: times ``min(e/warmup, 1)``). ``scales`` is M. With ``scales=[1]`` the official distillers
(``M == '[1]'``) take the base loss on the ordinary logits instead (KD, DKD, or SDD's NKD with its mask quirk,
without the non-finite fallback); so do these.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.base import Strategy, warmup_factor
from kdx.distill.losses import dkd_loss, kd_loss
from kdx.distill.nkd import nkd_per_sample
from kdx.errors import ConfigError

_GRID = 4  # every scale is pooled from a 4×4 average-pooled grid, as in the official SPP module


def _float(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 logits under autocast are promoted; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_scales(scales: Sequence[int], setting: str = "scales") -> tuple[int, ...]:
    """``scales`` as a tuple of ints: increasing values from {1, 2, 4}, the first 1 (else ValueError naming it)."""
    scales = tuple(int(s) for s in scales)
    if not scales or scales[0] != 1 or any(s not in (1, 2, 4) for s in scales) or list(scales) != sorted(set(scales)):
        raise ValueError(f"{setting}={list(scales)}: need increasing values from (1, 2, 4) starting with 1 (the "
                         "global cell), e.g. [1, 2, 4] or [1, 2]")
    return scales


def multi_scale_logits(
    feature_map: Tensor, classifier: Callable[[Tensor], Tensor], scales: Sequence[int] = (1, 2, 4)
) -> Tensor:
    """Region logits [B, K, N] of a feature map [B, C, H, W]; ``scales`` increasing, from {1, 2, 4}, first 1."""
    scales = check_scales(scales)
    grid = F.adaptive_avg_pool2d(feature_map, _GRID)
    regions = torch.cat([F.adaptive_avg_pool2d(grid, s).flatten(2) for s in scales], dim=2)  # [B, C, N]
    b, c, n = regions.shape
    logits = classifier(regions.permute(2, 0, 1).reshape(n * b, c))
    return logits.reshape(n, b, -1).permute(1, 2, 0)


def _rows(multi_logits: Tensor) -> Tensor:
    """[B, K, N] → [N·B, K], region-major (row n·B + b), float32 at least."""
    b, k, n = multi_logits.shape
    return _float(multi_logits).permute(2, 0, 1).reshape(n * b, k)


def region_weights(logits_teacher_multi: Tensor, target: Tensor, complementary_weight: float = 2.0) -> Tensor:
    """Per-row SDD weights [N·B]: ``complementary_weight`` where the teacher's region correctness
    differs from its global correctness, 1 elsewhere (global rows: 1)."""
    n = logits_teacher_multi.shape[2]
    correct = _rows(logits_teacher_multi).argmax(dim=1) == target.repeat(n)
    complementary = correct != correct[: target.shape[0]].repeat(n)
    ones = torch.ones_like(correct, dtype=torch.float32)
    return torch.where(complementary, ones * complementary_weight, ones)


def _finite_or_zero(loss: Tensor) -> Tensor:
    """The official fallback: a non-finite loss becomes a constant 0 (host sync, as official)."""
    return loss if bool(torch.isfinite(loss)) else torch.zeros((), dtype=loss.dtype, device=loss.device)


def sdd_kd_loss(
    logits_student_multi: Tensor, logits_teacher_multi: Tensor, target: Tensor, temperature: float = 4.0
) -> Tensor:
    """SDD-KD: weighted ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` over the N·B region rows, / (N·B)."""
    s, t = _rows(logits_student_multi), _rows(logits_teacher_multi)
    kl = F.kl_div(F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1), reduction="none")
    kl = torch.where(torch.isnan(kl), torch.zeros_like(kl), kl * temperature**2).sum(dim=1)
    w = region_weights(logits_teacher_multi, target).to(kl.dtype)
    return _finite_or_zero((kl * w).sum() / kl.shape[0])


def _dkd_rows(s: Tensor, t: Tensor, target: Tensor, alpha: float, beta: float, temperature: float) -> Tensor:
    """Per-row ``α·TCKD + β·NCKD`` with T² (no batch division), official DKD arithmetic."""
    mask = F.one_hot(target, s.shape[1]).to(s.dtype)
    p_s, p_t = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    b_s = torch.stack([(p_s * mask).sum(1), (p_s * (1 - mask)).sum(1)], dim=1)
    b_t = torch.stack([(p_t * mask).sum(1), (p_t * (1 - mask)).sum(1)], dim=1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="none").sum(1)
    log_q_s = F.log_softmax(s / temperature - 1000.0 * mask, dim=1)
    q_t = F.softmax(t / temperature - 1000.0 * mask, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="none").sum(1)
    return (alpha * tckd + beta * nckd) * temperature**2


def sdd_dkd_loss(
    logits_student_multi: Tensor,
    logits_teacher_multi: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """SDD-DKD: weighted per-row DKD over the N·B region rows, / (N·B) (no CE, no warm-up)."""
    n = logits_student_multi.shape[2]
    rows = _dkd_rows(_rows(logits_student_multi), _rows(logits_teacher_multi), target.repeat(n), alpha, beta,
                     temperature)
    w = region_weights(logits_teacher_multi, target).to(rows.dtype)
    return _finite_or_zero((rows * w).sum() / rows.shape[0])


def sdd_nkd_loss(
    logits_student_multi: Tensor,
    logits_teacher_multi: Tensor,
    target: Tensor,
    temperature: float = 4.0,
    gamma: float = 8.0,
    fix_non_target_mask: bool = False,
) -> Tensor:
    """SDD-NKD: weighted per-row NKD over the N·B region rows, / (N·B) (no CE, no warm-up).

    Defaults T = 4, γ = 8 are what the official CIFAR configs give (``DKD.T``, ``DKD.BETA``).
    """
    n = logits_student_multi.shape[2]
    rows = nkd_per_sample(_rows(logits_student_multi), _rows(logits_teacher_multi), target.repeat(n),
                          temperature, gamma, drop_target=fix_non_target_mask)
    w = region_weights(logits_teacher_multi, target).to(rows.dtype)
    return _finite_or_zero((rows * w).sum() / rows.shape[0])


class _SDD(Strategy):
    """What the SDD strategies share: region logits of both networks and the CE on the ordinary logits."""

    student_taps = ("final_map",)
    teacher_taps = ("final_map",)
    needs_head = True

    def __init__(self, scales: Sequence[int], temperature: float, w_ce: float) -> None:
        super().__init__()
        try:
            self.scales = check_scales(scales, "distill.scales")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not temperature > 0:
            raise ConfigError(f"distill.temperature={temperature}: the temperature must be > 0.")
        self.temperature, self.w_ce = temperature, w_ce

    @property
    def global_only(self) -> bool:
        """M = [1]: the official distillers then use the base loss on the ordinary logits."""
        return self.scales == (1,)

    def inputs(self, student, teacher) -> tuple[Tensor, Tensor]:
        """Region logits [B, K, N] of student and teacher, or the ordinary logits [B, K] when M = [1]."""
        if self.global_only:
            return _float(student.logits), _float(teacher.logits)
        s = multi_scale_logits(student.taps["final_map"][0], student.head, self.scales)
        with torch.no_grad():
            t = multi_scale_logits(teacher.taps["final_map"][0], teacher.head, self.scales)
        return s, t

    def ce(self, student, batch) -> Tensor:
        return self.w_ce * F.cross_entropy(_float(student.logits), batch.y)


class SDDKD(_SDD):
    """SDD-KD: ``w_ce·CE + w_kd·SDD-KD(T)``; official T 4, CE 0.1, KD 0.9, no warm-up."""

    def __init__(
        self, temperature: float = 4.0, w_ce: float = 0.1, w_kd: float = 0.9, scales: Sequence[int] = (1, 2, 4)
    ) -> None:
        super().__init__(scales, temperature, w_ce)
        self.w_kd = w_kd

    def loss_terms(self, student, teacher, batch, epoch):
        s, t = self.inputs(student, teacher)
        loss = kd_loss(s, t, self.temperature) if self.global_only else sdd_kd_loss(s, t, batch.y, self.temperature)
        return {"ce": self.ce(student, batch), "kd": self.w_kd * loss}


class SDDDKD(_SDD):
    """SDD-DKD: ``w_ce·CE + min(e/W, 1)·SDD-DKD(α, β, T)``; official CE 1, α 1, β 8 (per pair), T 4, W 20."""

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, w_ce: float = 1.0, warmup: int = 20,
        scales: Sequence[int] = (1, 2, 4),
    ) -> None:
        super().__init__(scales, temperature, w_ce)
        self.alpha, self.beta, self.warmup = alpha, beta, warmup

    def loss_terms(self, student, teacher, batch, epoch):
        s, t = self.inputs(student, teacher)
        fn = dkd_loss if self.global_only else sdd_dkd_loss
        loss = fn(s, t, batch.y, self.alpha, self.beta, self.temperature)
        return {"ce": self.ce(student, batch), "dkd": warmup_factor(epoch, self.warmup) * loss}


class SDDNKD(_SDD):
    """SDD-NKD: ``w_ce·CE + min(e/W, 1)·SDD-NKD(T, γ)``; official CE 1, T 4, γ 8 (DKD's β, per pair), W 20."""

    def __init__(
        self, temperature: float = 4.0, gamma: float = 8.0, w_ce: float = 1.0, warmup: int = 20,
        scales: Sequence[int] = (1, 2, 4), fix_non_target_mask: bool = False,
    ) -> None:
        super().__init__(scales, temperature, w_ce)
        self.gamma, self.warmup, self.fix_non_target_mask = gamma, warmup, bool(fix_non_target_mask)

    def loss_terms(self, student, teacher, batch, epoch):
        s, t = self.inputs(student, teacher)
        if self.global_only:
            loss = nkd_per_sample(s, t, batch.y, self.temperature, self.gamma, self.fix_non_target_mask).mean()
        else:
            loss = sdd_nkd_loss(s, t, batch.y, self.temperature, self.gamma, self.fix_non_target_mask)
        return {"ce": self.ce(student, batch), "nkd": warmup_factor(epoch, self.warmup) * loss}
