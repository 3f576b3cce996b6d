"""CMI, contrastive model inversion (Fang et al., IJCAI 2021), as the NAYER repository runs it (``distill=cmi``).

Official code: tmtuan1307/NAYER ``datafree/synthesis/contrastive.py`` (``CMISynthesizer``, ``MLPHead``,
``MemoryBank``; identical in zju-vipa/Fast-Datafree, whose ``datafree_kd.py`` builds it with ``head_dim=256``,
``bank_size=40960``, ``n_neg=4096`` and whose ``scripts/cmi_cifar.sh`` runs it). Per batch (``rounds`` per epoch):
the generator is re-initialised (:func:`~kdx.datafree.common.dcgan_init`), a fresh ``z`` and sorted random
targets are drawn, and Adam(lr_g, betas 0.5/0.999) over the generator *and* ``z`` takes ``g_steps`` steps on

    L = bn·L_bn + oh·CE(t, y) + adv·L_adv + cr·L_cr

``L_bn``, ``L_adv`` as NAYER's (no momentum), on the *global view* (crop with padding 4 + flip). ``L_cr``
(:func:`contrastive_loss`): the teacher's instance-mean features (the spatial mean of every BatchNorm2d input,
concatenated; ``feature_layers`` names other modules) of the global view and of a *local view*
(:func:`random_resized_crop`, scale [0.25, 1], + flip), with ``n_neg`` negatives of both kinds from the feature
memory, are projected by the MLP head (Linear-ReLU-Linear, L2-normalised; its own persistent Adam(lr_g)); local
projections are classified among the detached global ones at temperature ``cr_T``. The lowest-loss batch goes to
the image bank and its (local, global) features to the feature memory.

Official quirks, kept:

- the memory is drawn from only after it *overflows* (``n_updates > memory_size``); when it holds exactly
  ``memory_size`` features (the 161st batch for 40960 / 256) no negative is drawn and the second mean of ``L_cr`` is
  over nothing: NaN (the regime then stops with a non-finite loss). ``full_memory_fix: true`` draws from the full
  memory there instead.
- ``cr = 0`` fails in the official code (the features are read unset); here it skips the head and the memory.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdx.datafree.augment import augment, normalize_float
from kdx.datafree.base import RoundSynthesis, SynthesisEnv, SynthesisStep
from kdx.datafree.common import (
    BestBatch, BNStatHooks, Generator, build_seeded, dcgan_init, n_params, peek_seed, student_logits,
)
from kdx.datafree.losses import adversarial_loss
from kdx.distill.base import Strategy


class MLPHead(nn.Module):
    """``Linear(d, h) → ReLU → Linear(h, out)``, outputs L2-normalised (official ``MLPHead``, ``h = d``)."""

    def __init__(self, dim_in: int, dim_out: int, dim_h: Optional[int] = None) -> None:
        super().__init__()
        h = dim_h or dim_in
        self.head = nn.Sequential(nn.Linear(dim_in, h), nn.ReLU(inplace=True), nn.Linear(h, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(x), dim=1, p=2)


class FeatureMemory:
    """The official feature ``MemoryBank``: a ring of ``max_size`` rows; :meth:`sample` draws ``k`` rows without
    replacement from the filled part, or from all rows once more than ``max_size`` were ever added."""

    def __init__(self, max_size: int, full_fix: bool = False) -> None:
        self.max_size, self.full_fix = int(max_size), bool(full_fix)
        self.data: Optional[Tensor] = None  # allocated as rows arrive (the official one starts as random rows)
        self.ptr = self.n_updates = 0

    def add(self, feat: Tensor) -> None:
        feat = feat.detach().float().cpu()
        if self.data is None:
            self.data = torch.zeros(0, feat.shape[1])
        need = min(self.max_size, max(self.data.shape[0], self.ptr + feat.shape[0]))
        if need > self.data.shape[0]:
            self.data = torch.cat([self.data, torch.zeros(need - self.data.shape[0], feat.shape[1])])
        pos = (self.ptr + torch.arange(feat.shape[0])) % self.max_size
        self.data[pos] = feat
        self.ptr = int((self.ptr + feat.shape[0]) % self.max_size)
        self.n_updates += feat.shape[0]

    def available(self) -> int:
        """Rows a draw picks from: all once overflowed (or full, with the fix), else the filled part."""
        if self.n_updates > self.max_size or (self.full_fix and self.n_updates >= self.max_size):
            return self.max_size
        return self.ptr

    def sample(self, k: int, rng: torch.Generator) -> Tensor:
        n = self.available()
        idx = torch.randperm(n, generator=rng)[: min(k, n)]
        return self.data[idx] if self.data is not None else torch.zeros(0, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data, "ptr": self.ptr, "n_updates": self.n_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data, self.ptr, self.n_updates = state["data"], int(state["ptr"]), int(state["n_updates"])


def random_resized_crop(x: Tensor, scale: Sequence[float] = (0.25, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                        rng: Optional[torch.Generator] = None) -> Tensor:
    """Per sample, a box of area ``U(scale)·H·W`` and aspect ``exp U(log ratio)`` at a uniform position, resized
    bilinearly to ``H×W`` (box corners onto output corners, as kornia's ``RandomResizedCrop``); differentiable."""
    n, _, h, w = x.shape
    area = torch.empty(n).uniform_(float(scale[0]), float(scale[1]), generator=rng) * h * w
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=rng)
    bw = torch.sqrt(area * log_r.exp()).round().clamp(1, w)
    bh = torch.sqrt(area / log_r.exp()).round().clamp(1, h)
    x0 = (torch.rand(n, generator=rng) * (w - bw + 1)).floor()
    y0 = (torch.rand(n, generator=rng) * (h - bh + 1)).floor()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = (bw - 1) / (w - 1), -1 + (2 * x0 + bw - 1) / (w - 1)
    theta[:, 1, 1], theta[:, 1, 2] = (bh - 1) / (h - 1), -1 + (2 * y0 + bh - 1) / (h - 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def contrastive_loss(proj_local: Tensor, proj_global: Tensor, n_batch: int, T: float, split: bool) -> Tensor:
    """``CE(local·globalᵀ/T, diag)`` per row (global side detached); ``split``: the mean over the batch's rows plus the
    mean over the memory's rows (official, once the memory has been written), else the mean over all rows."""
    logits = proj_local @ proj_global.detach().T / T
    per_row = F.cross_entropy(logits, torch.arange(len(logits), device=logits.device), reduction="none")
    return per_row[:n_batch].mean() + per_row[n_batch:].mean() if split else per_row.mean()


class InstanceMeans:
    """Forward hooks recording the spatial mean of each module's input (official ``InstanceMeanHook``)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.values: list[Optional[Tensor]] = [None] * len(modules)
        self.active = False
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if self.active:
                self.values[i] = inputs[0].float().mean(dim=(2, 3))
        return hook

    def run(self, fn, *args) -> tuple[Any, Tensor]:
        self.active = True
        try:
            out = fn(*args)
        finally:
            self.active = False
        return out, torch.cat(self.values, dim=1)


class CMI(RoundSynthesis):
    """``distill=cmi``: see the module docstring."""

    def __init__(
        self,
        loss: Strategy,
        g_steps: int = 200,
        rounds: int = 1,
        lr_g: float = 1e-3,
        g_betas: tuple[float, float] = (0.5, 0.999),
        synthesis_batch_size: int = 256,
        nz: int = 256,
        ngf: int = 64,
        bn: float = 1.0,
        oh: float = 1.0,
        adv: float = 0.5,
        cr: float = 0.8,
        cr_T: float = 0.2,
        head_dim: int = 256,
        memory_size: int = 40960,
        n_neg: int = 4096,
        feature_layers: Optional[list[str]] = None,
        feature_reuse: bool = False,
        local_scale: tuple[float, float] = (0.25, 1.0),
        aug_pad: int = 4,
        full_memory_fix: bool = False,
        teacher_transform=None,
    ) -> None:
        super().__init__(loss, teacher_transform)
        for name, value in (("g_steps", g_steps), ("rounds", rounds), ("synthesis_batch_size", synthesis_batch_size),
                            ("nz", nz), ("ngf", ngf), ("head_dim", head_dim), ("memory_size", memory_size)):
            if int(value) < 1:
                raise ValueError(f"distill.{name}={value} must be >= 1")
        self.g_steps, self.n_rounds, self.synthesis_batch_size = int(g_steps), int(rounds), int(synthesis_batch_size)
        self.lr_g, self.g_betas, self.nz, self.ngf = float(lr_g), tuple(float(b) for b in g_betas), int(nz), int(ngf)
        self.w_bn, self.w_oh, self.w_adv = float(bn), float(oh), float(adv)
        self.w_cr, self.cr_T = float(cr), float(cr_T)
        self.head_dim, self.n_neg, self.feature_layers = int(head_dim), int(n_neg), feature_layers
        self.feature_reuse, self.local_scale, self.aug_pad = bool(feature_reuse), tuple(local_scale), int(aug_pad)
        self.memory = FeatureMemory(memory_size, full_memory_fix)
        object.__setattr__(self, "generator", None)  # setup(); never registered (own optimisers, not in DDP)
        object.__setattr__(self, "head", None)
        self.head_opt: Optional[torch.optim.Optimizer] = None
        self.hooks: Optional[BNStatHooks] = None
        self.means: Optional[InstanceMeans] = None
        self._batch: dict[str, Any] = {}

    def _feature_modules(self, teacher: nn.Module) -> list[nn.Module]:
        if self.feature_layers is None:
            return [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        named = dict(teacher.named_modules())
        missing = [n for n in self.feature_layers if n not in named]
        if missing:
            raise ValueError(f"distill.feature_layers: the teacher has no module {missing}; e.g. {list(named)[1:6]}")
        return [named[n] for n in self.feature_layers]

    def setup(self, env: SynthesisEnv) -> None:
        seed = peek_seed(env.rng)
        gen = build_seeded(lambda: Generator(self.nz, self.ngf, env.image_shape[1], env.image_shape[0]), seed,
                           env.device)
        object.__setattr__(self, "generator", gen)
        self.hooks = BNStatHooks(env.teacher, 0.0) if self.w_bn > 0 else None
        if self.w_cr > 0:
            self.means = InstanceMeans(self._feature_modules(env.teacher))
            with torch.no_grad():
                _, feat = self.means.run(env.teacher, torch.zeros((1, *env.image_shape), device=env.device))
            head = build_seeded(lambda: MLPHead(feat.shape[1], self.head_dim), seed + 1, env.device)
            object.__setattr__(self, "head", head)
            self.head_opt = torch.optim.Adam(head.parameters(), lr=self.lr_g)

    def _start_batch(self, env: SynthesisEnv) -> None:
        if not self.feature_reuse:
            dcgan_init(list(self.generator.modules()), env.rng)
        n = self.synthesis_batch_size
        z = torch.randn((n, self.nz), generator=env.rng).to(env.device).requires_grad_()
        targets = torch.randint(env.num_classes, (n,), generator=env.rng).sort()[0].to(env.device)
        groups = [{"params": self.generator.parameters()}, {"params": [z]}]
        opt = torch.optim.Adam(groups, self.lr_g, betas=self.g_betas)
        self._batch = {"z": z, "targets": targets, "opt": opt, "best": BestBatch()}

    def _views(self, env: SynthesisEnv, x: Tensor) -> tuple[Tensor, Tensor]:
        """The global view (crop with padding + flip) and the local view (resized crop + flip), normalised."""
        global_view = augment(x, env.mean, env.std, self.aug_pad, True, env.rng)
        local = random_resized_crop(x, self.local_scale, rng=env.rng)
        flip = (torch.rand(x.shape[0], generator=env.rng) < 0.5).to(x.device).view(-1, 1, 1, 1)
        local = torch.where(flip, local.flip(3), local)
        return global_view, normalize_float(local, env.mean, env.std)

    def synthesis_step(self, env: SynthesisEnv, ep: int, unit: int, warmup: int) -> SynthesisStep:
        step = unit % self.g_steps
        if step == 0:
            self._start_batch(env)
        b = self._batch
        self.generator.train()
        x = self.generator(b["z"])
        global_view, local_view = self._views(env, x)
        if self.hooks is not None:
            self.hooks.active = True
        try:
            if self.means is not None:
                t_out, global_feat = self.means.run(env.teacher, env.prep(global_view))
            else:
                t_out, global_feat = env.teacher(env.prep(global_view)), None
        finally:
            if self.hooks is not None:
                self.hooks.active = False
        terms: dict[str, Tensor] = {}
        if self.hooks is not None:
            terms["bn"] = self.w_bn * self.hooks.loss()
        terms["oh"] = self.w_oh * F.cross_entropy(t_out.float(), b["targets"])
        if self.w_adv > 0:
            terms["adv"] = self.w_adv * adversarial_loss(student_logits(env, global_view), t_out)
        feats = None
        if self.means is not None:
            _, local_feat = self.means.run(env.teacher, env.prep(local_view))
            cached = self.memory.sample(self.n_neg, env.rng).to(x.device)
            if cached.numel():
                cached_local, cached_global = cached.chunk(2, dim=1)
            else:  # nothing drawn: the memory is empty (or, officially, exactly full)
                cached_local, cached_global = local_feat[:0], global_feat[:0]
            proj = self.head(torch.cat([local_feat, cached_local, global_feat, cached_global]))
            proj_local, proj_global = proj.chunk(2, dim=0)
            split = self.memory.n_updates > 0
            terms["cr"] = self.w_cr * contrastive_loss(proj_local, proj_global, x.shape[0], self.cr_T, split)
            feats = torch.cat([local_feat, global_feat], dim=1)
        loss = torch.stack([v.float() for v in terms.values()]).sum()
        b["best"].offer(x, loss, feats)
        b["opt"].zero_grad(set_to_none=True)
        if self.head_opt is not None:
            self.head_opt.zero_grad(set_to_none=True)
        loss.backward()
        b["opt"].step()
        if self.head_opt is not None:
            self.head_opt.step()
        images = None
        if step == self.g_steps - 1:
            best = b["best"]
            images = (best.x, b["targets"])
            if best.extra is not None:
                self.memory.add(best.extra)
            self._batch = {}
        return SynthesisStep(loss.detach(), {k: v.detach() for k, v in terms.items()}, images)

    def synthesis_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"generator": {k: v.detach().cpu() for k, v in self.generator.state_dict().items()},
                                 "memory": self.memory.state_dict()}
        if self.head is not None:
            state["head"] = {k: v.detach().cpu() for k, v in self.head.state_dict().items()}
            state["head_opt"] = self.head_opt.state_dict()
        return state

    def load_synthesis_state(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.memory.load_state_dict(state["memory"])
        if self.head is not None:
            self.head.load_state_dict(state["head"])
            self.head_opt.load_state_dict(state["head_opt"])

    def describe(self) -> dict[str, Any]:
        return {"generator_params": n_params(self.generator), "head_params": n_params(self.head),
                "feature_memory": self.memory.n_updates}


__all__ = ["CMI", "FeatureMemory", "InstanceMeans", "MLPHead", "contrastive_loss", "random_resized_crop"]
