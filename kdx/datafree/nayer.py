"""NAYER (Tran et al., CVPR 2024): the noisy-layer generator and its synthesis (docs/methods.md, NAYER).

- :class:`NLGenerator`: label-text embedding → BatchNorm1d → per-chunk *noisy* ``Linear`` layers →
  ``Linear`` to ``2·ngf × (img/4)²`` → BN2d → (Upsample×2 → Conv3×3 → BN → LeakyReLU) ×2 → Conv3×3 →
  sigmoid. :meth:`NLGenerator.reinit_noisy` re-draws the noisy layers (weights N(0,1), bias 0) every
  synthesis loop; :meth:`NLGenerator.rebuild` is the official full re-initialisation every ``g_life``
  epochs (fresh default PyTorch init of everything).
- :class:`~kdx.datafree.common.BNStatHooks` (shared with the other synthesisers): forward hooks on every
  ``BatchNorm2d`` of the teacher that record the batch statistics of the layer *input* while synthesising, plus
  the momentum statistics (``bn_mmt``).
- :class:`NAYER`: the ``distill=nayer`` node, a :class:`~kdx.datafree.base.DataFreeStrategy`: the synthesis
  hyper-parameters, the label-text embeddings and the student's logit loss (any kdx strategy; KD with T = 20
  and no CE by default). Its config selects the data-free regime (``module=datafree``: warm-up, student steps,
  batch size, memory bank), which calls :meth:`NAYER.synthesis_step` for each generator step.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdx.datafree.augment import augment
from kdx.datafree.base import DataFreeStrategy, SynthesisEnv, SynthesisStep
from kdx.datafree.common import BNStatHooks, conv_decoder, draw_seed, seeded, student_logits
from kdx.datafree.losses import adversarial_loss, onehot_ce
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
        self.conv_blocks = conv_decoder(ngf, nc)

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
        with seeded(draw_seed(generator)):
            fresh = NLGenerator(self.label_emb.detach().cpu(), **self.params)
        self.load_state_dict(fresh.state_dict())


def synthesis_targets(num_classes: int, sbz: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Official ``generate_ys``: ``[0..C−1]`` repeated ``sbz // C`` times, then ``sbz % C`` random labels."""
    reps, rest = divmod(int(sbz), int(num_classes))
    parts = [torch.arange(num_classes) for _ in range(reps)]
    parts.append(torch.randint(num_classes, (rest,), generator=generator))
    return torch.cat(parts).to(torch.int64)


# --------------------------------------------------------------------------- the distill node


