"""``module=datafree``: the student never sees a training image; a synthesiser feeds a memory bank.

Lightning's training loop runs over *work units* (:class:`SynthesisData` gives a loader of
``units(epoch)`` items, rebuilt every epoch): ``strategy.synthesis_units(epoch)`` synthesis steps of the strategy
(:class:`kdx.datafree.base.DataFreeStrategy`) and, from the ``warmup``-th epoch on, ``kd_steps`` student steps on
batches drawn from the bank (or from ``strategy.sample`` for a synthesiser without a bank), in
``strategy.rounds(epoch)`` equal rounds of synthesis then student steps. So the progress bar counts synthesis and
student steps; the real training split is never read. Optimisation is manual: the synthesiser owns
its optimisers; the student's (top-level ``optim``) steps only on student steps and its schedule
(top-level ``scheduler``) once per epoch.

Cost is a result: every epoch's history row records the synthesis and student wall-clock (``synthesis_s``,
``student_s``), synthesis optimiser steps (``synthesis_steps``), images synthesised for the student
(``images_synthesised``: added to the bank, or drawn by ``sample``) and ``bank_images``, each also as a running total
(``*_total``); results.json's ``datafree`` node has the totals. Time spent drawing samples counts as synthesis (as the
official ``time_cost``). On a GPU the clock is read after a device synchronisation.

Evaluation, metrics, history, best epoch and checkpointing are the shared base's (:mod:`kdx.regimes.base`). The
bank, this rank's random stream, the cost counters and the synthesiser's state are saved in the checkpoint under
``"datafree"`` (exact resume). Under DDP each rank synthesises with its own generator and random stream, into
its own bank; the student is trained data-parallel.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from kdx.datafree.augment import augment
from kdx.datafree.bank import MemoryBank
from kdx.datafree.base import DataFreeStrategy, SynthesisEnv
from kdx.distill.base import Batch
from kdx.errors import ConfigError
from kdx.regimes.base import KDModule, Parts
from kdx.regimes.step import distill_step

log = logging.getLogger(__name__)

COST_KEYS = ("synthesis_s", "student_s", "synthesis_steps", "images_synthesised")


def _rank_seed(seed: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * int(rank) + 0x5EED) % (2**63 - 1)


class SynthesisData(LightningDataModule):
    """The data-free run's datamodule: its training loader yields work units (``units(epoch)`` of them); the
    real datamodule gives the validation and test loaders and their batch transform. No training image is read."""

    def __init__(self, data: LightningDataModule, units: Callable[[int], int]) -> None:
        super().__init__()
        self.data, self.units = data, units

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        self.data.setup(stage)

    def train_dataloader(self) -> DataLoader:
        ep = int(self.trainer.current_epoch) if self.trainer is not None else 0
        n = self.units(ep)
        if n < 1:
            raise ConfigError(f"Data-free epoch {ep + 1} has no work: the synthesis loops (distill.*) and the student "
                              "steps (module.kd_steps) are all 0.")
        return DataLoader(torch.arange(n), batch_size=None, shuffle=False)

    def _share_trainer(self) -> None:
        self.data.trainer = self.trainer

    def val_dataloader(self):
        self._share_trainer()
        return self.data.val_dataloader()

    def test_dataloader(self):
        self._share_trainer()
        return self.data.test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, torch.Tensor):  # a work unit
            return batch
        self._share_trainer()
        return self.data.on_after_batch_transfer(batch, dataloader_idx)


class DataFreeModule(KDModule):
    regime = "datafree"

    def __init__(self, parts: Parts, warmup: int = 20, kd_steps: int = 400, batch_size: int = 512,
                 augment_bank: bool = True, bank: Optional[Callable[..., MemoryBank]] = None,
                 grid_classes: int = 10, grid_per_class: int = 8) -> None:
        super().__init__(parts)
        self.automatic_optimization = False
        if not isinstance(self.strategy, DataFreeStrategy):
            raise ConfigError(f"module=datafree runs data-free strategies (distill=nayer); {type(self.strategy).__name__} "
                              "is not one. Use module=distill.")
        if self.teacher is None or self.teacher.network is None:
            raise ConfigError("The data-free regime trains its synthesiser through a network teacher (teacher=net).")
        if self.teacher.sees_own_view:  # synthesised images go to the teacher's network as they are
            raise ConfigError("teacher.input gives the teacher its own view of real batches; the data-free regime "
                              "synthesises images at the data's size and normalisation for the teacher directly. "
                              "Remove teacher.input (set its entries to null).")
        for name, value in (("warmup", warmup), ("kd_steps", kd_steps)):
            if int(value) < 0:
                raise ConfigError(f"module.{name}={value} must be >= 0")
        if int(batch_size) < 1:
            raise ConfigError(f"module.batch_size={batch_size} must be >= 1")
        dm = parts.datamodule
        self.warmup, self.kd_steps, self.batch_size = int(warmup), int(kd_steps), int(batch_size)
        self.augment_bank, self.pad = bool(augment_bank), int(dm.pad)
        self.bank_factory = bank or MemoryBank
        self.grid_classes, self.grid_per_class = int(grid_classes), int(grid_per_class)
        self.image_shape = tuple(int(v) for v in dm.image_shape)
        self.mean, self.std = tuple(float(v) for v in dm.mean), tuple(float(v) for v in dm.std)
        self.class_names, self.dataset_name = list(dm.class_names), str(dm.name)
        self.synthesiser.prepare(self.class_names, self.dataset_name, self.num_classes)
        self.output_dir, self.seed = parts.output_dir, int(parts.seed)
        self.bank: Optional[MemoryBank] = None
        self.rng = torch.Generator()
        self.rng.manual_seed(_rank_seed(self.seed, 0))
        self.env: Optional[SynthesisEnv] = None
        self._perm: Optional[torch.Tensor] = None
        self._perm_pos = 0
        self._grid_batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._pending_state: Optional[dict[str, Any]] = None
        self.cost: dict[str, float] = dict.fromkeys(COST_KEYS, 0)  # running totals
        self._epoch_cost: dict[str, float] = dict(self.cost)  # the totals at the start of this epoch
        self._restored_rank0_state = False

    @property
    def synthesiser(self) -> DataFreeStrategy:
        return self.strategy  # type: ignore[return-value]

    # ------------------------------------------------------------------ what the orchestration reads
    def units(self, ep: int) -> int:
        """Training-loop iterations of epoch ``ep`` (0-based): synthesis units and student steps."""
        self._round_sizes(ep)  # an uneven split stops here, at the epoch's start
        return self.synthesiser.synthesis_units(ep, self.warmup) + self.student_steps(ep)

    def _round_sizes(self, ep: int) -> tuple[int, int]:
        """(synthesis units, student steps) of one round of epoch ``ep``."""
        n_syn, n_st = self.synthesiser.synthesis_units(ep, self.warmup), self.student_steps(ep)
        if n_st == 0:  # a warm-up epoch: synthesis only
            return n_syn, 0
        r = self.synthesiser.rounds(ep, self.warmup)
        if r < 1 or n_syn % r or n_st % r:
            raise ConfigError(f"Epoch {ep + 1} runs in {r} rounds, which must split its {n_syn} synthesis steps "
                              f"and its module.kd_steps={n_st} student steps evenly: set module.kd_steps (or "
                              "distill.rounds) so that both divide.")
        return n_syn // r, n_st // r

    def unit_kind(self, ep: int, unit: int) -> tuple[bool, int]:
        """(is a synthesis step, its index among the epoch's synthesis steps) of work unit ``unit``."""
        syn, st = self._round_sizes(ep)
        r, pos = divmod(unit, syn + st)
        return pos < syn, r * syn + pos

    def student_steps(self, ep: int) -> int:
        return self.kd_steps if ep >= self.warmup else 0

    def fit_datamodule(self) -> LightningDataModule:
        return SynthesisData(self.parts.datamodule, self.units)

    def trainer_kwargs(self) -> dict[str, Any]:
        return {"reload_dataloaders_every_n_epochs": 1}  # the number of work units changes with the epoch

    def bank_images(self, epochs: int) -> int:
        """Images a run of ``epochs`` epochs adds to the bank."""
        return sum(self.synthesiser.images_per_epoch(e, self.warmup) for e in range(epochs))

    def synthesis_steps(self, epochs: int) -> int:
        """Synthesis optimiser steps of a run of ``epochs`` epochs."""
        return sum(self.synthesiser.synthesis_units(e, self.warmup) for e in range(epochs))

    # ------------------------------------------------------------------ set-up
    def _rank(self) -> int:
        return int(self.trainer.global_rank) if self._trainer is not None else 0

    def setup(self, stage: str) -> None:
        if self.bank is not None:
            return
        rank = self._rank()
        self.rng.manual_seed(_rank_seed(self.seed, rank))
        self.bank = self.bank_factory(image_shape=self.image_shape, rank=rank)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.env = SynthesisEnv(
            teacher=self.teacher.network, student=self.student, num_classes=self.num_classes,
            image_shape=self.image_shape, mean=self.mean, std=self.std, class_names=self.class_names,
            dataset=self.dataset_name, rng=self.rng, device=self.device, prep=self._prep,
        )
        self.synthesiser.setup(self.env)
        if self._pending_state is not None:  # a checkpoint was loaded before the synthesiser existed
            self.synthesiser.load_synthesis_state(self._pending_state)
            self._pending_state = None
        if self._restored_rank0_state and self._rank() > 0:  # checkpoints hold rank 0's stream: diverge again
            self.rng.manual_seed(_rank_seed(self.seed, self._rank()) ^ (self.current_epoch + 1))

    # ------------------------------------------------------------------ the epoch
    def _clock(self) -> float:
        if self.device.type == "cuda":  # kernels run asynchronously: time what ran, not what was queued
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._epoch_cost = dict(self.cost)
        t0 = self._clock()
        self.synthesiser.on_epoch_start(self.env, self.current_epoch, self.warmup)
        self.cost["synthesis_s"] += self._clock() - t0
        self._perm, self._perm_pos = None, 0
        self._grid_batch = None

    def training_step(self, batch, batch_idx):
        ep = self.current_epoch
        is_synthesis, unit = self.unit_kind(ep, batch_idx)
        t0 = self._clock()
        if is_synthesis:
            loss = self._synthesis_step(ep, unit)
            self.cost["synthesis_s"] += self._clock() - t0
            self.cost["synthesis_steps"] += 1
        else:
            loss = self._student_step(ep)
        return loss

    def _synthesis_step(self, ep: int, unit: int) -> torch.Tensor:
        out = self.synthesiser.synthesis_step(self.env, ep, unit, self.warmup)
        self.stop_if_not_finite(out.loss, out.terms)
        self.log("train/gen/loss", out.loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=1)
        for name, value in out.terms.items():
            self.log(f"train/gen/{name}", value, on_step=False, on_epoch=True, batch_size=1)
        if out.images is not None:
            x, y = out.images
            self.bank.add(x, y)
            self.cost["images_synthesised"] += x.shape[0]
            self._grid_batch = (x.detach().float().cpu(), y.cpu())
        return out.loss

    def _bank_indices(self) -> torch.Tensor:
        """The next batch of a shuffled pass over the bank (a new pass when one ends; the last batch of a pass
        may be smaller, as the official DataLoader's)."""
        n = len(self.bank)
        if self._perm is None or self._perm_pos >= len(self._perm):
            self._perm, self._perm_pos = torch.randperm(n, generator=self.rng), 0
        idx = self._perm[self._perm_pos : self._perm_pos + self.batch_size]
        self._perm_pos += len(idx)
        return idx

    def _student_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """The next student batch, normalised, and the seconds spent synthesising it: from the bank (with the train
        transform; 0 s), or drawn fresh from the synthesiser."""
        if not self.synthesiser.uses_bank:  # generator-only methods: fresh images, as given (no crop or flip)
            t0 = self._clock()
            with torch.no_grad():
                x, y = self.synthesiser.sample(self.env, self.batch_size)
                x = augment(x.float(), self.mean, self.std, 0, False)
            spent = self._clock() - t0
            self.cost["synthesis_s"] += spent
            self.cost["images_synthesised"] += x.shape[0]
            return x, y.to(self.device), torch.arange(x.shape[0], device=self.device), spent
        if self.bank is None or len(self.bank) == 0:
            raise ConfigError("The memory bank is empty at the first student step: synthesise before distilling "
                              "(module.warmup >= 1, or synthesis loops in every epoch).")
        idx = self._bank_indices()
        x, y = self.bank.get(idx)
        x, y, idx = x.to(self.device, non_blocking=True), y.to(self.device), idx.to(self.device)
        with torch.no_grad():  # the real-data train transform: RandomCrop(pad) + HFlip + Normalize
            x = augment(x, self.mean, self.std, self.pad if self.augment_bank else 0, self.augment_bank, self.rng)
        return x, y, idx, 0.0

    def _student_step(self, ep: int) -> torch.Tensor:
        t0 = self._clock()
        x, y, idx, synthesis_s = self._student_batch()
        self.student.train()
        # the student loss sees 1-based epochs of distillation (epoch 1 = the first after warm-up)
        loss, terms = distill_step(self.step_parts, Batch(self._prep(x), y, idx), ep - self.warmup + 1)
        self.record_step(loss, terms, x.shape[0])  # logged and checked for non-finite values every N steps
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.cost["student_s"] += self._clock() - t0 - synthesis_s
        return loss.detach()

    def on_validation_epoch_end(self) -> None:
        rows = len(self.history)
        super().on_validation_epoch_end()
        if len(self.history) > rows:  # this epoch's row: its cost and the running totals
            self.history[-1].update(self.cost_row())

    def cost_row(self) -> dict[str, float]:
        """The cost of the epoch so far and the running totals (history row fields)."""
        row: dict[str, float] = {}
        for key in COST_KEYS:
            total = self.cost[key]
            seconds = key.endswith("_s")
            row[key] = round(total - self._epoch_cost[key], 4) if seconds else int(total - self._epoch_cost[key])
            row[f"{key}_total"] = round(total, 4) if seconds else int(total)
        row["bank_images"] = len(self.bank) if self.bank is not None else 0
        return row

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # a warm-up epoch has no student step: its history row has no train_loss
        sch = self.lr_schedulers()
        if sch is not None:
            with warnings.catch_warnings():  # warm-up epochs step the schedule without an optimiser step
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
                sch.step()  # closed-form in the epoch: the cosine starts after warm-up (kdx.schedules.cosine)
        self.log("datafree/bank_images", float(len(self.bank)), on_step=False, on_epoch=True)
        if self.trainer.is_global_zero and self._grid_batch is not None:
            self._write_grid()

    def _write_grid(self) -> None:
        from torchvision.utils import make_grid, save_image

        x, t = self._grid_batch
        k = max(1, min(self.grid_per_class, int(torch.bincount(t, minlength=self.num_classes).max())))
        rows = []
        for c in range(min(self.grid_classes, self.num_classes)):
            imgs = x[t == c][:k]
            if len(imgs) < k:
                imgs = torch.cat([imgs, torch.zeros((k - len(imgs), *x.shape[1:]))])
            rows.append(imgs)
        grid = make_grid(torch.cat(rows), nrow=k, padding=1)
        path = self.output_dir / "synthetic" / f"epoch{self.current_epoch + 1:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        logger = self.logger
        if logger is not None and type(logger).__name__ == "WandbLogger":
            logger.log_image(key="datafree/synthetic", images=[str(path)], caption=[f"epoch {self.current_epoch + 1}"])

    # ------------------------------------------------------------------ checkpoint and results
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["datafree"] = {
            "synthesis": self.synthesiser.synthesis_state(),
            "bank": self.bank.state_dict() if self.bank is not None else None,
            "rng": self.rng.get_state(),
            "cost": dict(self.cost),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("datafree")
        if state is None:
            raise ConfigError("This checkpoint has no data-free state (it was not saved by module=datafree): resume it "
                              "with the regime and method that wrote it.")
        self._pending_state = state["synthesis"]  # the synthesiser is built at fit start
        if state.get("bank") is not None:
            if self.bank is None:
                self.setup("fit")
            self.bank.load_state_dict(state["bank"])
        self.rng.set_state(state["rng"])
        self.cost.update(state.get("cost", {}))
        self._restored_rank0_state = True

    def results_extra(self) -> dict[str, Any]:
        """What results.json records about the synthesis (the bank, its cost in total, the synthesiser); the cost
        per epoch is in the history rows."""
        epochs = int(self.trainer.max_epochs) if self._trainer is not None else None
        return {"datafree": {
            "training_images_used": 0,
            "bank": self.bank.describe() if self.bank is not None else None,
            "bank_images_full_run": self.bank_images(epochs) if epochs else None,
            "synthesis_steps_full_run": self.synthesis_steps(epochs) if epochs else None,
            "synthesis_time_s": round(self.cost["synthesis_s"], 2),
            "student_time_s": round(self.cost["student_s"], 2),
            "synthesis_steps": int(self.cost["synthesis_steps"]),
            "images_synthesised": int(self.cost["images_synthesised"]),
            **self.synthesiser.describe(),
        }}


__all__ = ["DataFreeModule", "SynthesisData"]
