"""Optimisers that step on a strategy's task and distillation gradients separately (``optim=dot``).

:class:`SplitLossOptimizer` is the seam: the distillation regime backpropagates the distillation terms, calls
:meth:`SplitLossOptimizer.step_kd`, then backpropagates the task terms (``Strategy.task_terms``) and calls
:meth:`~torch.optim.Optimizer.step`. :class:`DOT` is the one kdx ships.

DOT: Distillation-Oriented Trainer (Zhao et al., ICCV 2023), an SGD with one momentum per loss.

Official source: megvii-research/mdistiller @ a08d46f -- ``mdistiller/engine/dot.py``
(``DistillationOrientedTrainer``, function ``dot``) and trainer ``DOT`` in ``mdistiller/engine/trainer.py``.

With base momentum ``m`` and ``δ = delta``: task momentum ``m_task = m - δ``, distillation momentum
``m_kd = m + δ``, and ``m_mid = (m_kd + m_task)/2`` (= m, computed as official). Per iteration the trainer calls
:meth:`DOT.step_kd` after backpropagating the distillation loss (it takes each ``p.grad`` as ``g_kd``) and
:meth:`DOT.step` after backpropagating the task loss (``g_ce = p.grad``). ``step`` then, per parameter group:

1. task update, for every ``p`` with ``g_ce``: ``d = g_ce + wd·p``; buffer ``b_ce ← d`` at its first use, else
   ``b_ce ← μ·b_ce + (1 - dampening)·d`` with ``μ = m_task`` if ``p`` also has ``g_kd``, else ``μ = m_mid``;
   ``p ← p - lr·b_ce``. (Plain ``p ← p - lr·d`` without a buffer when ``m_task == 0``.)
2. distillation update, for every ``p`` with ``g_kd`` (after step 1, so ``p`` is already moved): buffer
   ``b_kd ← g_kd`` at its first use, else ``b_kd ← m_kd·b_kd + (1 - dampening)·g_kd`` if ``p`` has ``g_ce``, else
   ``b_kd ← m_mid·b_kd + (1 - dampening)·(g_kd + wd·p)``; ``p ← p - lr·b_kd``.

Weight decay enters once, through the task gradient, for parameters that have both gradients. Quirks kept: a
parameter with only a distillation gradient gets no weight decay in its first step (the buffer is the bare
``g_kd``); first steps ignore dampening (as torch SGD); there is no Nesterov variant. Differences from the official
class that do not change the numbers: ``momentum`` and ``delta`` are given instead of ``momentum``/``momentum_kd``;
several parameter groups are allowed (official asserts one); ``step_kd`` *takes* the gradients (sets ``p.grad`` to
None and keeps them in ``state[p]["kd_grad"]`` until ``step``), where the official keeps references to the
``.grad`` tensors and relies on ``zero_grad(set_to_none=True)`` before the task backward. Buffers are in
``state[p]["momentum_buffer"]`` and ``state[p]["momentum_kd_buffer"]`` (official names).

Official trainer, per iteration: ``zero_grad(set_to_none=True)``; ``loss_kd.backward(retain_graph=True)``;
``step_kd()``; ``zero_grad(set_to_none=True)``; ``loss_ce.backward()``; ``step()``, where ``loss_ce`` and ``loss_kd``
are the distiller's weighted ``loss_ce``/``loss_kd`` (KD: ``0.1·CE`` and ``0.9·KD_T=4``). CIFAR-100 configs
(``configs/cifar100/dot/*.yaml``): KD with T = 4, CE 0.1, KD 0.9; δ = 0.075, momentum 0.9, weight decay 5e-4,
batch 64, 240 epochs, lr ×0.1 after 150/180/210; lr 0.05 (res32x4→res8x4, vgg13→vgg8), 0.01 (res32x4→ShuffleV2).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer


class SplitLossOptimizer(Optimizer):
    """An optimiser that takes the distillation gradients (:meth:`step_kd`) before the task gradients (``step``)."""

    def step_kd(self) -> None:  # pragma: no cover - every split optimiser implements it
        raise NotImplementedError


class DOT(SplitLossOptimizer):
    """Distillation-Oriented Trainer; see the module docstring for the update and the call order."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        delta: float = 0.075,
        dampening: float = 0.0,
    ) -> None:
        if lr < 0.0 or weight_decay < 0.0:
            raise ValueError(f"invalid lr {lr} or weight_decay {weight_decay}")
        if momentum - delta < 0.0:
            raise ValueError(f"task momentum momentum - delta = {momentum - delta} < 0")
        defaults = dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay, dampening=dampening)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step_kd(self) -> None:
        """Take the current gradients as the distillation gradients (``p.grad`` becomes None)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["kd_grad"] = p.grad
                    p.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Task update from the current gradients, then distillation update from those taken by ``step_kd``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, damp = group["lr"], group["weight_decay"], group["dampening"]
            m_task, m_kd = group["momentum"] - group["delta"], group["momentum"] + group["delta"]
            m_mid = (m_kd + m_task) / 2.0
            task = [p for p in group["params"] if p.grad is not None]
            kd = [p for p in group["params"] if "kd_grad" in self.state[p]]
            for p in task:
                state = self.state[p]
                d = p.grad.add(p, alpha=wd) if wd != 0 else p.grad
                if m_task != 0:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d).detach()
                    else:
                        buf.mul_(m_task if "kd_grad" in state else m_mid).add_(d, alpha=1 - damp)
                    d = buf
                p.add_(d, alpha=-lr)
            for p in kd:
                state = self.state[p]
                d = state.pop("kd_grad")
                buf = state.get("momentum_kd_buffer")
                if buf is None:
                    buf = state["momentum_kd_buffer"] = torch.clone(d).detach()
                elif p.grad is not None:
                    buf.mul_(m_kd).add_(d, alpha=1 - damp)
                else:
                    d = d.add(p, alpha=wd) if wd != 0 else d
                    buf.mul_(m_mid).add_(d, alpha=1 - damp)
                p.add_(buf, alpha=-lr)
        return loss
