"""What the data-free synthesisers share (NAYER, DeepInversion, CMI, Fast, DAFL): BN-statistic hooks, the
generators' convolutional decoder, the official ``Generator``, seeded (re-)initialisation, the student's
adversarial forward, lowest-loss batch tracking, and the pure loss functions of the official ``criterions.py``.

Loss functions (tmtuan1307/NAYER ``datafree/criterions.py``, the same in zju-vipa/Fast-Datafree):

- :func:`jsdiv`: ``½·KL(M ‖ P̃) + ½·KL(M ‖ Q̃)`` (``F.kl_div`` batchmean) with ``P = σ(s/T)``, ``Q = σ(t/T)``,
  ``M = (P + Q)/2``, each clamped to [0.01, 0.99] before the logs (official clamps, no T² factor).
- :func:`image_prior_tv`: the mean absolute difference of horizontal, vertical and both diagonal neighbours, summed
  (official ``get_image_prior_losses``' L1 part).
- :func:`class_balance`: ``Σ_c p̄_c log p̄_c`` with ``p̄`` the batch-mean softmax (minimised: classes balanced).
- :func:`activation_loss`: ``−mean|f|`` of the teacher's pooled features (DAFL).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdx.datafree.base import SynthesisEnv
from kdx.datafree.losses import Moments, batch_moments, bn_statistics_loss

# --------------------------------------------------------------------------- randomness


def draw_seed(rng: torch.Generator) -> int:
    """A seed drawn from ``rng`` (advances it)."""
    return int(torch.randint(0, 2**62, (1,), generator=rng))


def peek_seed(rng: torch.Generator) -> int:
    """A seed from a copy of ``rng``: building a synthesiser at fit start must not move the run's stream (a resumed
    run builds it again from the restored stream, then loads its state)."""
    copy = torch.Generator()
    copy.set_state(rng.get_state())
    return draw_seed(copy)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Global CPU RNG seeded inside the block (default PyTorch initialisations), restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def n_params(module: Optional[nn.Module]) -> Optional[int]:
    """Parameter count (None before the module is built): for ``describe``."""
    return None if module is None else sum(p.numel() for p in module.parameters())


def build_seeded(factory: Callable[[], nn.Module], seed: int, device: torch.device) -> nn.Module:
    """``factory()`` built on the CPU with the global RNG seeded (device-independent weights), moved to ``device``."""
    with seeded(seed):
        module = factory()
    return module.to(device)


# --------------------------------------------------------------------------- generators


def conv_decoder(ngf: int, nc: int) -> nn.Sequential:
    """BN2d → (Upsample×2 → Conv3×3 → BN → LeakyReLU(0.2)) ×2 → Conv3×3 → sigmoid: the official generators' body
    (``conv_blocks`` of ``Generator`` and ``NLGenerator``), from ``2·ngf`` channels to ``nc``."""
    return nn.Sequential(
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


class Generator(nn.Module):
    """The official ``Generator(nz, ngf, img_size, nc)`` (CMI, Fast, DAFL): ``Linear(nz → 2·ngf·(img/4)²)`` then
    :func:`conv_decoder`; images in [0, 1]."""

    def __init__(self, nz: int = 256, ngf: int = 64, img_size: int = 32, nc: int = 3) -> None:
        super().__init__()
        if img_size % 4:
            raise ValueError(f"img_size={img_size} must be a multiple of 4 (two ×2 upsamplings)")
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(nz, ngf * 2 * self.init_size**2))
        self.conv_blocks = conv_decoder(ngf, nc)

    def forward(self, z: Tensor) -> Tensor:
        out = self.l1(z)
        return self.conv_blocks(out.view(out.shape[0], -1, self.init_size, self.init_size))


@torch.no_grad()
def dcgan_init(modules: Sequence[nn.Module], rng: torch.Generator) -> None:
    """The official ``reset_model`` on ``modules``: Conv/ConvTranspose/Linear weights N(0, 0.02) and biases 0;
    BatchNorm2d weights N(1, 0.02) and biases 0 (running statistics kept). Draws from ``rng`` on the CPU."""
    for m in modules:
        if isinstance(m, (nn.ConvTranspose2d, nn.Linear, nn.Conv2d)):
            m.weight.copy_(torch.randn(m.weight.shape, generator=rng) * 0.02)
            if m.bias is not None:
                m.bias.zero_()
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(1.0 + torch.randn(m.weight.shape, generator=rng) * 0.02)
            m.bias.zero_()


# --------------------------------------------------------------------------- BN statistics hooks


class BNStatHooks:
    """Forward hooks on every ``BatchNorm2d`` of ``net`` recording the batch moments of its input.

    Only while :attr:`active` (synthesis steps); otherwise the hooks do nothing. :meth:`loss` is
    :func:`~kdx.datafree.losses.bn_statistics_loss` against the layers' running statistics, with the
    momentum statistics once they exist (``momentum > 0``); :meth:`update_momentum` folds the last
    recorded batch into them (``mmt ← m·mmt + (1 − m)·current``, the first call initialises them).
    With ``momentum = 0`` this is the official ``DeepInversionHook(m, 0)``.
    """

    def __init__(self, net: nn.Module, momentum: float = 0.9, setting: str = "distill.bn") -> None:
        self.layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError(
                f"The BN-statistics loss needs a network with BatchNorm2d layers; {type(net).__name__} has none "
                f"(set {setting}=0 to synthesise without it)."
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

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the moments of the forwards run inside the block."""
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def loss(self) -> Tensor:
        if any(c is None for c in self.current):
            raise RuntimeError("BN statistics were not recorded: run the network with the hooks active first")
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


