"""KD-SVD: self-supervised KD with singular value decomposition (Lee et al., ECCV 2018), as in mdistiller.

Official source: ``megvii-research/mdistiller``, ``mdistiller/distillers/KDSVD.py`` (``kdsvd_loss``, ``svd``,
``removenan``, ``align_rsv``), a port of ``HobbitLong/RepDistiller`` ``distiller_zoo/KDSVD.py``, itself a port
of the authors' TensorFlow ``sseung0703/SSKD_SVD`` (``nets/Distillation.py``). Written anew here.

Per stage ``i`` (maps [B, C, H, W]):

1. reshape each map to a matrix ``X`` (see the layout quirk), take its thin SVD ``X = U·diag(σ)·Vᵀ``, set
   non-finite entries of ``σ`` and ``V`` to 0, keep the first ``n`` right singular vectors and singular values,
   and L2-normalise the kept columns of ``V`` and the kept vector ``σ[:n]``; the teacher keeps ``n = k``,
   the student ``n = k + 3``;
2. align the student to the teacher: for each teacher vector ``j`` take the student vector(s) with the
   largest ``|cos|`` and multiply by the sign of that cosine (``v_s ← V_s·M``, ``M ∈ {0, ±1}``);
3. scale both by the teacher's normalised singular values: ``v_t ← v_t·σ_t``, ``v_s ← v_s·σ_t``;
4. for consecutive stages ``(i−1, i)``: ``R[b, w, w', j] = exp(−(v_i[b, w, j] − v_{i−1}[b, w', j])² / 8)``
   and the stage-pair loss is ``Σ (R_s − R_t.detach())²`` (non-finite entries set to 0).

``L = Σ_pairs (pair loss / B)``. With fewer than two stages the loss is 0.

Quirks kept from the official code (the defaults) and switches:

- **layout** (``fix_layout=False``): mdistiller reshapes NCHW maps with ``view(B, C·H, W)``, so the right
  singular vectors live along the *width* (dimension ``W``); this is a port slip — RepDistiller and the
  TF original (NHWC) decompose the [B, H·W, C] matrix, whose right singular vectors are over the *channels*.
  ``fix_layout=True`` uses [B, H·W, C] (equal to RepDistiller's ``KDSVD``; then student and teacher need the
  same channel counts at each stage, as with mdistiller's default they need the same widths);
- **sign**: singular vectors are defined up to sign. The student's is resolved by the alignment (step 2
  uses the sign of the cosine), but the teacher's is not: flipping one stage's teacher vector changes
  ``(v_i − v_{i−1})²`` and thus the loss, so its value depends on the SVD backend's sign choice (LAPACK on
  CPU vs cuSOLVER/MAGMA on GPU may differ; ``v_s`` follows the teacher, so the gradient does too). For
  post-ReLU maps the leading vector has entries of one sign; MKL (torch 2.14 CPU) was seen to return it
  all-negative for tall matrices and all-positive for wide ones, so even one backend mixes signs when the
  stages' matrix shapes differ in kind (e.g. with ``fix_layout`` and more channels than positions).
  ``fix_sign=True`` makes it backend-independent: each teacher vector is flipped so that its entry of
  largest magnitude is positive (sklearn's ``svd_flip`` rule), before the alignment;
- the student's own singular values are unused (both sides are scaled by the teacher's); for ``k = 1``
  the normalised ``σ_t[:1]`` is 1, so step 3 is a no-op; ties in step 2 add the tied vectors;
- the official ``svd`` casts to float32 (``.float()``); here inputs are promoted to at least float32, so
  float64 stays float64 (used by the gradcheck tests); the thin SVD is ``torch.linalg.svd`` (the official
  ``torch.svd`` is a deprecated alias of it).

Computed with autocast off.

Official CIFAR-100 setting (``mdistiller/engine/cfg.py`` + ``configs/cifar100/kdsvd.yaml``):
``loss = 1.0·CE + 1.0·kdsvd_loss(feats_s[1:], feats_t[1:], k=1)`` (the post-ReLU residual-stage maps, stem
skipped; RepDistiller: ``feat[1:-1]``, no shipped weight); no KD term, no warm-up; resnet32x4 → resnet8x4,
240 epochs, SGD lr 0.05 (×0.1 at 150/180/210), momentum 0.9, wd 5e-4, batch 64.

``distill=kdsvd`` (:class:`KDSVD`): ``w_ce·CE + w_kdsvd·kdsvd_loss(feats_s[1:], feats_t[1:], k, fix_layout,
fix_sign)`` (terms ``ce``, ``kdsvd``); the stage lists are zipped as in mdistiller, so extra stages of the network
with more are dropped. Step 2 compares student and teacher vectors, so each paired stage needs equal widths ``W``
(equal channel counts ``C`` with ``fix_layout``): where they differ the official code fails with a matmul shape
error, and kdx stops at build with a :class:`~kdx.errors.ConfigError` (e.g. resnet32x4 → ShuffleV1, whose stage
maps are half the size).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.feature_kd import FeatureKD, chw, positive_int
from kdx.errors import ConfigError


def finite_or_zero(x: Tensor) -> Tensor:
    """``x`` with NaN/±inf entries replaced by 0."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def feature_matrix(feat: Tensor, fix_layout: bool = False) -> Tensor:
    """The matrix decomposed per sample: [B, C·H, W] (mdistiller) or [B, H·W, C] (``fix_layout``)."""
    b, c, h, w = feat.shape
    if fix_layout:
        return feat.reshape(b, c, h * w).transpose(1, 2)
    return feat.reshape(b, c * h, w)


