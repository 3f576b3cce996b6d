"""TopKD, top-scaled KD (Wang & Zhou, arXiv 2508.04539), docs/methods.md#topkd — **our reading**.

No official code exists and the method section (with the appendix algorithm for the scaling
weights) could not be read; every formula below that no source settles (docs/methods.md#topkd) is a
knob with its stated default.

- **TSM** (:func:`top_k_scale`, :class:`TopKScale`): with ``I`` the K largest teacher logits of a
  sample (rank r = 1..K, r = 1 the largest), ``z'_i = w_r·z_i + Δ`` for ``i ∈ I``, where
  ``w_r = 1 + γ·(K − r + 1)/K`` and ``Δ = λ·(mean_{i∈I} z_i − mean_{i∉I} z_i)`` (``Δ = 0`` when
  K = C, the non-top-K set being empty). Bias correction (``gt_correction``): when the teacher is
  wrong (``argmax z ≠ y``) the ground-truth logit gets ``z'_y = w_gt·z_y + Δ`` with
  ``w_gt = gt_weight`` (null: ``1 + γ``, the rank-1 weight), in or out of the top K. Every other
  logit is unchanged.
- **L_con** (:func:`contrastive_loss`): ``S = ẑ_s·ẑ_tᵀ/τ`` (rows L2-normalised when
  ``con_normalize``), ``½[CE(S, arange B) + CE(Sᵀ, arange B)]``.
- **L_TDL** (:func:`top_k_decoupled_loss`): the classes of each sample are split by the teacher
  logits into Positive-top-K (the K largest), Negative-top-K (the K smallest of the rest) and
  Non-top-K (the rest); ``L = mean_b[α(1 − cos_pos) + β(1 − cos_neg) + w_non(1 − cos_non)]`` with
  ``cos_G`` the cosine of the student's and the teacher's sub-vectors on G. The secondary source
  writes ``1 − mean_b[α cos_pos + β cos_neg + cos_non]``; that has exactly the same gradients
  (it differs by the constant α + β) but is not zero at agreement, so we use the distance form.
  An empty group counts as agreement (its term is 0). ``tdl_sign_split`` keeps only positive
  logits in Positive-top-K and only negative ones in Negative-top-K (the others go to Non-top-K).
- **Total** (:func:`topkd_loss`): ``w_ce·CE + λ_con·L_con + λ_tdl·L_TDL``; ``con_teacher`` and
  ``tdl_teacher`` choose whether the scaled (default) or the raw teacher logits feed each term.

Used alone, the TSM is a teacher transform for any logit loss:
``distill=kd distill/teacher_transform=topk_scale`` (also ``dkd``, ``kd_crd``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.base import Strategy

TEACHER_INPUTS = ("scaled", "raw")


def _float(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 logits under autocast are promoted; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_k(k: int, num_classes: int, setting: str) -> int:
    if isinstance(k, bool) or int(k) != k or not 1 <= int(k) <= num_classes:
        raise ValueError(f"{setting}={k!r}: K must be an integer in [1, {num_classes}] (the number of classes).")
    return int(k)


def top_k_scale(
    logits_teacher: Tensor,
    target: Tensor,
    k: int,
    gamma: float = 0.5,
    lam: float = 0.1,
    gt_correction: bool = True,
    gt_weight: Optional[float] = None,
    setting: str = "distill.k",
) -> Tensor:
    """The Top-K Scaling Module: scaled teacher logits ``z'`` of the same shape ``[B, C]``."""
    z = logits_teacher
    b, c = z.shape
    k = _check_k(k, c, setting)
    _, top = z.topk(k, dim=1)  # sorted: column r-1 holds rank r
    ranks = torch.arange(1, k + 1, device=z.device, dtype=z.dtype)
    w_rank = 1.0 + gamma * (k - ranks + 1) / k
    weight = torch.ones_like(z).scatter(1, top, w_rank.expand(b, k))
    in_top = torch.zeros(b, c, dtype=torch.bool, device=z.device).scatter(1, top, True)
    if k < c:
        top_f = in_top.to(z.dtype)
        gap = (z * top_f).sum(1, keepdim=True) / k - (z * (1 - top_f)).sum(1, keepdim=True) / (c - k)
    else:
        gap = torch.zeros(b, 1, dtype=z.dtype, device=z.device)
    delta = lam * gap
    scaled = in_top
    if gt_correction:
        wrong = z.argmax(dim=1) != target
        gt = F.one_hot(target, c).bool() & wrong.unsqueeze(1)
        w_gt = 1.0 + gamma if gt_weight is None else float(gt_weight)
        weight = torch.where(gt, torch.full_like(weight, w_gt), weight)
        scaled = scaled | gt
    return torch.where(scaled, weight * z + delta, z)


