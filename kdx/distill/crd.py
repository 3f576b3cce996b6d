"""CRD: contrastive representation distillation (Tian et al., ICLR 2020), NCE form with a memory bank.

Official source: megvii-research/mdistiller ``mdistiller/distillers/CRD.py`` (Embed, ContrastMemory,
ContrastLoss, AliasMethod) and ``mdistiller/dataset/cifar100.py`` (``CIFAR100InstanceSample``), both taken
from HobbitLong/RepDistiller ``crd/memory.py``, ``crd/criterion.py``, ``dataset/cifar100.py``.
Written anew here; equal to the official code in float32 (tests).

For a batch with dataset indices ``i_b`` and contrast indices ``c_b = (pos_b, neg_b1..neg_bK)``:

- embeddings ``v1 = Embed_s(f_s)``, ``v2 = Embed_t(f_t)``: ``x ↦ Wx + b`` then ``/‖·‖₂`` (no eps);
- scores against the memory banks ``M1`` (student rows) and ``M2`` (teacher rows), both ``n_data × D``:
  ``out_v1[b, j] = exp(⟨M2[c_bj], v1_b⟩ / T) / Z1``, ``out_v2[b, j] = exp(⟨M1[c_bj], v2_b⟩ / T) / Z2``;
  the banks are read detached (no gradient into the memory);
- ``Z1 = mean(exp(⟨M2[c], v1⟩/T)) · n_data`` over the *first* batch ever seen (every entry of the
  ``B × (K+1)`` score matrix), then frozen in the ``params`` buffer (likewise ``Z2``);
- NCE loss per side (:func:`crd_nce_loss`), ``Pn = 1/n_data``, ``c = K·Pn``:
  ``L = −(Σ_b log(P_b0 / (P_b0 + c + ε)) + Σ_b Σ_{j≥1} log(c / (P_bj + c + ε))) / B``, ``ε = 1e-7``;
- total ``L_crd = L(out_v1) + L(out_v2)``; afterwards (no grad) the rows ``i_b`` of both banks move to
  ``normalize(μ·M[i_b] + (1−μ)·v_b)`` (:meth:`ContrastMemory.update`).

Negatives (official ``CIFAR100InstanceSample.__getitem__``, per sample, numpy global RNG in the loader
workers): mode ``"exact"``: positive = the sample's own index; ``"relax"``: positive =
``np.random.choice(cls_positive[y], 1)`` (any sample of the same class, possibly itself). Negatives:
``np.random.choice(cls_negative[y], K, replace=K > len(cls_negative[y]))``: a uniform K-subset without
replacement (numpy draws a random permutation and keeps its head) of the samples of *other* classes, with
replacement only when the pool is smaller than K (ImageNet's sampler always uses replacement). ``cls_negative[y]``
lists the other classes' samples class by class, each class's samples in dataset order. ``percent ∈ (0, 1)``
(not used by mdistiller, which passes 1.0) keeps per class a random subset of ``int(len(cls_negative[0])·percent)``
negatives, drawn once when the dataset is built. Without ``contrast_idx`` the official memory draws
``B·(K+1)`` indices uniformly from all ``n_data`` (AliasMethod on uniform weights, column 0 := own index).
Here the same distributions are drawn by :func:`sample_contrast_idx` / :func:`uniform_contrast_idx`, but
from a counter-based integer hash of ``(seed, epoch, index)`` instead of a stateful RNG: every sample's row
is a fixed function of those three (int64 integer ops only, hence meant to be device-independent; checked on
CPU only), whatever the batch composition, worker or DDP rank, so a resumed run draws exactly what an
uninterrupted one would. (Bit-equality with numpy's
stream is neither possible nor meaningful: the official draws depend on worker seeding.)

Official CIFAR-100 hyper-parameters (mdistiller ``engine/cfg.py`` + ``configs/cifar100/crd.yaml``):
``CE_WEIGHT 1.0``, ``FEAT_WEIGHT 0.8``, ``FEAT.DIM 128``, ``STUDENT_DIM = TEACHER_DIM = 256`` (the
``pooled_feat`` widths of resnet8x4/resnet32x4), ``NCE.K 16384``, ``NCE.MOMENTUM 0.5``,
``NCE.TEMPERATURE 0.07``, ``MODE "exact"``; SGD lr 0.05, wd 5e-4, 240 epochs, batch 64, special
``crd`` trainer and instance-sample dataloader (batches carry ``index`` and ``contrastive_index``).

Quirks kept: ``T``, ``K``, ``Z``, momentum live in a float32 ``params`` buffer, so ``T`` is float32(0.07);
``Z`` comes from the first batch only (and, under DataParallel, from the first device's chunk only);
no eps in either L2 normalisation; duplicate indices in one update keep one (unspecified) row.
Deviations (no effect on values): :func:`crd_nce_loss` returns a 0-dim tensor (official: shape ``[1]``);
the scores are computed in float32 with autocast off; ``Z`` is set without a host sync.

``distill=crd`` (:class:`CRDStrategy`): ``w_ce·CE + w_crd·L_crd`` over both networks' ``pooled_feat``; the Embed
widths come from the tapped shapes, ``n_data`` and the class pools from the training labels (``attach_data``),
the contrast indices from ``(seed, epoch, batch.idx)`` each step; the banks are buffers of the strategy, so a
checkpoint holds them and a resumed run continues exactly. K larger than a class's negative pool stops at build
(``distill.k``): the official sampler would then draw with replacement (``replace_short_pools=true`` does so).
One process only (``supports_ddp = False``): DDP ranks would each update their own banks.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdx.distill.base import DataInfo, Strategy
from kdx.errors import ConfigError

EPS = 1e-7
MODES = ("exact", "relax")
_MASK = 0xFFFFFFFF
_NEG, _POS, _PERCENT, _UNIFORM = 0, 1, 2, 3  # independent hash streams


def _f32(x: Tensor) -> Tensor:
    """``x`` in float32 at least (bf16/fp16 up-cast, float64 kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Embed(nn.Module):
    """Flatten, ``nn.Linear(dim_in, dim_out)``, L2-normalise rows (``x / ‖x‖₂``, no eps), in float32 at least."""

    def __init__(self, dim_in: int = 1024, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = _f32(self.linear(x.reshape(x.shape[0], -1)))
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


def crd_nce_loss(x: Tensor, n_data: int) -> Tensor:
    """The official ``ContrastLoss``: NCE loss of ``x = [P_pos, P_neg_1..P_neg_K]`` (``B × (K+1)``).

    ``−(Σ_b log(x_b0/(x_b0 + K/n + ε)) + Σ_{b,j≥1} log((K/n)/(x_bj + K/n + ε))) / B``, ε = 1e-7; a trailing
    singleton dimension (the official ``B × (K+1) × 1``) is accepted. Computed in float32 at least.
    """
    x = _f32(x).reshape(x.shape[0], x.shape[1])
    b, m = x.shape[0], x.shape[1] - 1
    noise = m * (1.0 / float(n_data))
    p_pos, p_neg = x[:, 0], x[:, 1:]
    log_d1 = torch.log(p_pos / (p_pos + (noise + EPS)))
    log_d0 = torch.log(torch.full_like(p_neg, noise) / (p_neg + (noise + EPS)))
    return -(log_d1.sum() + log_d0.sum()) / b


class ContrastMemory(nn.Module):
    """The two memory banks and the NCE scores (official ``ContrastMemory``), all state in buffers.

    Buffers (saved in checkpoints): ``params = [K, T, Z_v1, Z_v2, momentum]`` (float32; Z = −1 until the
    first forward), ``memory_v1`` / ``memory_v2`` (``n_data × feat_dim``, initialised uniformly in
    ``[−stdv, stdv)``, ``stdv = 1/√(feat_dim/3)``; v1, then v2, from the global RNG as official).
    Keep the module in float32 (e.g. outside a ``bf16-true`` cast).

    DDP: every rank must apply the same update to keep the banks equal: call ``forward(..., update=False)``,
    then :meth:`update` with the all-gathered ``idx``, ``v1``, ``v2`` of all ranks (the official code has no
    DDP; under its DataParallel only the first device's chunk updates the banks). ``Z`` is then set from the
    local first batch of each rank; average ``params[2:4]`` over ranks after the first step (all_reduce)
    to keep them equal (single-process runs are unaffected).
    """

    def __init__(self, feat_dim: int, n_data: int, k: int, temperature: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        self.n_data, self.k = n_data, k
        self.register_buffer("params", torch.tensor([float(k), temperature, -1.0, -1.0, momentum], dtype=torch.float32))
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_v1", torch.rand(n_data, feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("memory_v2", torch.rand(n_data, feat_dim) * (2 * stdv) - stdv)

    def forward(
        self, v1: Tensor, v2: Tensor, idx: Tensor, contrast_idx: Tensor, update: bool = True
    ) -> tuple[Tensor, Tensor]:
        """``(out_v1, out_v2)``, each ``B × (K+1)`` in the banks' dtype: ``v1`` (student) against the teacher bank
        ``memory_v2``, ``v2`` (teacher) against the student bank ``memory_v1``, at the columns of
        ``contrast_idx`` (``B × (K+1)``, positive first). Sets Z on the first call; then updates the rows
        ``idx`` unless ``update=False``.
        """
        b, k1 = contrast_idx.shape
        if k1 != self.k + 1:
            raise ValueError(f"contrast_idx must have K+1 = {self.k + 1} columns, got {k1}")
        with torch.autocast(v1.device.type, enabled=False):
            v1, v2 = v1.to(self.memory_v1.dtype), v2.to(self.memory_v1.dtype)
            t = self.params[1].clone()  # a copy: params is written below, t is saved for backward
            flat = contrast_idx.reshape(-1)
            w2 = self.memory_v2.index_select(0, flat).view(b, k1, -1)
            w1 = self.memory_v1.index_select(0, flat).view(b, k1, -1)
            out_v1 = torch.exp(torch.bmm(w2, v1.unsqueeze(2)).squeeze(2) / t)
            out_v2 = torch.exp(torch.bmm(w1, v2.unsqueeze(2)).squeeze(2) / t)
            with torch.no_grad():  # Z := mean · n_data on the first batch, kept afterwards (no host sync)
                for i, out in ((2, out_v1), (3, out_v2)):
                    z = self.params[i]
                    self.params[i] = torch.where(z < 0, out.detach().mean() * self.n_data, z)
            out_v1 = out_v1 / self.params[2].clone()
            out_v2 = out_v2 / self.params[3].clone()
        if update:
            self.update(idx, v1, v2)
        return out_v1, out_v2

    @torch.no_grad()
    def update(self, idx: Tensor, v1: Tensor, v2: Tensor) -> None:
        """Rows ``idx`` of each bank := ``normalize(μ·row + (1−μ)·v)`` (L2, no eps), μ = ``params[4]``."""
        mu = self.params[4]
        for bank, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
            rows = bank.index_select(0, idx) * mu + v.detach().to(bank.dtype) * (1 - mu)
            bank.index_copy_(0, idx, rows / rows.pow(2).sum(1, keepdim=True).pow(0.5))


class CRDLoss(nn.Module):
    """``embed_s``, ``embed_t`` (trainable, join the student's optimiser) and the memory ``contrast``;
    ``forward(f_s, f_t, idx, contrast_idx) = crd_nce_loss(out_v1) + crd_nce_loss(out_v2)`` (unweighted).

    ``f_s``/``f_t``: the student's / teacher's ``pooled_feat`` (``B × s_dim`` / ``B × t_dim``; the teacher's
    detached). Modules are built in the official order (embed_s, embed_t, memory), so the same seed gives
    the same initial state as mdistiller's CRD.
    """

    def __init__(
        self, s_dim: int, t_dim: int, n_data: int, feat_dim: int = 128, k: int = 16384,
        temperature: float = 0.07, momentum: float = 0.5,
    ) -> None:
        super().__init__()
        self.n_data = n_data
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.contrast = ContrastMemory(feat_dim, n_data, k, temperature, momentum)

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Tensor, update: bool = True) -> Tensor:
        out_s, out_t = self.contrast(self.embed_s(f_s), self.embed_t(f_t), idx, contrast_idx, update=update)
        return crd_nce_loss(out_s, self.n_data) + crd_nce_loss(out_t, self.n_data)


# ---------------------------------------------------------------------------------------------------------
# data side: per-class pools and the deterministic draw of contrast indices


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x·c mod 2³²`` for ``0 ≤ x < 2³²`` in int64 without overflow (c split into 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK


def _mix32(x: Tensor) -> Tensor:
    """The ``lowbias32`` integer hash (C. Wellons, hash-prospector): a bijection of ``[0, 2³²)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _chain(h: Tensor, value) -> Tensor:
    """Absorb ``value`` (int or int64 tensor, taken mod 2³²) into the hash state ``h``; bijective in it."""
    return _mix32(((h ^ (value & _MASK)) + 0x9E3779B9) & _MASK)


def _hash_grid(seed: int, epoch: int, stream: int, rows: Tensor, n: int) -> Tensor:
    """``len(rows) × n`` int64 hashes in ``[0, 2³²)``, a fixed function of (seed, epoch, stream, row, column);
    a bijection of the column within each row, so a row's values are distinct (ranking them = a permutation).
    Draws in ``[0, m)`` take them ``mod m`` (relative bias ≤ m/2³², e.g. 1e-5 for CIFAR's pools).
    """
    h = torch.zeros((), dtype=torch.int64, device=rows.device)
    for v in (seed, epoch, stream):
        h = _chain(h, v)
    h = _chain(h, rows.to(torch.int64)).unsqueeze(1)
    return _chain(h, torch.arange(n, device=rows.device))


class ContrastPools(NamedTuple):
    """The official ``cls_positive`` / ``cls_negative`` lists of a labelled split, stored compactly.

    ``order``: the sample indices sorted by class, stably (= the ``cls_positive`` lists concatenated);
    class ``c`` occupies ``order[start[c] : start[c] + count[c]]``, and ``cls_negative[c]`` is ``order``
    without that block (other classes in class order, each in dataset order). ``table``: ``C × n``
    explicit negative pools when ``percent < 1`` was applied, else None.
    """

    labels: Tensor
    order: Tensor
    start: Tensor
    count: Tensor
    table: Optional[Tensor]

    def positives(self, c: int) -> Tensor:
        """Official ``cls_positive[c]``."""
        s = int(self.start[c])
        return self.order[s : s + int(self.count[c])]

    def negatives(self, c: int) -> Tensor:
        """Official ``cls_negative[c]`` (after the ``percent`` subsetting, if any)."""
        if self.table is not None:
            return self.table[c]
        s = int(self.start[c])
        return torch.cat([self.order[:s], self.order[s + int(self.count[c]) :]])

    def negative_count(self, classes: Tensor) -> Tensor:
        if self.table is not None:
            return torch.full_like(classes, self.table.shape[1])
        return self.labels.numel() - self.count[classes]

    def negative_at(self, classes: Tensor, r: Tensor) -> Tensor:
        """``cls_negative[classes[b]][r[b, j]]`` for a ``B × K`` matrix of positions ``r``."""
        if self.table is not None:
            return self.table[classes.unsqueeze(1), r]
        c = classes.unsqueeze(1)
        return self.order[r + self.count[c] * (r >= self.start[c])]


def contrast_pools(
    labels: Tensor, num_classes: Optional[int] = None, percent: float = 1.0, seed: int = 0
) -> ContrastPools:
    """The per-class pools of the training ``labels`` (int64, one per sample, on any device).

    ``percent ∈ (0, 1)``: as official, every class keeps ``int(len(cls_negative[0]) · percent)`` of its
    negatives, a uniform subset drawn once (here from ``seed``); other values keep all of them.
    """
    labels = labels.to(torch.int64)
    c_n = int(labels.max()) + 1 if num_classes is None else num_classes
    order = torch.sort(labels, stable=True).indices
    count = torch.bincount(labels, minlength=c_n)
    start = torch.cumsum(count, 0) - count
    pools = ContrastPools(labels, order, start, count, None)
    if not 0 < percent < 1:
        return pools
    n = int(int(pools.negative_count(torch.zeros(1, dtype=torch.int64, device=labels.device))) * percent)
    rows = []
    for c in range(c_n):
        m = labels.numel() - int(count[c])
        if m < n:
            raise ValueError(f"class {c} has {m} negatives, fewer than the {n} that percent={percent} keeps")
        keep = _hash_grid(seed, 0, _PERCENT, torch.tensor([c], device=labels.device), m).topk(n, dim=1).indices
        rows.append(pools.negative_at(torch.tensor([c], device=labels.device), keep)[0])
    return pools._replace(table=torch.stack(rows))


def sample_contrast_idx(
    pools: ContrastPools, idx: Tensor, k: int, mode: str = "exact", seed: int = 0, epoch: int = 0,
    replace: Optional[bool] = None,
) -> Tensor:
    """``B × (K+1)`` int64 contrast indices for the dataset indices ``idx``: positive first, then K negatives.

    Official distributions (``CIFAR100InstanceSample``): positive = ``idx`` (``"exact"``) or uniform from
    the class of ``idx`` (``"relax"``); negatives uniform from ``cls_negative[label]``, without replacement
    unless the pool is smaller than K (``replace=None``, official CIFAR rule, decided per sample);
    ``replace=True`` always draws with replacement (the official ImageNet sampler). Row b is a fixed function
    of ``(seed, epoch, idx[b])``: draw ``epoch`` from the run's epoch counter and resume is exact.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    idx = idx.to(torch.int64)
    cls = pools.labels[idx]
    m = pools.negative_count(cls)
    rep = k > m if replace is None else torch.full_like(m, bool(replace), dtype=torch.bool)
    r = torch.empty(idx.numel(), k, dtype=torch.int64, device=idx.device)
    if bool((~rep).any()):
        rows = (~rep).nonzero().squeeze(1)
        keys = _hash_grid(seed, epoch, _NEG, idx[rows], int(m[rows].max()))
        keys = keys.masked_fill(torch.arange(keys.shape[1], device=idx.device) >= m[rows].unsqueeze(1), -1)
        r[rows] = keys.topk(k, dim=1).indices
    if bool(rep.any()):
        rows = rep.nonzero().squeeze(1)
        r[rows] = _hash_grid(seed, epoch, _NEG, idx[rows], k) % m[rows].unsqueeze(1)
    neg = pools.negative_at(cls, r)
    if mode == "exact":
        pos = idx
    else:
        pos = pools.order[pools.start[cls] + _hash_grid(seed, epoch, _POS, idx, 1)[:, 0] % pools.count[cls]]
    return torch.cat([pos.unsqueeze(1), neg], dim=1)


def uniform_contrast_idx(idx: Tensor, n_data: int, k: int, seed: int = 0, epoch: int = 0) -> Tensor:
    """The official memory's own draw when no ``contrast_idx`` is given: ``B × (K+1)``, column 0 = ``idx``,
    the rest uniform over ``[0, n_data)`` with replacement (may hit the sample itself or its class)."""
    idx = idx.to(torch.int64)
    neg = _hash_grid(seed, epoch, _UNIFORM, idx, k) % n_data
    return torch.cat([idx.unsqueeze(1), neg], dim=1)


class CRDStrategy(Strategy):
    """``distill=crd``: ``w_ce·CE + w_crd·(L_NCE(student → teacher bank) + L_NCE(teacher → student bank))``."""

    student_taps = teacher_taps = ("pooled_feat",)
    supports_ddp = False  # each DDP rank would update its own banks

    def __init__(
        self, w_ce: float = 1.0, w_crd: float = 0.8, feat_dim: int = 128, k: int = 16384, momentum: float = 0.5,
        temperature: float = 0.07, mode: str = "exact", replace_short_pools: bool = False,
    ) -> None:
        super().__init__()
        for key, value in (("k", k), ("feat_dim", feat_dim)):
            if isinstance(value, bool) or int(value) != value or int(value) < 1:
                raise ConfigError(f"distill.{key}={value!r} must be a positive integer.")
        if mode not in MODES:
            raise ConfigError(f"distill.mode={mode!r} must be one of {', '.join(MODES)}.")
        if not temperature > 0 or not 0 <= momentum <= 1:
            raise ConfigError(f"distill.temperature={temperature!r} must be > 0 and distill.momentum={momentum!r} "
                              "in [0, 1].")
        self.w_ce, self.w_crd, self.feat_dim, self.k = float(w_ce), float(w_crd), int(feat_dim), int(k)
        self.momentum, self.temperature, self.mode = float(momentum), float(temperature), mode
        self.replace_short_pools = bool(replace_short_pools)
        self.n_data: Optional[int] = None
        self.seed = 0
        self.crd: Optional[CRDLoss] = None

    def attach_data(self, info: DataInfo) -> None:
        pools = contrast_pools(info.train_labels.cpu(), info.num_classes)
        negatives = info.train_size - pools.count[pools.count > 0]
        shortest = int(negatives.min()) if negatives.numel() else 0
        if self.k > shortest and not self.replace_short_pools:
            raise ConfigError(
                f"distill.k={self.k}: CRD draws K negatives per sample from the other classes' training samples, "
                f"but a class has only {shortest} of them (training split: {info.train_size} samples). Set "
                f"distill.k<={shortest}, or distill.replace_short_pools=true to draw them with replacement as the "
                "official sampler does then."
            )
        for name, t in zip(("labels", "order", "start", "count"), pools[:4]):
            self.register_buffer(f"pool_{name}", t, persistent=False)  # follow the device, not in checkpoints
        self.n_data, self.seed = info.train_size, int(info.seed)

    def build_feature_modules(self, teacher_shapes, student_shapes) -> None:
        if self.n_data is None:
            raise RuntimeError("CRDStrategy.attach_data(info) must run before build_feature_modules")
        s_dim, t_dim = (math.prod(shapes["pooled_feat"][0][1:]) for shapes in (student_shapes, teacher_shapes))
        self.crd = CRDLoss(s_dim, t_dim, self.n_data, self.feat_dim, self.k, self.temperature, self.momentum)

    def contrast_idx(self, idx: Tensor, epoch: int) -> Tensor:
        """The batch's ``B × (K+1)`` contrast indices (positive first), a function of (seed, epoch, idx)."""
        pools = ContrastPools(self.pool_labels, self.pool_order, self.pool_start, self.pool_count, None)
        return sample_contrast_idx(pools, idx, self.k, self.mode, self.seed, epoch)

    def loss_terms(self, student, teacher, batch, epoch):
        if self.crd is None:
            raise RuntimeError("CRDStrategy has no embeddings and memory yet: kdx.build.build calls attach_data "
                               "and build_feature_modules first.")
        f_s, f_t = student.taps["pooled_feat"][0], teacher.taps["pooled_feat"][0].detach()
        crd = self.crd(f_s, f_t, batch.idx, self.contrast_idx(batch.idx, epoch))
        return {"ce": self.w_ce * F.cross_entropy(student.logits, batch.y), "crd": self.w_crd * crd}
