"""DeepInversion (Yin et al., CVPR 2020) as the NAYER repository runs it (``distill=deepinv``).

Official code: tmtuan1307/NAYER ``datafree/synthesis/deepinversion.py`` (``DeepInvSyntheiszer``, identical in
zju-vipa/Fast-Datafree, whose ``datafree_kd.py`` and ``scripts/deepinv_cifar.sh`` build and run it). Per batch
(``rounds`` per epoch), the images themselves are optimised: ``z ~ N(0, 1)`` in the *normalised* image space,
targets drawn at random and sorted, Adam(lr_g, betas 0.5/0.99) for ``g_steps`` steps on

    L = bn·(Σ_l BN_l(teacher) − student_bn·Σ_l BN_l(student)) + oh·CE(t, y) + adv·(−JS_T=3(s, t))
        + tv·TV(x) + l2·‖x‖₂

with the teacher and student run on a jittered copy (:func:`jitter_and_flip`: one random roll of up to H/8 pixels
and one coin-flip horizontal flip for the whole batch) and the images clamped to the valid range after every step.
The student's BN term (its batch statistics on the images, eval mode) is what the adversarial forward records.

Quirks of the official code, kept as defaults:

- ``keep_best: false``: the official ``best_inputs = inputs.data`` aliases the optimised tensor, so the "best"
  batch handed to the bank is always the last iterate (after its clamp); ``true`` keeps the lowest-loss one.
- ``tv: 0.0``: Fast-Datafree's driver passes ``tv=0.0`` (the synthesiser's own default is 1e-5; the CMI
  repository's driver passes 1e-3).
- ``adv = 0`` fails in the official code (``loss_oh`` used before it is set); here it drops the student forward
  and the student's BN term.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.datafree.base import RoundSynthesis, SynthesisEnv, SynthesisStep
from kdx.datafree.common import BNStatHooks, clip_normalised, denormalise, image_prior_tv, jsdiv, student_logits
from kdx.distill.base import Strategy


def jitter_and_flip(x: Tensor, lim: float = 1 / 8, flip: bool = True, rng=None) -> Tensor:
    """One random ``torch.roll`` of the batch by ``(dy, dx)`` ∈ [−⌊H·lim⌋, ⌊H·lim⌋] × [−⌊W·lim⌋, ⌊W·lim⌋], then
    (with probability ½, when ``flip``) one horizontal flip of the whole batch (official ``jitter_and_flip``)."""
    ly, lx = int(x.shape[-2] * lim), int(x.shape[-1] * lim)
    dy = int(torch.randint(-ly, ly + 1, (1,), generator=rng))
    dx = int(torch.randint(-lx, lx + 1, (1,), generator=rng))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if float(torch.rand(1, generator=rng)) > 0.5 and flip:
        x = torch.flip(x, dims=(3,))
    return x


class DeepInversion(RoundSynthesis):
    """``distill=deepinv``: image optimisation against the teacher's BN statistics (see the module docstring)."""

    def __init__(
        self,
        loss: Strategy,
        g_steps: int = 1000,
        rounds: int = 1,
        lr_g: float = 0.1,
        g_betas: tuple[float, float] = (0.5, 0.99),
        synthesis_batch_size: int = 256,
        bn: float = 10.0,
        oh: float = 1.0,
        adv: float = 1.0,
        adv_T: float = 3.0,
        student_bn: float = 0.001,
        tv: float = 0.0,
        l2: float = 0.0,
        jitter: float = 1 / 8,
        flip: bool = True,
        keep_best: bool = False,
        teacher_transform=None,
    ) -> None:
        super().__init__(loss, teacher_transform)
        for name, value in (("g_steps", g_steps), ("rounds", rounds), ("synthesis_batch_size", synthesis_batch_size)):
            if int(value) < 1:
                raise ValueError(f"distill.{name}={value} must be >= 1")
        self.g_steps, self.n_rounds, self.synthesis_batch_size = int(g_steps), int(rounds), int(synthesis_batch_size)
        self.lr_g, self.g_betas = float(lr_g), tuple(float(b) for b in g_betas)
        self.w_bn, self.w_oh, self.w_adv, self.adv_T = float(bn), float(oh), float(adv), float(adv_T)
        self.w_student_bn, self.w_tv, self.w_l2 = float(student_bn), float(tv), float(l2)
        self.jitter, self.flip, self.keep_best = float(jitter), bool(flip), bool(keep_best)
        self.hooks = self.student_hooks = None
        self._batch: dict[str, Any] = {}

    def setup(self, env: SynthesisEnv) -> None:
        self.hooks = BNStatHooks(env.teacher, 0.0) if self.w_bn > 0 else None
        use_student = self.w_bn > 0 and self.w_student_bn > 0 and self.w_adv > 0
        self.student_hooks = BNStatHooks(env.student, 0.0, "distill.student_bn") if use_student else None

    def _start_batch(self, env: SynthesisEnv) -> None:
        n = self.synthesis_batch_size
        x = torch.randn((n, *env.image_shape), generator=env.rng).to(env.device).requires_grad_()
        targets = torch.randint(env.num_classes, (n,), generator=env.rng).sort()[0].to(env.device)
        opt = torch.optim.Adam([x], self.lr_g, betas=self.g_betas)
        self._batch = {"x": x, "targets": targets, "opt": opt, "best": None, "best_cost": None}

    def losses(self, env: SynthesisEnv, x: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """The weighted terms of one step on the (normalised) images ``x``."""
        x_aug = jitter_and_flip(x, self.jitter, self.flip, env.rng)
        hooks = [h for h in (self.hooks, self.student_hooks) if h is not None]
        for h in hooks:
            h.active = True
        try:
            t_out = env.teacher(env.prep(x_aug))
            s_out = student_logits(env, x_aug) if self.w_adv > 0 else None
        finally:
            for h in hooks:
                h.active = False
        terms: dict[str, Tensor] = {}
        if self.hooks is not None:
            bn = self.hooks.loss()
            if self.student_hooks is not None:
                bn = bn - self.w_student_bn * self.student_hooks.loss()
            terms["bn"] = self.w_bn * bn
        terms["oh"] = self.w_oh * F.cross_entropy(t_out.float(), targets)
        if s_out is not None:
            terms["adv"] = self.w_adv * -jsdiv(s_out, t_out, T=self.adv_T)
        if self.w_tv > 0:
            terms["tv"] = self.w_tv * image_prior_tv(x)
        if self.w_l2 > 0:
            terms["l2"] = self.w_l2 * torch.linalg.vector_norm(x.float())
        return terms

    def synthesis_step(self, env: SynthesisEnv, ep: int, unit: int, warmup: int) -> SynthesisStep:
        step = unit % self.g_steps
        if step == 0:
            self._start_batch(env)
        b = self._batch
        terms = self.losses(env, b["x"], b["targets"])
        loss = torch.stack([v.float() for v in terms.values()]).sum()
        if self.keep_best and (b["best_cost"] is None or float(loss) < b["best_cost"]):
            b["best"], b["best_cost"] = b["x"].detach().clone(), float(loss)
        b["opt"].zero_grad(set_to_none=True)
        loss.backward()
        b["opt"].step()
        with torch.no_grad():
            b["x"].copy_(clip_normalised(b["x"], env.mean, env.std))
        images = None
        if step == self.g_steps - 1:  # official: the last iterate (aliasing), or the lowest-loss one
            x = b["best"] if self.keep_best else b["x"].detach()
            images = (denormalise(x, env.mean, env.std), b["targets"])
            self._batch = {}
        return SynthesisStep(loss.detach(), {k: v.detach() for k, v in terms.items()}, images)


__all__ = ["DeepInversion", "jitter_and_flip"]