class TopKScale:
    """The TSM as a teacher transform ``(logits_teacher, target) -> logits`` (``distill.teacher_transform``)."""

    def __init__(
        self, k: int = 5, gamma: float = 0.5, lam: float = 0.1, gt_correction: bool = True,
        gt_weight: Optional[float] = None,
    ) -> None:
        if isinstance(k, bool) or int(k) != k or int(k) < 1:
            raise ValueError(f"distill.teacher_transform.k={k!r}: K must be a positive integer.")
        self.k, self.gamma, self.lam = int(k), float(gamma), float(lam)
        self.gt_correction, self.gt_weight = bool(gt_correction), gt_weight

    def __call__(self, logits_teacher: Tensor, target: Tensor) -> Tensor:
        return top_k_scale(logits_teacher, target, self.k, self.gamma, self.lam, self.gt_correction,
                           self.gt_weight, setting="distill.teacher_transform.k")

    def __repr__(self) -> str:
        return (f"TopKScale(k={self.k}, gamma={self.gamma}, lam={self.lam}, gt_correction={self.gt_correction}, "
                f"gt_weight={self.gt_weight})")


def contrastive_loss(logits_student: Tensor, logits_teacher: Tensor, tau: float = 0.1, normalize: bool = True) -> Tensor:
    """Instance-level contrastive loss: positives on the diagonal of ``S = z_s·z_tᵀ/τ`` (both directions)."""
    a, t = _float(logits_student), _float(logits_teacher)
    if normalize:
        a, t = F.normalize(a, dim=1), F.normalize(t, dim=1)
    sim = a @ t.T / tau
    labels = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels))


