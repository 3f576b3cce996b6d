"""Fast (Fang et al., AAAI 2022: "Up to 100× faster data-free knowledge distillation") as the NAYER repository
runs it (``distill=fast``).

Official code: tmtuan1307/NAYER ``datafree/synthesis/fast_meta.py`` (``FastMetaSynthesizer``; zju-vipa/Fast-Datafree
has the same without its debugging spreadsheet), built by Fast-Datafree's ``datafree_kd.py`` (``--method
fast_meta``) and run by its ``scripts/fast_cifar.sh``. A persistent *meta* generator (the official ``Generator``,
nz 256) holds the learned initialisation. Per synthesis (``rounds`` per epoch) a copy (the fast generator) and a
fresh ``z`` (random, unsorted targets) are optimised for ``g_steps`` steps by Adam over the copy (lr_g) and ``z``
(lr_z), betas 0.5/0.999, on ``L = bn·L_bn + oh·CE(t, y) + adv·L_adv`` (NAYER's terms: BN statistics with momentum
``bn_mmt`` folded in after each synthesis, the decision-adversarial KL), teacher and student on a crop with
padding 4 + flip of the images. The meta step (``meta: fomaml``, the official ``is_maml=1``): the fast generator's
gradients of every inner step are summed into the meta generator's, and one Adam step (lr ``lr_g·g_steps``,
betas 0.5/0.999, persistent) is taken after the last; ``meta: reptile`` instead steps on
``reptile_scale·(θ_meta − θ_fast)``. The lowest-loss batch goes to the bank.

Official schedule details, kept:

- the synthesiser counts its calls from 1 and turns the adversarial term on from call ``warmup`` (``adv_from_call``),
  one epoch before the student's first step; ``adv_from_call: false`` turns it on with the student.
- ``reset_l0`` (official script: 1) re-draws ``l1.0`` and ``conv_blocks.0`` (the first BatchNorm: its *weight* too)
  as N(0, 0.02), biases 0, at call ``reset_l0_at + warmup`` (official 120 + 20).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F

from kdx.datafree.augment import augment
from kdx.datafree.base import RoundSynthesis, SynthesisEnv, SynthesisStep
from kdx.datafree.common import BestBatch, BNStatHooks, Generator, build_seeded, n_params, peek_seed, student_logits
from kdx.datafree.losses import adversarial_loss
from kdx.distill.base import Strategy


@torch.no_grad()
def reset_l0(gen: torch.nn.Module, rng: torch.Generator) -> None:
    """The official ``reset_l0``: ``l1.0`` and ``conv_blocks.0`` weights N(0, 0.02), biases 0."""
    for name, m in gen.named_modules():
        if name in ("l1.0", "conv_blocks.0"):
            m.weight.copy_(torch.randn(m.weight.shape, generator=rng) * 0.02)
            m.bias.zero_()


@torch.no_grad()
def add_meta_grads(meta: torch.nn.Module, fast: torch.nn.Module) -> None:
    """First-order MAML (official ``fomaml_grad``): ``grad(meta) += grad(fast)``."""
    for p, q in zip(meta.parameters(), fast.parameters()):
        g = q.grad if q.grad is not None else torch.zeros_like(q)
        p.grad = g.clone() if p.grad is None else p.grad + g


@torch.no_grad()
def set_reptile_grads(meta: torch.nn.Module, fast: torch.nn.Module, scale: float = 67.0) -> None:
    """Reptile (official ``reptile_grad``): ``grad(meta) = scale·(θ_meta − θ_fast)`` (after ``zero_grad``)."""
    for p, q in zip(meta.parameters(), fast.parameters()):
        p.grad = scale * (p - q)


class Fast(RoundSynthesis):
    """``distill=fast``: see the module docstring."""

    def __init__(
        self,
        loss: Strategy,
        g_steps: int = 2,
        rounds: int = 1,
        lr_g: float = 5e-3,
        lr_z: float = 0.015,
        g_betas: tuple[float, float] = (0.5, 0.999),
        synthesis_batch_size: int = 256,
        nz: int = 256,
        ngf: int = 64,
        bn: float = 10.0,
        oh: float = 0.5,
        adv: float = 1.33,
        bn_mmt: float = 0.9,
        meta: str = "fomaml",
        reptile_scale: float = 67.0,
        reset_l0: bool = True,
        reset_l0_at: int = 120,
        adv_from_call: bool = True,
        aug_pad: int = 4,
        teacher_transform=None,
    ) -> None:
        super().__init__(loss, teacher_transform)
        for name, value in (("g_steps", g_steps), ("rounds", rounds), ("synthesis_batch_size", synthesis_batch_size),
                            ("nz", nz), ("ngf", ngf)):
            if int(value) < 1:
                raise ValueError(f"distill.{name}={value} must be >= 1")
        if meta not in ("fomaml", "reptile"):
            raise ValueError(f"distill.meta={meta!r}: use fomaml (official is_maml=1) or reptile (is_maml=0)")
        if not 0 <= float(bn_mmt) < 1:
            raise ValueError(f"distill.bn_mmt={bn_mmt} must lie in [0, 1)")
        self.g_steps, self.n_rounds, self.synthesis_batch_size = int(g_steps), int(rounds), int(synthesis_batch_size)
        self.lr_g, self.lr_z, self.g_betas = float(lr_g), float(lr_z), tuple(float(b) for b in g_betas)
        self.nz, self.ngf = int(nz), int(ngf)
        self.w_bn, self.w_oh, self.w_adv, self.bn_mmt = float(bn), float(oh), float(adv), float(bn_mmt)
        self.meta, self.reptile_scale = meta, float(reptile_scale)
        self.reset_l0, self.reset_l0_at, self.adv_from_call = bool(reset_l0), int(reset_l0_at), bool(adv_from_call)
        self.aug_pad = int(aug_pad)
        object.__setattr__(self, "generator", None)  # the meta generator: setup(); never registered
        self.meta_opt: Optional[torch.optim.Optimizer] = None
        self.hooks: Optional[BNStatHooks] = None
        self._batch: dict[str, Any] = {}

    def call_index(self, ep: int, unit: int) -> int:
        """The official 1-based count of synthesis calls (``self.ep``) at work unit ``unit`` of epoch ``ep``."""
        return ep * self.n_rounds + unit // self.g_steps + 1

    def adv_on(self, ep: int, unit: int, warmup: int) -> bool:
        return self.w_adv > 0 and (self.call_index(ep, unit) >= warmup if self.adv_from_call else ep >= warmup)

    def setup(self, env: SynthesisEnv) -> None:
        gen = build_seeded(lambda: Generator(self.nz, self.ngf, env.image_shape[1], env.image_shape[0]),
                           peek_seed(env.rng), env.device)
        object.__setattr__(self, "generator", gen.train())
        self.meta_opt = torch.optim.Adam(gen.parameters(), self.lr_g * self.g_steps, betas=self.g_betas)
        self.hooks = BNStatHooks(env.teacher, self.bn_mmt) if self.w_bn > 0 else None

    def _start_batch(self, env: SynthesisEnv, ep: int, unit: int, warmup: int) -> None:
        if self.reset_l0 and self.call_index(ep, unit) == self.reset_l0_at + warmup:
            reset_l0(self.generator, env.rng)
        n = self.synthesis_batch_size
        z = torch.randn((n, self.nz), generator=env.rng).to(env.device).requires_grad_()
        targets = torch.randint(env.num_classes, (n,), generator=env.rng).to(env.device)
        fast = copy.deepcopy(self.generator).train()
        opt = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": self.lr_z}], lr=self.lr_g,
                               betas=self.g_betas)
        self._batch = {"z": z, "targets": targets, "fast": fast, "opt": opt, "best": BestBatch()}

    def synthesis_step(self, env: SynthesisEnv, ep: int, unit: int, warmup: int) -> SynthesisStep:
        step = unit % self.g_steps
        if step == 0:
            self._start_batch(env, ep, unit, warmup)
        b = self._batch
        x = b["fast"](b["z"])
        x_aug = augment(x, env.mean, env.std, self.aug_pad, True, env.rng)
        if self.hooks is not None:
            self.hooks.active = True
        try:
            t_out = env.teacher(env.prep(x_aug))
        finally:
            if self.hooks is not None:
                self.hooks.active = False
        terms = {}
        if self.hooks is not None:
            terms["bn"] = self.w_bn * self.hooks.loss()
        terms["oh"] = self.w_oh * F.cross_entropy(t_out.float(), b["targets"])
        if self.adv_on(ep, unit, warmup):
            terms["adv"] = self.w_adv * adversarial_loss(student_logits(env, x_aug), t_out)
        loss = torch.stack([v.float() for v in terms.values()]).sum()
        b["best"].offer(x, loss)
        b["opt"].zero_grad(set_to_none=True)
        loss.backward()
        last = step == self.g_steps - 1
        if self.meta == "fomaml":
            if step == 0:
                self.meta_opt.zero_grad(set_to_none=True)
            add_meta_grads(self.generator, b["fast"])
            if last:
                self.meta_opt.step()
        b["opt"].step()
        images = None
        if last:
            if self.hooks is not None:
                self.hooks.update_momentum()  # from the last inner step's forward, as the official hooks
                self.hooks.clear()
            if self.meta == "reptile":
                self.meta_opt.zero_grad(set_to_none=True)
                set_reptile_grads(self.generator, b["fast"], self.reptile_scale)
                self.meta_opt.step()
            images = (b["best"].x, b["targets"])
            self._batch = {}
        return SynthesisStep(loss.detach(), {k: v.detach() for k, v in terms.items()}, images)

    def synthesis_state(self) -> dict[str, Any]:
        return {"generator": {k: v.detach().cpu() for k, v in self.generator.state_dict().items()},
                "meta_opt": self.meta_opt.state_dict(),
                "bn_mmt": self.hooks.state_dict() if self.hooks is not None else None}

    def load_synthesis_state(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.meta_opt.load_state_dict(state["meta_opt"])
        if self.hooks is not None and state.get("bn_mmt") is not None:
            self.hooks.load_state_dict(state["bn_mmt"])

    def describe(self) -> dict[str, Any]:
        return {"generator_params": n_params(self.generator)}


__all__ = ["Fast", "add_meta_grads", "reset_l0", "set_reptile_grads"]
