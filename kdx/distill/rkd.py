"""RKD: relational KD, distance + angle (Park et al., CVPR 2019), as in mdistiller.

Official source: ``megvii-research/mdistiller``, ``mdistiller/distillers/RKD.py`` (``rkd_loss``, ``_pdist``),
equal to ``HobbitLong/RepDistiller`` ``distiller_zoo/RKD.py`` (``RKDLoss``; there ``eps``/``squared`` are
fixed at 1e-12/False), after the authors' ``lenscloth/RKD``. Written anew here.

Features are flattened to [B, D]. Distances: ``d_ij = sqrt(max(‖e_i‖² + ‖e_j‖² − 2⟨e_i, e_j⟩, eps))``
(no sqrt if ``squared``), diagonal set to 0, then divided by their mean over the entries ``> 0``.
Angles: ``A_ijk = ⟨n(e_j − e_i), n(e_k − e_i)⟩`` with ``n`` = ``F.normalize`` (eps 1e-12, so
``n(0) = 0``) over all B³ ordered triplets. ``L = w_d·smoothL1(d_s, d_t) + w_a·smoothL1(A_s, A_t)``
(``F.smooth_l1_loss``, β = 1, mean over B² resp. B³ entries).

Quirks kept from the official code: the teacher's terms are computed under ``no_grad``; the student's
mean distance is *not* detached (the gradient flows through the normalisation); the clamp at ``eps``
happens on the squared distance, so off-diagonal zero distances become ``sqrt(eps)`` = 1e-6 and are then
counted in the mean; the angle mean includes the degenerate triplets (``j = i`` or ``k = i`` give 0,
``j = k`` gives 1) that are equal for student and teacher and dilute the loss. Invariant to a global
positive scale of either input (up to the ``eps`` clamp).

Computed with autocast off, in at least float32 (bf16/fp16 inputs are promoted; float64 stays).

Official CIFAR-100 setting (``mdistiller/engine/cfg.py`` + ``configs/cifar100/rkd.yaml``):
``loss = 1.0·CE + 1.0·rkd_loss(pooled_s, pooled_t, squared=False, eps=1e-12, distance_weight=25,
angle_weight=50)`` with ``pooled_feat`` the globally average-pooled last map [B, C] (RepDistiller:
``feat[-1]``); no KD term, no warm-up; resnet32x4 → resnet8x4, 240 epochs, SGD lr 0.05 (×0.1 at
150/180/210), momentum 0.9, wd 5e-4, batch 64.

``distill=rkd`` (:class:`RKD`): ``w_ce·CE + w_rkd·rkd_loss(pooled_s, pooled_t, squared, eps, distance_weight,
angle_weight)`` (terms ``ce``, ``rkd``), the ``pooled_feat`` tap of each network (its widths may differ).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.feature_kd import FeatureKD


def pairwise_distance(e: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """[B, B] Euclidean distances of rows of ``e`` [B, D] (clamped at ``eps`` before the sqrt, diagonal 0)."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (e @ e.t())).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    return d.masked_fill(torch.eye(len(e), dtype=torch.bool, device=e.device), 0.0)


def mean_normalised_distance(e: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """Pairwise distances divided by the mean of their positive entries."""
    d = pairwise_distance(e, squared, eps)
    return d / d[d > 0].mean()


def rkd_angles(e: Tensor) -> Tensor:
    """Flat [B³] cosines ``⟨n(e_j − e_i), n(e_k − e_i)⟩`` in ``(i, j, k)`` row-major order."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_loss(
    f_s: Tensor,
    f_t: Tensor,
    squared: bool = False,
    eps: float = 1e-12,
    distance_weight: float = 25,
    angle_weight: float = 50,
) -> Tensor:
    """``w_d·smoothL1(d̂_s, d̂_t) + w_a·smoothL1(A_s, A_t)`` of features [B, ...] (teacher terms without grad)."""
    with torch.autocast(device_type=f_s.device.type, enabled=False):
        stu = f_s.reshape(f_s.shape[0], -1).to(torch.promote_types(f_s.dtype, torch.float32))
        tea = f_t.reshape(f_t.shape[0], -1).to(torch.promote_types(f_t.dtype, torch.float32))
        with torch.no_grad():
            d_t = mean_normalised_distance(tea, squared, eps)
            a_t = rkd_angles(tea)
        loss_d = F.smooth_l1_loss(mean_normalised_distance(stu, squared, eps), d_t)
        loss_a = F.smooth_l1_loss(rkd_angles(stu), a_t)
        return distance_weight * loss_d + angle_weight * loss_a


class RKD(FeatureKD):
    """``distill=rkd``: ``w_ce·CE + w_rkd·rkd_loss(pooled_s, pooled_t, ...)`` (mdistiller ``cfg.RKD``)."""

    student_taps = teacher_taps = ("pooled_feat",)
    term = "rkd"

    def __init__(self, w_ce: float = 1.0, w_rkd: float = 1.0, distance_weight: float = 25.0,
                 angle_weight: float = 50.0, squared: bool = False, eps: float = 1e-12) -> None:
        super().__init__(w_ce, w_rkd)
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)
        self.squared, self.eps = bool(squared), float(eps)

    def feature_loss(self, student, teacher):
        return rkd_loss(student["pooled_feat"][0], teacher["pooled_feat"][0], self.squared, self.eps,
                        self.distance_weight, self.angle_weight)