def tdl_groups(logits_teacher: Tensor, k: int, sign_split: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Boolean masks ``[B, C]`` (positive-top-K, negative-top-K, non-top-K), disjoint and covering."""
    z = logits_teacher
    b, c = z.shape
    k = _check_k(k, c, "distill.k")
    pos = torch.zeros(b, c, dtype=torch.bool, device=z.device).scatter(1, z.topk(k, dim=1).indices, True)
    k_neg = min(k, c - k)
    neg = torch.zeros_like(pos)
    if k_neg > 0:
        rest = z.detach().masked_fill(pos, float("inf"))
        neg = neg.scatter(1, rest.topk(k_neg, dim=1, largest=False).indices, True)
    if sign_split:
        pos, neg = pos & (z > 0), neg & (z < 0)
    return pos, neg, ~(pos | neg)


def _masked_cos(a: Tensor, t: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-row cosine of ``a`` and ``t`` restricted to ``mask``; 1 for an empty row."""
    m = mask.to(a.dtype)
    num = (a * t * m).sum(1)
    den = ((a * a * m).sum(1) * (t * t * m).sum(1)).clamp_min(eps * eps).sqrt()
    return torch.where(mask.any(1), num / den, torch.ones_like(num))


def top_k_decoupled_loss(
    logits_student: Tensor,
    logits_teacher: Tensor,
    k: int,
    alpha: float = 1.0,
    beta: float = 1.0,
    w_non: float = 1.0,
    sign_split: bool = False,
) -> Tensor:
    """``mean_b[α(1−cos_pos) + β(1−cos_neg) + w_non(1−cos_non)]``, groups from the teacher logits."""
    a, t = _float(logits_student), _float(logits_teacher)
    pos, neg, non = tdl_groups(t, k, sign_split)
    per_sample = (
        alpha * (1 - _masked_cos(a, t, pos)) + beta * (1 - _masked_cos(a, t, neg)) + w_non * (1 - _masked_cos(a, t, non))
    )
    return per_sample.mean()


def _check_choice(value: str, setting: str) -> str:
    if value not in TEACHER_INPUTS:
        raise ValueError(f"{setting}={value!r} must be one of {', '.join(TEACHER_INPUTS)}.")
    return value


def topkd_loss(
    logits_student: Tensor,
    logits_teacher: Tensor,
    target: Tensor,
    k: int = 5,
    tau: float = 0.1,
    gamma: float = 0.5,
    lam: float = 0.1,
    gt_correction: bool = True,
    gt_weight: Optional[float] = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    w_non: float = 1.0,
    w_ce: float = 1.0,
    lambda_con: float = 1.0,
    lambda_tdl: float = 1.0,
    con_normalize: bool = True,
    con_teacher: str = "scaled",
    tdl_teacher: str = "scaled",
    tdl_sign_split: bool = False,
) -> dict[str, Tensor]:
    """The TopKD objective as weighted terms ``{"ce", "con", "tdl"}`` (their sum is the loss)."""
    _check_choice(con_teacher, "distill.con_teacher")
    _check_choice(tdl_teacher, "distill.tdl_teacher")
    if tau <= 0:
        raise ValueError(f"distill.tau={tau!r} must be > 0.")
    raw = _float(logits_teacher)
    scaled = top_k_scale(raw, target, k, gamma, lam, gt_correction, gt_weight)
    feeds = {"scaled": scaled, "raw": raw}
    return {
        "ce": w_ce * F.cross_entropy(_float(logits_student), target),
        "con": lambda_con * contrastive_loss(logits_student, feeds[con_teacher], tau, con_normalize),
        "tdl": lambda_tdl * top_k_decoupled_loss(logits_student, feeds[tdl_teacher], k, alpha, beta, w_non, tdl_sign_split),
    }


class TopKD(Strategy):
    """``distill=topkd``: CE + λ_con·L_con + λ_tdl·L_TDL on the (TSM-scaled) teacher logits.

    ``teacher_transform`` (null by default) runs before, on the raw teacher logits, as for any
    strategy; TopKD's own scaling is set by ``k``, ``gamma``, ``lam``, ``gt_correction``, ``gt_weight``.
    """

    def __init__(
        self,
        k: int = 5,
        tau: float = 0.1,
        gamma: float = 0.5,
        lam: float = 0.1,
        gt_correction: bool = True,
        gt_weight: Optional[float] = None,
        alpha: float = 1.0,
        beta: float = 1.0,
        w_non: float = 1.0,
        w_ce: float = 1.0,
        lambda_con: float = 1.0,
        lambda_tdl: float = 1.0,
        con_normalize: bool = True,
        con_teacher: str = "scaled",
        tdl_teacher: str = "scaled",
        tdl_sign_split: bool = False,
        teacher_transform=None,
        logit_transform=None,
    ) -> None:
        super().__init__(teacher_transform, logit_transform)
        if isinstance(k, bool) or int(k) != k or int(k) < 1:
            raise ValueError(f"distill.k={k!r}: K must be a positive integer.")
        if tau <= 0:
            raise ValueError(f"distill.tau={tau!r} must be > 0.")
        self.knobs = dict(
            k=int(k), tau=float(tau), gamma=float(gamma), lam=float(lam), gt_correction=bool(gt_correction),
            gt_weight=gt_weight, alpha=float(alpha), beta=float(beta), w_non=float(w_non), w_ce=float(w_ce),
            lambda_con=float(lambda_con), lambda_tdl=float(lambda_tdl), con_normalize=bool(con_normalize),
            con_teacher=_check_choice(con_teacher, "distill.con_teacher"),
            tdl_teacher=_check_choice(tdl_teacher, "distill.tdl_teacher"), tdl_sign_split=bool(tdl_sign_split),
        )

    def loss_terms(self, student, teacher, batch, epoch):
        if self.logit_transform is None:
            return topkd_loss(student.logits, teacher.logits, batch.y, **self.knobs)
        z_s, z_t = self.transform_logits(student.logits, teacher.logits)
        terms = topkd_loss(z_s, z_t, batch.y, **self.knobs)  # the contrastive and decoupled terms on LS logits
        terms["ce"] = self.knobs["w_ce"] * F.cross_entropy(student.logits.float(), batch.y)  # the CE on raw logits
        return terms