def truncated_svd(x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(σ, V)`` of ``x`` [B, M, N]: the first ``n`` singular values [B, n] and right vectors [B, N, n],
    non-finite entries zeroed, ``σ[:n]`` and each kept column of ``V`` L2-normalised."""
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    s, v = finite_or_zero(s), finite_or_zero(vh.transpose(-2, -1))
    return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


def canonical_sign(v: Tensor) -> Tensor:
    """Flip each column of ``v`` [B, N, n] so that its entry of largest magnitude is positive."""
    peak = torch.gather(v, 1, v.abs().argmax(dim=1, keepdim=True))
    return v * torch.where(peak < 0, -1.0, 1.0).to(v.dtype)


def align_rsv(a: Tensor, b: Tensor) -> Tensor:
    """``a`` [B, N, n_a] recombined to [B, N, n_b]: per column of ``b``, the best-|cos| column(s) of ``a``,
    signed so that the cosine is positive."""
    cosine = a.transpose(-2, -1) @ b
    best = cosine.abs().amax(dim=1, keepdim=True)
    mask = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return a @ mask


def kdsvd_loss(
    g_s: Sequence[Tensor], g_t: Sequence[Tensor], k: int = 1, fix_layout: bool = False, fix_sign: bool = False
) -> Tensor:
    """RBF matching of the teacher-aligned leading right singular vectors of consecutive stages."""
    with torch.autocast(device_type=g_s[0].device.type, enabled=False):
        losses, prev = [], None
        for f_s, f_t in zip(g_s, g_t):
            f_s = f_s.to(torch.promote_types(f_s.dtype, torch.float32))
            f_t = f_t.to(torch.promote_types(f_t.dtype, torch.float32))
            s_t, v_t = truncated_svd(feature_matrix(f_t, fix_layout), k)
            _, v_s = truncated_svd(feature_matrix(f_s, fix_layout), k + 3)
            if fix_sign:
                v_t = canonical_sign(v_t)
            v_s = align_rsv(v_s, v_t)
            v_t, v_s = v_t * s_t.unsqueeze(1), v_s * s_t.unsqueeze(1)
            if prev is not None:
                rbf_s = torch.exp(-(v_s.unsqueeze(2) - prev[0].unsqueeze(1)).pow(2) / 8)
                rbf_t = torch.exp(-(v_t.unsqueeze(2) - prev[1].unsqueeze(1)).pow(2) / 8)
                losses.append(finite_or_zero((rbf_s - rbf_t.detach()).pow(2)).sum())
            prev = (v_s, v_t)
        bsz = g_s[0].shape[0]
        return sum(loss / bsz for loss in losses)


class KDSVD(FeatureKD):
    """``distill=kdsvd``: ``w_ce·CE + w_kdsvd·kdsvd_loss(feats_s[1:], feats_t[1:], k, fix_layout, fix_sign)``."""

    student_taps = teacher_taps = ("feats",)
    term = "kdsvd"

    def __init__(self, w_ce: float = 1.0, w_kdsvd: float = 1.0, k: int = 1, fix_layout: bool = False,
                 fix_sign: bool = False) -> None:
        super().__init__(w_ce, w_kdsvd)
        self.k = positive_int(k, "k")
        self.fix_layout, self.fix_sign = bool(fix_layout), bool(fix_sign)

    def build_feature_modules(self, teacher_shapes, student_shapes) -> None:
        """Refuse paired stages whose decomposed dimension differs (the official code fails there)."""
        dim, name = (0, "channel counts C") if self.fix_layout else (2, "widths W")
        pairs = zip(student_shapes["feats"][1:], teacher_shapes["feats"][1:])
        for i, (s, t) in enumerate(pairs, start=1):
            if chw(s)[dim] != chw(t)[dim]:
                raise ConfigError(
                    f"distill=kdsvd (fix_layout={self.fix_layout}) aligns the student's and the teacher's singular "
                    f"vectors at every paired stage, which needs equal {name}, but feats[{i}] is C×H×W={chw(s)} for "
                    f"the student (model) and {chw(t)} for the teacher (teacher.model); the official KD-SVD fails "
                    "there too. Choose a pair with equal stage sizes, other taps (model.taps.feats / "
                    "teacher.model.taps.feats), or another method."
                )

    def feature_loss(self, student, teacher):
        return kdsvd_loss(student["feats"][1:], teacher["feats"][1:], self.k, self.fix_layout, self.fix_sign)
