"""AFD: attention-based feature distillation (Ji et al., AAAI 2021), docs/methods.md#afd.

Exact to the official code (``clovaai/attention-feature-distillation``), written anew:
for teacher guide features ``f_t`` (t = 1..T) and student hint features ``f_s`` (s = 1..S),

- teacher query ``q_t = BN(W_t·GAP(f_t))`` (no ReLU); student key ``k_s = ReLU(BN(W_s·GAP(f_s)))``;
- one bilinear map ``K̃_s = BN(W_bi·k_s) ∈ R^{T·d}`` (BN statistics over the B·S stacked keys),
  row t is ``K̃_{s,t}``; positional ``P_t ∈ R^{T×d}``, ``P_s ∈ R^{S×d}`` (xavier-normal);
- ``α[b,t,·] = softmax_s((⟨K̃_{s,t}(b), q_t(b)⟩ + ⟨P_t[t], P_s[s]⟩) / √d)``;
- values: ``v_t = normalize(mean_c f_t²)`` and ``v_{s→t} = normalize(AdaptiveAvgPool_{H_t×W_t}(mean_c f_s²))``;
- ``L = Σ_t mean_b Σ_s α[b,t,s]·mean_hw(v_{s→t} − v_t)²``.

The strategy :class:`AFDStrategy` adds ``w_ce·CE + w_kd·KD(T)`` (official: 1, 0.9, 4) and
``beta·L`` (β = 200, d = 128); the AFD module's parameters join the student's optimiser.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.base import Strategy
from kdx.distill.losses import kd_loss

POOLS = ("teacher", "smaller")


def chw(shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` of a feature shape given as ``B×C×H×W`` or ``C×H×W``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(
            f"AFD/RTK need 4-D feature maps B×C×H×W, got a tap of shape {shape}: choose conv-map taps "
            "(model.taps.blocks / teacher.model.taps.blocks); ViT token taps are reshaped to maps automatically."
        )
    return shape  # type: ignore[return-value]


class LinearBN(nn.Module):
    """Linear + BatchNorm1d, with an optional ReLU (the official ``nn_bn_relu``)."""

    def __init__(self, nin: int, nout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(nin, nout)
        self.bn = nn.BatchNorm1d(nout)

    def forward(self, x: Tensor, relu: bool = False) -> Tensor:
        out = self.bn(self.linear(x))
        return F.relu(out) if relu else out


def gap(f: Tensor) -> Tensor:
    """Global average pooling ``B×C×H×W → B×C``."""
    return f.mean(dim=(2, 3))


def energy(f: Tensor) -> Tensor:
    """``mean_c f²`` as ``B×1×H×W``."""
    return f.pow(2).mean(dim=1, keepdim=True)


def value_diffs(teacher_feats: Sequence[Tensor], student_feats: Sequence[Tensor], pool: str = "teacher") -> Tensor:
    """``D[b, s, t] = mean_hw(v_{s→t}(b) − v_t(b))²``, shape ``B×S×T``.

    ``pool="teacher"`` (AFD): the student's energy map is adaptively average-pooled to the
    teacher's size (``v_t`` at its own size). ``pool="smaller"``: both maps are pooled to the
    smaller of the two sizes (per dimension) before normalising.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r} (distill.value_pool)")
    e_s = [energy(f) for f in student_feats]
    e_t = [energy(f) for f in teacher_feats]
    cols = []
    if pool == "teacher":
        by_size: dict[tuple[int, int], Tensor] = {}
        for e in e_t:
            size = (e.shape[-2], e.shape[-1])
            if size not in by_size:
                v_s = torch.stack([F.adaptive_avg_pool2d(s, size).flatten(1) for s in e_s], dim=1)
                by_size[size] = F.normalize(v_s, dim=2)  # B×S×HW
            v_t = F.normalize(e.flatten(1), dim=1)  # B×HW
            cols.append((by_size[size] - v_t.unsqueeze(1)).pow(2).mean(2))  # B×S
        return torch.stack(cols, dim=2)
    for e in e_t:
        col = []
        for s in e_s:
            size = (min(s.shape[-2], e.shape[-2]), min(s.shape[-1], e.shape[-1]))
            v_s = F.normalize(F.adaptive_avg_pool2d(s, size).flatten(1), dim=1)
            v_t = F.normalize(F.adaptive_avg_pool2d(e, size).flatten(1), dim=1)
            col.append((v_s - v_t).pow(2).mean(1))
        cols.append(torch.stack(col, dim=1))
    return torch.stack(cols, dim=2)


def check_shapes(module: nn.Module, teacher_feats: Sequence[Tensor], student_feats: Sequence[Tensor]) -> None:
    """The features must have the shapes ``module`` (AFD, RTK) was built for (``t_shapes``, ``s_shapes``)."""
    got_t = [tuple(f.shape[1:]) for f in teacher_feats]
    got_s = [tuple(f.shape[1:]) for f in student_feats]
    if got_t != [tuple(s) for s in module.t_shapes] or got_s != [tuple(s) for s in module.s_shapes]:
        raise ValueError(
            f"{type(module).__name__} was built for teacher features {module.t_shapes} and student features "
            f"{module.s_shapes}, got {got_t} and {got_s}"
        )


