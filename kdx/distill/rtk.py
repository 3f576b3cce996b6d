"""RTK: representative teacher keys (Yang, Kao, Huang, arXiv 2206.12788) on top of AFD, docs/methods.md#rtk.

**Our reconstruction, unverified**: no official code exists and only the abstract could be read
("AFD + feature-map similarity + filtering out useless teacher information"). Every choice is a
knob:

- ``roles="rtk"`` (default): the teacher features give the *keys*, ``k_t = ReLU(BN(W_t·GAP(f_t)))``,
  each student hint gives a *query*, ``q_s = BN(W_s·GAP(f_s))``; a shared bilinear map turns each
  teacher key into one row per student, ``K̃_t = BN(W_bi·k_t) ∈ R^{S·d}``; ``α[b,s,·]`` is a softmax
  over the teacher layers of ``(⟨K̃_{t,s}, q_s⟩ + ⟨P_s[s], P_t[t]⟩)/√d``.
  ``roles="afd"``: AFD's roles (teacher queries, student keys, softmax over the student layers).
- ``top_k``: only the ``k`` largest logits per query are kept (the others are zeroed and the rest
  renormalised, i.e. a softmax over the kept keys): with ``roles="rtk"`` the top-k teacher keys per
  student layer. ``null`` (default): ``⌈n/2⌉`` of the ``n`` keys (``⌈T/2⌉``); ``"all"``: no filtering;
  an int larger than ``n`` keeps all.
- values and loss as AFD: ``L = Σ_query mean_b Σ_key α'·mean_hw(v_{s→t} − v_t)²`` with ``value_pool``
  ``"teacher"`` (AFD's: the student map pooled to the teacher's size; default, so that the reduction
  below is exact) or ``"smaller"`` (both maps pooled to the smaller size).

With ``roles="afd"``, ``top_k="all"`` and ``value_pool="teacher"`` the module is AFD: same
parameter names and shapes (``query``, ``key``, ``bilinear``, ``p_t``, ``p_s``), same loss and
gradients (tested against :class:`kdx.distill.afd.AFD`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.afd import POOLS, AFDStrategy, LinearBN, check_shapes, chw, gap, value_diffs

ROLES = ("rtk", "afd")
TopK = Optional[Union[int, str]]


def resolve_top_k(top_k: TopK, n: int) -> int:
    """The number of keys kept out of ``n``: null → ⌈n/2⌉, "all" → n, int k → min(k, n)."""
    if top_k is None:
        return math.ceil(n / 2)
    if isinstance(top_k, str):
        if top_k.lower() == "all":
            return n
        raise ValueError(f"distill.top_k must be null, 'all' or a positive int, got {top_k!r}")
    if isinstance(top_k, bool) or int(top_k) != top_k or int(top_k) < 1:
        raise ValueError(f"distill.top_k must be null, 'all' or a positive int, got {top_k!r}")
    return min(int(top_k), n)


def keep_top_k(logit: Tensor, k: int) -> Tensor:
    """``logit`` with all but the ``k`` largest entries of the last dimension set to −inf."""
    if k >= logit.shape[-1]:
        return logit
    idx = logit.topk(k, dim=-1).indices
    keep = torch.zeros_like(logit, dtype=torch.bool).scatter_(-1, idx, True)
    return logit.masked_fill(~keep, float("-inf"))


class RTK(nn.Module):
    """The RTK loss module, built from the teacher's and the student's feature shapes.

    ``forward(teacher_feats, student_feats)`` → scalar (unweighted). See the module docstring.
    """

    def __init__(self, teacher_shapes: Sequence[Sequence[int]], student_shapes: Sequence[Sequence[int]],
                 qk_dim: int = 128, roles: str = "rtk", top_k: TopK = None, value_pool: str = "teacher") -> None:
        super().__init__()
        if roles not in ROLES:
            raise ValueError(f"distill.roles must be one of {ROLES}, got {roles!r}")
        if value_pool not in POOLS:
            raise ValueError(f"distill.value_pool must be one of {POOLS}, got {value_pool!r}")
        t_shapes, s_shapes = [chw(s) for s in teacher_shapes], [chw(s) for s in student_shapes]
        if not t_shapes or not s_shapes:
            raise ValueError("RTK needs at least one teacher and one student feature")
        self.roles, self.value_pool, self.qk_dim = roles, value_pool, int(qk_dim)
        self.n_t, self.n_s = len(t_shapes), len(s_shapes)
        self.t_shapes, self.s_shapes = t_shapes, s_shapes
        q_shapes, k_shapes = (t_shapes, s_shapes) if roles == "afd" else (s_shapes, t_shapes)
        self.n_q, self.n_k = len(q_shapes), len(k_shapes)
        self.top_k = resolve_top_k(top_k, self.n_k)
        self.query = nn.ModuleList([LinearBN(c, self.qk_dim) for c, _, _ in q_shapes])
        self.key = nn.ModuleList([LinearBN(c, self.qk_dim) for c, _, _ in k_shapes])
        self.bilinear = LinearBN(self.qk_dim, self.qk_dim * self.n_q)
        self.p_t = nn.Parameter(torch.empty(self.n_t, self.qk_dim))
        self.p_s = nn.Parameter(torch.empty(self.n_s, self.qk_dim))
        nn.init.xavier_normal_(self.p_t)
        nn.init.xavier_normal_(self.p_s)

    def attention(self, teacher_feats: Sequence[Tensor], student_feats: Sequence[Tensor]) -> Tensor:
        """``α'`` of shape ``B×n_query×n_key`` (softmax over the kept keys)."""
        q_feats, k_feats = (teacher_feats, student_feats) if self.roles == "afd" else (student_feats, teacher_feats)
        p_q, p_k = (self.p_t, self.p_s) if self.roles == "afd" else (self.p_s, self.p_t)
        b, d = q_feats[0].shape[0], self.qk_dim
        query = torch.stack([layer(gap(f)) for layer, f in zip(self.query, q_feats)], dim=1)  # B×Q×d
        key = torch.stack([layer(gap(f), relu=True) for layer, f in zip(self.key, k_feats)], dim=1)  # B×K×d
        bilinear_key = self.bilinear(key.reshape(b * self.n_k, d)).view(b, self.n_k, self.n_q, d)
        logit = torch.einsum("bkqd,bqd->bqk", bilinear_key, query) + p_q @ p_k.t()
        return F.softmax(keep_top_k(logit / math.sqrt(d), self.top_k), dim=2)

    def forward(self, teacher_feats: Sequence[Tensor], student_feats: Sequence[Tensor]) -> Tensor:
        check_shapes(self, teacher_feats, student_feats)
        att = self.attention(teacher_feats, student_feats)
        diff = value_diffs(teacher_feats, student_feats, self.value_pool)  # B×S×T
        if self.roles == "afd":
            diff = diff.transpose(1, 2)  # B×T×S: queries are the teacher layers
        return (att * diff).sum(dim=2).mean(dim=0).sum()