class NAYER(DataFreeStrategy):
    """``distill=nayer``: the noisy-layer generator's synthesis and the student's loss (``loss``).

    Per epoch ``ep`` (0-based; ``warmup`` is ``module.warmup``): ``gwp_loops`` synthesis loops during the
    warm-up, ``g_loops`` after it; each loop re-draws the noisy layers, takes a fresh Adam and runs ``g_steps``
    generator steps on ``L_G = bn·L_bn + oh·L_oh + adv·L_adv`` (the adversarial term after the warm-up only), and
    hands its lowest-loss batch to the memory bank. The whole generator is rebuilt when
    ``(ep − warmup) % g_life == 0`` or ``ep % g_life == 0``.

    Official quirks (switches; the defaults follow the paper's description):
      - ``student_train_after_first_loop``: the official code puts the student in train mode after the first
        synthesis loop of an epoch (so later loops' adversarial forwards update its BN running statistics).
        Default False: the student is in eval mode during all synthesis.
      - best-batch tracking: the official code initialises the best cost once per epoch but takes each loop's
        first iterate unconditionally *and overwrites the best cost with it*, so in effect every loop keeps its
        own lowest-loss batch. That is what this implementation does (no switch needed).
      - the bank's ``rounding: floor`` is the official PNG round trip (``uint8(255·x)``); see
        :class:`kdx.datafree.bank.MemoryBank`.
    """

    def __init__(
        self,
        loss: Strategy,
        lte: Any,
        g_steps: int = 40,
        g_life: int = 10,
        g_loops: int = 2,
        gwp_loops: int = 10,
        lr_g: float = 4e-3,
        g_betas: Sequence[float] = (0.5, 0.999),
        synthesis_batch_size: int = 400,
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
        teacher_transform=None,
    ) -> None:
        super().__init__(loss, teacher_transform)
        for name, value in (("g_steps", g_steps), ("g_life", g_life), ("synthesis_batch_size", synthesis_batch_size),
                            ("le_emb_size", le_emb_size), ("ngf", ngf)):
            if int(value) < 1:
                raise ValueError(f"distill.{name}={value} must be >= 1")
        for name, value in (("g_loops", g_loops), ("gwp_loops", gwp_loops)):
            if int(value) < 0:
                raise ValueError(f"distill.{name}={value} must be >= 0")
        if not 0 <= float(bn_mmt) < 1:
            raise ValueError(f"distill.bn_mmt={bn_mmt} must lie in [0, 1)")
        self.lte = lte
        self.g_steps, self.g_life = int(g_steps), int(g_life)
        self.g_loops, self.gwp_loops = int(g_loops), int(gwp_loops)
        self.lr_g, self.g_betas = float(lr_g), tuple(float(b) for b in g_betas)
        self.synthesis_batch_size = int(synthesis_batch_size)
        self.w_bn, self.w_oh, self.w_adv, self.bn_mmt = float(bn), float(oh), float(adv), float(bn_mmt)
        self.ngf, self.le_emb_size, self.nl = int(ngf), int(le_emb_size), nl
        self.aug_pad, self.aug_flip = int(aug_pad), bool(aug_flip)
        self.student_train_after_first_loop = bool(student_train_after_first_loop)
        # built by setup(); held outside the registered submodules (own optimiser, not in DDP)
        object.__setattr__(self, "generator", None)
        self.label_emb: Optional[Tensor] = None  # prepare()
        self.hooks: Optional[BNStatHooks] = None
        self._loop: dict[str, Any] = {}

    # ---- the schedule (ep is the 0-based epoch index, as the official counter)
    def rebuild_due(self, ep: int, warmup: int) -> bool:
        """Full generator re-initialisation at the start of epoch ``ep`` (official condition)."""
        return (ep - warmup) % self.g_life == 0 or ep % self.g_life == 0

    def loops(self, ep: int, warmup: int) -> int:
        return self.gwp_loops if ep < warmup else self.g_loops

    def synthesis_units(self, ep: int, warmup: int) -> int:
        return self.loops(ep, warmup) * self.g_steps

    def images_per_epoch(self, ep: int, warmup: int) -> int:
        return self.loops(ep, warmup) * self.synthesis_batch_size

    # ---- synthesis
    def prepare(self, class_names: list[str], dataset: str, num_classes: int) -> None:
        """The label-text embeddings of the classes (``distill.lte``): a missing table or encoder stops here."""
        label_emb = torch.as_tensor(self.lte(class_names, dataset), dtype=torch.float32)
        if label_emb.shape[0] != num_classes:
            raise ValueError(f"the label-text embeddings have {label_emb.shape[0]} rows for {num_classes} classes "
                             "(distill.lte)")
        self.label_emb = label_emb

    def setup(self, env: SynthesisEnv) -> None:
        gen = NLGenerator(self.label_emb, ngf=self.ngf, img_size=env.image_shape[1], nc=env.image_shape[0],
                          nl=self.nl or env.num_classes, le_emb_size=self.le_emb_size, sbz=self.synthesis_batch_size)
        object.__setattr__(self, "generator", gen.to(env.device))
        self.hooks = BNStatHooks(env.teacher, self.bn_mmt) if self.w_bn > 0 else None
        if self.hooks is not None:
            self.hooks.to(env.device)

    def on_epoch_start(self, env: SynthesisEnv, ep: int, warmup: int) -> None:
        if self.rebuild_due(ep, warmup):
            self.generator.rebuild(env.rng)
            self.generator.to(env.device)

    def _start_loop(self, env: SynthesisEnv, loop: int) -> None:
        self.generator.reinit_noisy(env.rng)
        targets = synthesis_targets(env.num_classes, self.synthesis_batch_size, env.rng).to(env.device)
        self._loop = {
            "targets": targets,
            "onehot": F.one_hot(targets, env.num_classes).float(),
            "opt": torch.optim.Adam(self.generator.parameters(), lr=self.lr_g, betas=self.g_betas),
            "best_x": None,
            "best_cost": None,
            # official quirk (off by default): the student is switched to train mode after the first loop
            "student_train": bool(self.student_train_after_first_loop and loop > 0),
        }

    def synthesis_step(self, env: SynthesisEnv, ep: int, unit: int, warmup: int) -> SynthesisStep:
        loop, step = divmod(unit, self.g_steps)
        if step == 0:
            self._start_loop(env, loop)
        st = self._loop
        self.generator.train()
        x = self.generator(st["targets"])
        x_aug = augment(x, env.mean, env.std, self.aug_pad, self.aug_flip, env.rng)
        if self.hooks is not None:
            self.hooks.active = True
        try:
            t_logits = env.teacher(env.prep(x_aug))
        finally:
            if self.hooks is not None:
                self.hooks.active = False
        terms: dict[str, Tensor] = {}
        if self.hooks is not None:
            terms["bn"] = self.w_bn * self.hooks.loss()
        terms["oh"] = self.w_oh * onehot_ce(t_logits, st["onehot"])
        if self.w_adv > 0 and ep >= warmup:  # gradients to the images only, never to the student
            terms["adv"] = self.w_adv * adversarial_loss(student_logits(env, x_aug, st["student_train"]), t_logits)
        loss = torch.stack([v.float() for v in terms.values()]).sum()
        with torch.no_grad():  # the lowest-loss batch of this loop (the first iterate is always taken)
            if st["best_x"] is None:
                st["best_x"], st["best_cost"] = x.detach().clone(), loss.detach().clone()
            else:
                better = loss.detach() < st["best_cost"]
                st["best_x"] = torch.where(better, x.detach(), st["best_x"])
                st["best_cost"] = torch.minimum(st["best_cost"], loss.detach())
        opt = st["opt"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        images = None
        if step == self.g_steps - 1:  # the loop ends: its best batch goes to the bank
            if self.hooks is not None:
                self.hooks.update_momentum()  # from the loop's last forward, as the official hooks
                self.hooks.clear()
            images = (st["best_x"], st["targets"])
            self._loop = {}
        return SynthesisStep(loss.detach(), {k: v.detach() for k, v in terms.items()}, images)

    def synthesis_state(self) -> dict[str, Any]:
        return {
            "generator": {k: v.detach().cpu() for k, v in self.generator.state_dict().items()},
            "bn_mmt": self.hooks.state_dict() if self.hooks is not None else None,
        }

    def load_synthesis_state(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        if self.hooks is not None and state.get("bn_mmt") is not None:
            self.hooks.load_state_dict(state["bn_mmt"])

    def describe(self) -> dict[str, Any]:
        gen = self.generator
        return {"generator_params": None if gen is None else sum(p.numel() for p in gen.parameters()),
                "label_embedding_dim": None if gen is None else int(gen.label_emb.shape[1])}


__all__ = ["BNStatHooks", "NAYER", "NLGenerator", "synthesis_targets"]
