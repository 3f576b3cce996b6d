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
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.nkd import nkd_per_sample

_GRID = 4  # every scale is pooled from a 4×4 average-pooled grid, as in the official SPP module


def _float(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 logits under autocast are promoted; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def multi_scale_logits(
    feature_map: Tensor, classifier: Callable[[Tensor], Tensor], scales: Sequence[int] = (1, 2, 4)
) -> Tensor:
    """Region logits [B, K, N] of a feature map [B, C, H, W]; ``scales`` increasing, from {1, 2, 4}, first 1."""
    scales = tuple(int(s) for s in scales)
    if not scales or scales[0] != 1 or any(s not in (1, 2, 4) for s in scales) or list(scales) != sorted(set(scales)):
        raise ValueError(f"scales={scales!r}: need increasing values from (1, 2, 4) starting with 1 (the global cell)")
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
