"""DAFL (Chen et al., ICCV 2019), the generator-only baseline, as the NAYER repository's code runs it
(``distill=dafl``).

Official code: tmtuan1307/NAYER ``datafree/synthesis/generative.py`` (``GenerativeSynthesizer``, identical in
zju-vipa/Fast-Datafree), built by Fast-Datafree's ``datafree_kd.py`` for ``--method dafl`` (the official
``Generator`` with ``nz = 512``) and run by its ``scripts/dafl_cifar.sh``. No memory bank: each epoch runs
``rounds`` (the official ``ep_steps // kd_steps`` = 400 // 5 = 80) rounds of ``g_steps`` generator steps, then
``module.kd_steps / rounds`` student steps, each on a fresh batch drawn from the generator (:meth:`DAFL.sample`: no
augmentation; the generator stays in train mode, so its BN uses and updates batch statistics). A generator step
(persistent Adam, lr_g, betas 0.5/0.999) on a fresh ``z``, images normalised and given to the teacher as they are:

    L = oh·CE(t, argmax t) + act·(−mean|f_t|) + balance·Σ p̄ log p̄ + bn·L_bn + adv·(−d(s, t))

``f_t`` the teacher's pooled feature (its ``pooled_feat`` tap: the classifier's input), ``p̄`` the batch-mean
softmax. The same class runs the DFAD / ZSKT / DFQ settings of that file (``adv``, ``adv_criterion: l1|kl``,
``bn``); but note the official driver passes the *teacher* as the synthesiser's student (``adversary: teacher``),
which makes the adversarial term identically 0; ``adversary: student`` uses the student. DAFL's official script has
``adv = 0``, so it is unaffected. A sample has no class: its label is 0, and the student loss must have no CE term.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdx.datafree.augment import normalize_float
from kdx.datafree.base import DataFreeStrategy, SynthesisEnv, SynthesisStep
from kdx.datafree.common import (
    BNStatHooks, Generator, activation_loss, build_seeded, class_balance, n_params, peek_seed, student_logits,
)
from kdx.distill.base import Strategy
from kdx.features import FeatureTaps, model_tap_sets


class DAFL(DataFreeStrategy):
    """``distill=dafl``: see the module docstring."""

    uses_bank = False

    def __init__(
        self,
        loss: Strategy,
        g_steps: int = 1,
        rounds: int = 80,
        lr_g: float = 1e-3,
        g_betas: tuple[float, float] = (0.5, 0.999),
        synthesis_batch_size: int = 256,
        nz: int = 512,
        ngf: int = 64,
        oh: float = 1.0,
        act: float = 0.001,
        balance: float = 20.0,
        bn: float = 0.0,
        adv: float = 0.0,
        adv_criterion: str = "kl",
        adversary: str = "teacher",
        teacher_transform=None,
    ) -> None:
        super().__init__(loss, teacher_transform)
        for name, value in (("g_steps", g_steps), ("rounds", rounds), ("synthesis_batch_size", synthesis_batch_size),
                            ("nz", nz), ("ngf", ngf)):
            if int(value) < 1:
                raise ValueError(f"distill.{name}={value} must be >= 1")
        if adv_criterion not in ("kl", "l1"):
            raise ValueError(f"distill.adv_criterion={adv_criterion!r}: use kl (official KLDiv, T=1) or l1 (DFAD)")
        if adversary not in ("teacher", "student"):
            raise ValueError(f"distill.adversary={adversary!r}: use teacher (official driver) or student")
        if loss.reads_labels():
            raise ValueError("distill.loss reads the batch labels (a non-zero distill.loss.w_ce, a teacher_transform, "
                             "or a target-class loss such as DKD), but DAFL's samples carry no label: use "
                             "distill/loss=kd with distill.loss.w_ce=0 and teacher_transform=null.")
        self.g_steps, self.n_rounds, self.synthesis_batch_size = int(g_steps), int(rounds), int(synthesis_batch_size)
        self.lr_g, self.g_betas, self.nz, self.ngf = float(lr_g), tuple(float(b) for b in g_betas), int(nz), int(ngf)
        self.w_oh, self.w_act, self.w_balance = float(oh), float(act), float(balance)
        self.w_bn, self.w_adv = float(bn), float(adv)
        self.adv_criterion, self.adversary = adv_criterion, adversary
        object.__setattr__(self, "generator", None)  # setup(); never registered
        self.opt: Optional[torch.optim.Optimizer] = None
        self.hooks: Optional[BNStatHooks] = None
        self.feat_taps: Optional[FeatureTaps] = None

    def synthesis_units(self, ep: int, warmup: int) -> int:
        return self.n_rounds * self.g_steps

    def rounds(self, ep: int, warmup: int) -> int:
        return self.n_rounds

    def setup(self, env: SynthesisEnv) -> None:
        gen = build_seeded(lambda: Generator(self.nz, self.ngf, env.image_shape[1], env.image_shape[0]),
                           peek_seed(env.rng), env.device)
        object.__setattr__(self, "generator", gen.train())
        self.opt = torch.optim.Adam(gen.parameters(), lr=self.lr_g, betas=self.g_betas)
        self.hooks = BNStatHooks(env.teacher, 0.0) if self.w_bn > 0 else None
        if self.w_act > 0:
            pooled = model_tap_sets(env.teacher).get("pooled_feat")
            if not pooled:
                raise ValueError("DAFL's activation term reads the teacher's pooled feature (tap set pooled_feat), "
                                 "which this teacher does not declare: set teacher.model.taps={pooled_feat: [...]} "
                                 "or distill.act=0.")
            self.feat_taps = FeatureTaps(env.teacher, pooled, "teacher.model.taps.pooled_feat")

    def _teacher(self, env: SynthesisEnv, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        if self.feat_taps is None:
            return env.teacher(env.prep(x)), None
        with self.feat_taps.capture() as feats:
            out = env.teacher(env.prep(x))
        return out, next(iter(feats.values())).flatten(1)

    def _adversarial(self, env: SynthesisEnv, x: Tensor, t_out: Tensor) -> Tensor:
        s_out = env.teacher(env.prep(x)) if self.adversary == "teacher" else student_logits(env, x)
        if self.adv_criterion == "l1":
            return -F.l1_loss(s_out.float(), t_out.float())
        return -F.kl_div(F.log_softmax(s_out.float(), 1), F.softmax(t_out.float(), 1), reduction="batchmean")

    def synthesis_step(self, env: SynthesisEnv, ep: int, unit: int, warmup: int) -> SynthesisStep:
        self.generator.train()
        z = torch.randn((self.synthesis_batch_size, self.nz), generator=env.rng).to(env.device)
        x = normalize_float(self.generator(z), env.mean, env.std)
        if self.hooks is not None:
            self.hooks.active = True
        try:
            t_out, t_feat = self._teacher(env, x)
        finally:
            if self.hooks is not None:
                self.hooks.active = False
        terms: dict[str, Tensor] = {}
        if self.hooks is not None:
            terms["bn"] = self.w_bn * self.hooks.loss()
        terms["oh"] = self.w_oh * F.cross_entropy(t_out.float(), t_out.argmax(1))
        if t_feat is not None:
            terms["act"] = self.w_act * activation_loss(t_feat)
        if self.w_balance > 0:
            terms["balance"] = self.w_balance * class_balance(t_out)
        if self.w_adv > 0:
            terms["adv"] = self.w_adv * self._adversarial(env, x, t_out)
        loss = torch.stack([v.float() for v in terms.values()]).sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return SynthesisStep(loss.detach(), {k: v.detach() for k, v in terms.items()})

    @torch.no_grad()
    def sample(self, env: SynthesisEnv, n: int) -> tuple[Tensor, Tensor]:
        """``n`` fresh images (generator in train mode, as the official ``sample``) and label 0 for each."""
        self.generator.train()
        z = torch.randn((n, self.nz), generator=env.rng).to(env.device)
        return self.generator(z), torch.zeros(n, dtype=torch.int64, device=env.device)

    def synthesis_state(self) -> dict[str, Any]:
        return {"generator": {k: v.detach().cpu() for k, v in self.generator.state_dict().items()},
                "opt": self.opt.state_dict()}

    def load_synthesis_state(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.opt.load_state_dict(state["opt"])

    def describe(self) -> dict[str, Any]:
        return {"generator_params": n_params(self.generator)}


__all__ = ["DAFL"]