# --------------------------------------------------------------------------- the student during synthesis


def student_logits(env: SynthesisEnv, x: Tensor, train: bool = False) -> Tensor:
    """The student's logits on synthesised (normalised) images, differentiable in ``x`` only: the student's
    parameters get no gradient. ``train``: its mode (the official synthesisers put it in eval mode)."""
    student = env.student
    student.train(train)
    requires = [p.requires_grad for p in student.parameters()]
    student.requires_grad_(False)
    try:
        return student(env.prep(x))
    finally:
        for p, r in zip(student.parameters(), requires):
            p.requires_grad_(r)


class BestBatch:
    """The lowest-loss iterate of a synthesis loop (the first one always taken; a later one only when strictly
    lower, as the official ``best_cost > loss`` test). ``extra`` rides along (CMI's features)."""

    def __init__(self) -> None:
        self.x: Optional[Tensor] = None
        self.cost: Optional[Tensor] = None
        self.extra: Optional[Tensor] = None

    @torch.no_grad()
    def offer(self, x: Tensor, loss: Tensor, extra: Optional[Tensor] = None) -> None:
        loss = loss.detach()
        if self.cost is None or bool(loss < self.cost):
            self.x, self.cost = x.detach().clone(), loss.clone()
            self.extra = None if extra is None else extra.detach().clone()


# --------------------------------------------------------------------------- loss functions


def jsdiv(logits: Tensor, targets: Tensor, T: float = 1.0) -> Tensor:
    """The official ``jsdiv``: Jensen-Shannon divergence of σ(s/T) and σ(t/T) with the official clamps."""
    p = F.softmax(logits.float() / T, dim=1)
    q = F.softmax(targets.float() / T, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    return 0.5 * F.kl_div(p.log(), m, reduction="batchmean") + 0.5 * F.kl_div(q.log(), m, reduction="batchmean")


def image_prior_tv(x: Tensor) -> Tensor:
    """The official total variation (L1): mean |difference| of horizontal, vertical and both diagonal neighbours."""
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return d1.abs().mean() + d2.abs().mean() + d3.abs().mean() + d4.abs().mean()


def class_balance(logits: Tensor) -> Tensor:
    """``Σ_c p̄_c log p̄_c``, ``p̄`` the batch-mean softmax (the negative entropy of the mean prediction)."""
    p = F.softmax(logits.float(), dim=1).mean(0)
    return (p * p.log()).sum()


def activation_loss(features: Tensor) -> Tensor:
    """DAFL's activation term ``−mean|f|``."""
    return -features.float().abs().mean()


def clip_normalised(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Clamp normalised images channel-wise to the image range: ``[−m/s, (1 − m)/s]`` (official ``clip_images``)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return torch.max(torch.min(x, (1 - m) / s), -m / s)


def denormalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``x·std + mean`` per channel: normalised images back to [0, 1]."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x * s + m


__all__ = [
    "BNStatHooks", "BestBatch", "Generator", "activation_loss", "build_seeded", "class_balance", "clip_normalised",
    "conv_decoder", "dcgan_init", "denormalise", "draw_seed", "image_prior_tv", "jsdiv", "n_params", "peek_seed",
    "seeded", "student_logits",
]
