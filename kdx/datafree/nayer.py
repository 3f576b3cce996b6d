"""NAYER (Tran et al., CVPR 2024): the noisy-layer generator and the synthesis schedule (METHODS.md §6).

- :class:`NLGenerator`: label-text embedding → BatchNorm1d → per-chunk *noisy* ``Linear`` layers →
  ``Linear`` to ``2·ngf × (img/4)²`` → BN2d → (Upsample×2 → Conv3×3 → BN → LeakyReLU) ×2 → Conv3×3 →
  sigmoid. :meth:`NLGenerator.reinit_noisy` re-draws the noisy layers (weights N(0,1), bias 0) every
  synthesis loop; :meth:`NLGenerator.rebuild` is the official full re-initialisation every ``g_life``
  epochs (fresh default PyTorch init of everything).
- :class:`BNStatHooks`: forward hooks on every ``BatchNorm2d`` of the teacher that record the batch
  statistics of the layer *input* while synthesising, plus the momentum statistics (``bn_mmt``).
- :class:`NAYER`: the ``distill=nayer`` node: every hyper-parameter, the student's logit loss (any kdx
  strategy; KD with T = 20 and no CE by default), the label-text embeddings, the student optimiser and
  schedule, and the memory bank. It is a :class:`~kdx.distill.base.Strategy` (the student's loss terms
  are its loss terms) with ``data_free = True``: the runner then builds
  :class:`kdx.datafree.module.DataFreeModule` around it.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from kdx.datafree.losses import Moments, batch_moments, bn_statistics_loss
from kdx.distill.base import Strategy

# --------------------------------------------------------------------------- generator


class NLGenerator(nn.Module):
    """The noisy-layer generator of NAYER (official ``NLGenerator``, CIFAR version).

    Args:
        label_emb: ``[num_classes, le_size]`` label-text embeddings (a fixed buffer, not trained).
        ngf: base width (the first feature map has ``2·ngf`` channels).
        img_size: output side (a multiple of 4); the first map is ``img_size // 4`` square.
        nc: output channels.
        nl: rows per noisy layer (official: the number of classes).
        le_emb_size: width of the noisy layers' output.
        sbz: synthesis batch size; ``ceil(sbz / nl)`` noisy layers are built.
    """

    def __init__(
        self,
        label_emb: Tensor,
        ngf: int = 64,
        img_size: int = 32,
        nc: int = 3,
        nl: Optional[int] = None,
        le_emb_size: int = 1000,
        sbz: int = 400,
    ) -> None:
        super().__init__()
        label_emb = torch.as_tensor(label_emb, dtype=torch.float32)
        if label_emb.ndim != 2:
            raise ValueError(f"label_emb must be [classes, dim], got shape {tuple(label_emb.shape)}")
        if img_size % 4:
            raise ValueError(f"img_size={img_size} must be a multiple of 4 (two ×2 upsamplings)")
        self.params = dict(ngf=ngf, img_size=img_size, nc=nc, nl=nl, le_emb_size=le_emb_size, sbz=sbz)
        self.register_buffer("label_emb", label_emb.clone(), persistent=False)
        le_size = label_emb.shape[1]
        self.nl = int(nl or label_emb.shape[0])
        self.sbz = int(sbz)
        self.nle = int(math.ceil(self.sbz / self.nl))
        self.init_size = img_size // 4
        self.n1 = nn.BatchNorm1d(le_size)
        self.le1 = nn.ModuleList([nn.Linear(le_size, le_emb_size) for _ in range(self.nle)])
        self.l1 = nn.Sequential(nn.Linear(le_emb_size, ngf * 2 * self.init_size**2))
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(ngf * 2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf * 2, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, nc, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    @property
    def noisy_layers(self) -> nn.ModuleList:
        return self.le1

    def forward(self, targets: Tensor) -> Tensor:
        """Images in [0, 1], ``[len(targets), nc, img_size, img_size]``; row chunk i uses noisy layer i."""
        if targets.shape[0] > self.nle * self.nl:
            raise ValueError(
                f"{targets.shape[0]} targets but the generator has {self.nle} noisy layers of {self.nl} rows "
                f"(built for synthesis_batch_size={self.sbz})"
            )
        le = self.n1(self.label_emb[targets])
        chunks = [self.le1[i](le[i * self.nl : (i + 1) * self.nl]) for i in range(self.nle) if i * self.nl < le.shape[0]]
        out = self.l1(torch.cat(chunks))
        out = out.view(out.shape[0], -1, self.init_size, self.init_size)
        return self.conv_blocks(out)

    @torch.no_grad()
    def reinit_noisy(self, generator: Optional[torch.Generator] = None) -> None:
        """Noisy layers: weights N(0, 1), biases 0 (official ``re_init_le``); nothing else changes."""
        for layer in self.le1:
            w = torch.randn(layer.weight.shape, generator=generator)
            layer.weight.copy_(w.to(layer.weight))
            layer.bias.zero_()

    @torch.no_grad()
    def rebuild(self, generator: Optional[torch.Generator] = None) -> None:
        """Fresh default PyTorch initialisation of every layer (official ``reinit()``), in place.

        A new generator is built on the CPU with a seed drawn from ``generator`` and its state copied in,
        so the result does not depend on the device, and the parameters keep their identity.
        """
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = NLGenerator(self.label_emb.detach().cpu(), **self.params)
        self.load_state_dict(fresh.state_dict())


def synthesis_targets(num_classes: int, sbz: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Official ``generate_ys``: ``[0..C−1]`` repeated ``sbz // C`` times, then ``sbz % C`` random labels."""
    reps, rest = divmod(int(sbz), int(num_classes))
    parts = [torch.arange(num_classes) for _ in range(reps)]
    parts.append(torch.randint(num_classes, (rest,), generator=generator))
    return torch.cat(parts).to(torch.int64)