class RTKStrategy(AFDStrategy):
    """``w_ce·CE + w_kd·KD(T) + beta·L_RTK`` (``distill=rtk``), the AFD recipe by default."""

    term = "rtk"

    def __init__(self, beta: float = 200.0, qk_dim: int = 128, roles: str = "rtk", top_k: TopK = None,
                 value_pool: str = "teacher", temperature: float = 4.0, w_ce: float = 1.0, w_kd: float = 0.9,
                 teacher_transform=None) -> None:
        super().__init__(beta=beta, qk_dim=qk_dim, temperature=temperature, w_ce=w_ce, w_kd=w_kd,
                         teacher_transform=teacher_transform)
        if roles not in ROLES:
            raise ValueError(f"distill.roles must be one of {ROLES}, got {roles!r}")
        if value_pool not in POOLS:
            raise ValueError(f"distill.value_pool must be one of {POOLS}, got {value_pool!r}")
        resolve_top_k(top_k, 1)  # a bad value stops here, before any data is read
        self.roles, self.top_k, self.value_pool = roles, top_k, value_pool

    def make_feature_loss(self, teacher_shapes, student_shapes) -> nn.Module:
        return RTK(teacher_shapes, student_shapes, self.qk_dim, self.roles, self.top_k, self.value_pool)