class AFD(nn.Module):
    """The AFD loss module, built from the teacher's and the student's feature shapes.

    ``forward(teacher_feats, student_feats)`` → scalar (unweighted ``L_AFD``). Feature shapes
    are ``B×C×H×W`` (or ``C×H×W``); the lists must come in the order of the shapes.
    Submodules: ``query[t]`` (teacher), ``key[s]`` (student), ``bilinear``, ``p_t``, ``p_s``.
    """

    def __init__(self, teacher_shapes: Sequence[Sequence[int]], student_shapes: Sequence[Sequence[int]],
                 qk_dim: int = 128) -> None:
        super().__init__()
        t_shapes, s_shapes = [chw(s) for s in teacher_shapes], [chw(s) for s in student_shapes]
        if not t_shapes or not s_shapes:
            raise ValueError("AFD needs at least one teacher and one student feature")
        self.qk_dim = int(qk_dim)
        self.n_t, self.n_s = len(t_shapes), len(s_shapes)
        self.t_shapes, self.s_shapes = t_shapes, s_shapes
        self.query = nn.ModuleList([LinearBN(c, self.qk_dim) for c, _, _ in t_shapes])
        self.key = nn.ModuleList([LinearBN(c, self.qk_dim) for c, _, _ in s_shapes])
        self.bilinear = LinearBN(self.qk_dim, self.qk_dim * self.n_t)
        self.p_t = nn.Parameter(torch.empty(self.n_t, self.qk_dim))
        self.p_s = nn.Parameter(torch.empty(self.n_s, self.qk_dim))
        nn.init.xavier_normal_(self.p_t)
        nn.init.xavier_normal_(self.p_s)

    def attention(self, teacher_feats: Sequence[Tensor], student_feats: Sequence[Tensor]) -> Tensor:
        """``α`` of shape ``B×T×S`` (softmax over the student layers)."""
        b, d = teacher_feats[0].shape[0], self.qk_dim
        query = torch.stack([layer(gap(f)) for layer, f in zip(self.query, teacher_feats)], dim=1)  # B×T×d
        key = torch.stack([layer(gap(f), relu=True) for layer, f in zip(self.key, student_feats)], dim=1)  # B×S×d
        bilinear_key = self.bilinear(key.reshape(b * self.n_s, d)).view(b, self.n_s, self.n_t, d)
        logit = torch.einsum("bstd,btd->bts", bilinear_key, query) + self.p_t @ self.p_s.t()
        return F.softmax(logit / math.sqrt(d), dim=2)

    def forward(self, teacher_feats: Sequence[Tensor], student_feats: Sequence[Tensor]) -> Tensor:
        check_shapes(self, teacher_feats, student_feats)
        att = self.attention(teacher_feats, student_feats)  # B×T×S
        diff = value_diffs(teacher_feats, student_feats, "teacher").transpose(1, 2)  # B×T×S
        return (att * diff).sum(dim=2).mean(dim=0).sum()


class AFDStrategy(Strategy):
    """``w_ce·CE + w_kd·KD(T) + beta·L_AFD`` over the models' feature taps (``distill=afd``).

    The attention module is built by :meth:`build_feature_modules` (the composition root calls it with
    the tap shapes from a dry forward before the optimiser exists). It runs in float32 with
    autocast off, whatever the training precision.
    """

    student_taps = teacher_taps = ("blocks",)  # every residual block (docs/methods.md, AFD)
    term = "afd"

    def __init__(self, beta: float = 200.0, qk_dim: int = 128, temperature: float = 4.0, w_ce: float = 1.0,
                 w_kd: float = 0.9, teacher_transform=None) -> None:
        super().__init__(teacher_transform)
        self.beta = float(beta)
        self.qk_dim = int(qk_dim)
        self.temperature = float(temperature)
        self.w_ce = float(w_ce)
        self.w_kd = float(w_kd)
        self.feature_loss: Optional[nn.Module] = None

    def make_feature_loss(self, teacher_shapes, student_shapes) -> nn.Module:
        return AFD(teacher_shapes, student_shapes, self.qk_dim)

    def build_feature_modules(self, teacher_shapes, student_shapes) -> None:
        self.feature_loss = self.make_feature_loss(teacher_shapes["blocks"], student_shapes["blocks"])

    def loss_terms(self, student, teacher, batch, epoch):
        if self.feature_loss is None:
            raise RuntimeError(
                f"{type(self).__name__} has no attention module yet: call build_feature_modules(teacher_shapes, "
                "student_shapes) first (kdx.build.build does, from the feature taps)."
            )
        if not teacher.taps.get("blocks") or not student.taps.get("blocks"):
            raise RuntimeError(f"distill={self.term} got no features: the feature taps were not captured")
        with torch.autocast(device_type=batch.x.device.type, enabled=False):
            feat = self.feature_loss([f.float() for f in teacher.taps["blocks"]], [f.float() for f in student.taps["blocks"]])
        return {
            "ce": self.w_ce * F.cross_entropy(student.logits, batch.y),
            "kd": self.w_kd * kd_loss(student.logits, teacher.logits, self.temperature),
            self.term: self.beta * feat,
        }