# --------------------------------------------------------------------------- BN statistics hooks


class BNStatHooks:
    """Forward hooks on every ``BatchNorm2d`` of ``net`` recording the batch moments of its input.

    Only while :attr:`active` (synthesis steps); otherwise the hooks do nothing. :meth:`loss` is
    :func:`~kdx.datafree.losses.bn_statistics_loss` against the layers' running statistics, with the
    momentum statistics once they exist (``momentum > 0``); :meth:`update_momentum` folds the last
    recorded batch into them (``mmt ← m·mmt + (1 − m)·current``, the first call initialises them).
    """

    def __init__(self, net: nn.Module, momentum: float = 0.9) -> None:
        self.layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError(
                "NAYER's BN-statistics loss needs a teacher with BatchNorm2d layers; this teacher has none "
                "(set distill.bn=0 to synthesise without it)."
            )
        self.momentum = float(momentum)
        self.active = False
        self.current: list[Optional[Moments]] = [None] * len(self.layers)
        self.mmt: list[Optional[Moments]] = [None] * len(self.layers)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int) -> Callable:
        def hook(module, inputs, output):
            if self.active:
                self.current[i] = batch_moments(inputs[0])
        return hook

    def loss(self) -> Tensor:
        if any(c is None for c in self.current):
            raise RuntimeError("BN statistics were not recorded: run the teacher with the hooks active first")
        running = [(m.running_mean, m.running_var) for m in self.layers]
        mmt = self.mmt if self.momentum > 0 else None
        return bn_statistics_loss(self.current, running, mmt, self.momentum)

    @torch.no_grad()
    def update_momentum(self) -> None:
        if self.momentum <= 0:
            return
        for i, cur in enumerate(self.current):
            if cur is None:
                continue
            mean, var = cur[0].detach(), cur[1].detach()
            if self.mmt[i] is None:
                self.mmt[i] = (mean.clone(), var.clone())
            else:
                m = self.momentum
                self.mmt[i] = (m * self.mmt[i][0] + (1 - m) * mean, m * self.mmt[i][1] + (1 - m) * var)

    def clear(self) -> None:
        self.current = [None] * len(self.layers)

    def state_dict(self) -> list[Optional[tuple[Tensor, Tensor]]]:
        return [None if m is None else (m[0].detach().cpu(), m[1].detach().cpu()) for m in self.mmt]

    def load_state_dict(self, state: Sequence[Optional[Sequence[Tensor]]]) -> None:
        if len(state) != len(self.layers):
            raise ValueError(f"momentum statistics for {len(state)} BN layers, the teacher has {len(self.layers)}")
        dev = self.layers[0].running_mean.device
        self.mmt = [None if s is None else (s[0].to(dev), s[1].to(dev)) for s in state]

    def to(self, device) -> None:
        self.mmt = [None if m is None else (m[0].to(device), m[1].to(device)) for m in self.mmt]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------- the distill node


class NAYER(Strategy):
    """``distill=nayer``: the settings of data-free distillation and the student's loss.

    The student's loss terms are ``loss``'s (KD at T = 20 with no CE by default; any kdx logit
    strategy, e.g. ``kdx.distill.dkd.DKD``). Labels seen by that loss are the classes the generator was
    asked for. See METHODS.md §6 and the README for every argument; the defaults are the official
    CIFAR-100 settings.

    Official quirks (switches; the defaults follow the paper's description):
      - ``student_train_after_first_loop``: the official code puts the student in train mode after
        the first synthesis loop of an epoch (so later loops' adversarial forwards update its BN
        running statistics). Default False: the student is in eval mode during all synthesis.
      - best-batch tracking: the official code initialises the best cost once per epoch but takes each
        loop's first iterate unconditionally *and overwrites the best cost with it*, so in effect every
        loop keeps its own lowest-loss batch. That is what this implementation does (no switch needed).
      - the bank's ``rounding: floor`` is the official PNG round trip (``uint8(255·x)``); see
        :class:`kdx.datafree.bank.MemoryBank`.
    """

    data_free = True
    needs_teacher = True

    def __init__(
        self,
        loss: Strategy,
        lte: Any,
        optim: Callable[..., torch.optim.Optimizer],
        scheduler: Optional[Callable[..., Any]] = None,
        bank: Optional[Callable[..., Any]] = None,
        warmup: int = 20,
        g_steps: int = 40,
        g_life: int = 10,
        g_loops: int = 2,
        gwp_loops: int = 10,
        lr_g: float = 4e-3,
        g_betas: Sequence[float] = (0.5, 0.999),
        synthesis_batch_size: int = 400,
        batch_size: int = 512,
        kd_steps: int = 400,
        bn: float = 10.0,
        oh: float = 0.5,
        adv: float = 1.33,
        bn_mmt: float = 0.9,
        ngf: int = 64,
        le_emb_size: int = 1000,
        nl: Optional[int] = None,
        aug_pad: int = 4,
        aug_flip: bool = True,
        student_train_after_first_loop: bool = False,
        grid_classes: int = 10,
        grid_per_class: int = 8,
        teacher_transform=None,
    ) -> None:
        super().__init__(teacher_transform)
        for name, value in (("g_steps", g_steps), ("g_life", g_life), ("synthesis_batch_size", synthesis_batch_size),
                            ("batch_size", batch_size), ("le_emb_size", le_emb_size), ("ngf", ngf)):
            if int(value) < 1:
                raise ValueError(f"distill.{name}={value} must be >= 1")
        for name, value in (("warmup", warmup), ("g_loops", g_loops), ("gwp_loops", gwp_loops), ("kd_steps", kd_steps)):
            if int(value) < 0:
                raise ValueError(f"distill.{name}={value} must be >= 0")
        if not 0 <= float(bn_mmt) < 1:
            raise ValueError(f"distill.bn_mmt={bn_mmt} must lie in [0, 1)")
        self.loss = loss
        self.lte = lte
        self.optim_factory, self.scheduler_factory, self.bank_factory = optim, scheduler, bank
        self.warmup, self.g_steps, self.g_life = int(warmup), int(g_steps), int(g_life)
        self.g_loops, self.gwp_loops = int(g_loops), int(gwp_loops)
        self.lr_g, self.g_betas = float(lr_g), tuple(float(b) for b in g_betas)
        self.synthesis_batch_size, self.batch_size, self.kd_steps = int(synthesis_batch_size), int(batch_size), int(kd_steps)
        self.w_bn, self.w_oh, self.w_adv, self.bn_mmt = float(bn), float(oh), float(adv), float(bn_mmt)
        self.ngf, self.le_emb_size, self.nl = int(ngf), int(le_emb_size), nl
        self.aug_pad, self.aug_flip = int(aug_pad), bool(aug_flip)
        self.student_train_after_first_loop = bool(student_train_after_first_loop)
        self.grid_classes, self.grid_per_class = int(grid_classes), int(grid_per_class)

    # ---- the student's loss is the nested strategy's
    def transform_teacher(self, logits_teacher: Tensor, target: Tensor) -> Tensor:
        return self.loss.transform_teacher(super().transform_teacher(logits_teacher, target), target)

    def loss_terms(self, student, teacher, batch, epoch):
        return self.loss.loss_terms(student, teacher, batch, epoch)

    # ---- the schedule (ep is the 0-based epoch index, as the official counter)
    def rebuild_due(self, ep: int) -> bool:
        """Full generator re-initialisation at the start of epoch ``ep`` (official condition)."""
        return (ep - self.warmup) % self.g_life == 0 or ep % self.g_life == 0

    def loops(self, ep: int) -> int:
        return self.gwp_loops if ep < self.warmup else self.g_loops

    def distills(self, ep: int) -> bool:
        """Student steps (and the adversarial term) from epoch ``warmup`` on (0-based)."""
        return ep >= self.warmup

    def generator_steps(self, ep: int) -> int:
        return self.loops(ep) * self.g_steps

    def student_steps(self, ep: int) -> int:
        return self.kd_steps if self.distills(ep) else 0

    def units(self, ep: int) -> int:
        """Training-loop iterations of epoch ``ep``: generator steps, then student steps."""
        return self.generator_steps(ep) + self.student_steps(ep)

    def bank_images(self, epochs: int) -> int:
        """Images a run of ``epochs`` epochs adds to the bank (one best batch per loop)."""
        return sum(self.loops(e) for e in range(epochs)) * self.synthesis_batch_size


__all__ = ["BNStatHooks", "NAYER", "NLGenerator", "synthesis_targets"]
