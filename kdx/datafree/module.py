"""The data-free LightningModule (NAYER): the student, teacher and loss of kdx, fed by a generator.

Lightning's training loop runs over *work units* (:class:`DataFreeDataModule` gives a loader of
``NAYER.units(epoch)`` items, rebuilt every epoch): unit ``u < loops·g_steps`` is one generator step
(loop ``u // g_steps``, step ``u % g_steps``), the rest are student steps on batches from the memory
bank. So the progress bar counts synthesis and student steps; the real training split is never read.
Optimisation is manual: a fresh Adam for the generator every synthesis loop, and the student's SGD
(from ``distill.optim``, stepped only on student steps; its schedule ``distill.scheduler`` once per epoch).

Evaluation, metrics, history, best epoch and checkpointing are :class:`kdx.module.DistillModule`'s.
The generator is held outside the module's registered submodules (as the teacher is): it is not in the
student's optimiser, not in the DDP wrapper (under DDP each rank synthesises with its own generator and
random stream, into its own bank; the student is trained data-parallel), and its state (with the bank,
the BN momentum statistics and the random stream) is saved in the checkpoint under ``"nayer"``.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from kdx.datafree.augment import augment
from kdx.datafree.bank import MemoryBank
from kdx.datafree.losses import adversarial_loss, onehot_ce
from kdx.datafree.nayer import NAYER, BNStatHooks, NLGenerator, synthesis_targets
from kdx.distill.base import Batch, ModelOutput
from kdx.module import DistillModule

log = logging.getLogger(__name__)


def _rank_seed(seed: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * int(rank) + 0x5EED) % (2**63 - 1)


class DataFreeModule(DistillModule):
    def __init__(
        self,
        student: nn.Module,
        strategy: NAYER,
        num_classes: int,
        teacher,
        label_emb: torch.Tensor,
        image_shape: tuple[int, int, int],
        mean,
        std,
        pad: int = 4,
        augment_bank: bool = True,
        output_dir: Optional[str] = None,
        seed: int = 0,
        has_heldout_val: bool = False,
        channels_last: bool = False,
        check_finite: bool = True,
    ) -> None:
        super().__init__(
            student=student, strategy=strategy, optimizer=strategy.optim_factory, scheduler=strategy.scheduler_factory,
            num_classes=num_classes, teacher=teacher, has_heldout_val=has_heldout_val, channels_last=channels_last,
            check_finite=check_finite,
        )
        self.automatic_optimization = False
        net = getattr(teacher, "feature_module", None)
        if not isinstance(net, nn.Module):
            raise ValueError("distill=nayer needs a network teacher (teacher=net): the generator is trained through it.")
        label_emb = torch.as_tensor(label_emb, dtype=torch.float32)
        if label_emb.shape[0] != num_classes:
            raise ValueError(f"the label-text embeddings have {label_emb.shape[0]} rows for {num_classes} classes (distill.lte)")
        s = strategy
        gen = NLGenerator(label_emb, ngf=s.ngf, img_size=image_shape[1], nc=image_shape[0], nl=s.nl or num_classes,
                          le_emb_size=s.le_emb_size, sbz=s.synthesis_batch_size)
        object.__setattr__(self, "generator", gen)  # not a registered submodule: own optimiser, not in DDP
        object.__setattr__(self, "teacher_net", net)
        self.hooks = BNStatHooks(net, s.bn_mmt) if s.w_bn > 0 else None
        self.image_shape = tuple(int(v) for v in image_shape)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.pad, self.augment_bank = int(pad), bool(augment_bank)
        self.output_dir = Path(output_dir) if output_dir else None
        self.seed = int(seed)
        self.bank: Optional[MemoryBank] = None
        self.rng = torch.Generator()
        self.rng.manual_seed(_rank_seed(self.seed, 0))
        self._loop: dict[str, Any] = {}
        self._perm: Optional[torch.Tensor] = None
        self._perm_pos = 0
        self._grid_batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.times = {"synthesis_s": 0.0, "student_s": 0.0}
        self._restored_rank0_state = False

    # ------------------------------------------------------------------ set-up
    @property
    def nayer(self) -> NAYER:
        return self.strategy  # type: ignore[return-value]

    def _rank(self) -> int:
        return int(self.trainer.global_rank) if self._trainer is not None else 0

    def setup(self, stage: str) -> None:
        if self.bank is not None:
            return
        rank = self._rank()
        self.rng.manual_seed(_rank_seed(self.seed, rank))
        factory = self.nayer.bank_factory or MemoryBank
        kwargs: dict[str, Any] = {}
        folder = (getattr(factory, "keywords", None) or {}).get("path")
        if folder:  # an on-disk bank: distill.bank.path is a folder, one file per rank
            kwargs["path"] = str(Path(folder) / f"bank_rank{rank}.bin")
        self.bank = factory(image_shape=self.image_shape, **kwargs)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.generator.to(self.device)
        if self.hooks is not None:
            self.hooks.to(self.device)
        if self._restored_rank0_state and self._rank() > 0:  # checkpoints hold rank 0's stream: diverge again
            self.rng.manual_seed(_rank_seed(self.seed, self._rank()) ^ (self.current_epoch + 1))

    # ------------------------------------------------------------------ the epoch
    def on_train_epoch_start(self) -> None:
        ep = self.current_epoch
        if self.nayer.rebuild_due(ep):
            self.generator.rebuild(self.rng)
            self.generator.to(self.device)
        self._perm, self._perm_pos = None, 0
        self._grid_batch = None

    def training_step(self, batch, batch_idx):
        ep = self.current_epoch
        n_gen = self.nayer.generator_steps(ep)
        if batch_idx < n_gen:
            t0 = time.perf_counter()
            loss = self.generator_step(ep, batch_idx // self.nayer.g_steps, batch_idx % self.nayer.g_steps)
            self.times["synthesis_s"] += time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            loss = self.student_step(ep, batch_idx - n_gen)
            self.times["student_s"] += time.perf_counter() - t0
        return loss

    # ------------------------------------------------------------------ synthesis
    def _start_loop(self, loop: int) -> None:
        s, dev = self.nayer, self.device
        self.generator.reinit_noisy(self.rng)
        targets = synthesis_targets(self.num_classes, s.synthesis_batch_size, self.rng).to(dev)
        self._loop = {
            "targets": targets,
            "onehot": F.one_hot(targets, self.num_classes).float(),
            "opt": torch.optim.Adam(self.generator.parameters(), lr=s.lr_g, betas=s.g_betas),
            "best_x": None,
            "best_cost": None,
            # official quirk (off by default): the student is switched to train mode after the first loop
            "student_train": bool(s.student_train_after_first_loop and loop > 0),
        }

    def generator_step(self, ep: int, loop: int, step: int) -> torch.Tensor:
        s = self.nayer
        if step == 0:
            self._start_loop(loop)
        st = self._loop
        self.generator.train()
        x = self.generator(st["targets"])
        x_aug = augment(x, self.mean, self.std, s.aug_pad, s.aug_flip, self.rng)
        if self.hooks is not None:
            self.hooks.active = True
        try:
            t_logits = self.teacher_net(self._prep(x_aug))
        finally:
            if self.hooks is not None:
                self.hooks.active = False
        terms: dict[str, torch.Tensor] = {}
        if self.hooks is not None:
            terms["bn"] = s.w_bn * self.hooks.loss()
        terms["oh"] = s.w_oh * onehot_ce(t_logits, st["onehot"])
        if s.w_adv > 0 and s.distills(ep):
            self.student.train(st["student_train"])
            requires = [p.requires_grad for p in self.student.parameters()]
            self.student.requires_grad_(False)  # gradients to the images only, never to the student
            try:
                s_logits = self.student(self._prep(x_aug))
            finally:
                for p, r in zip(self.student.parameters(), requires):
                    p.requires_grad_(r)
            terms["adv"] = s.w_adv * adversarial_loss(s_logits, t_logits)
        loss = torch.stack([v.float() for v in terms.values()]).sum()
        if self.check_finite:
            self._stop_if_not_finite(loss, terms)
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
        n = x.shape[0]
        self.log("train/gen/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        for name, value in terms.items():
            self.log(f"train/gen/{name}", value.detach(), on_step=False, on_epoch=True, batch_size=n)
        if step == s.g_steps - 1:
            self._end_loop()
        return loss.detach()

    def _end_loop(self) -> None:
        st = self._loop
        if self.hooks is not None:
            self.hooks.update_momentum()  # from the loop's last forward, as the official hooks
            self.hooks.clear()
        self.bank.add(st["best_x"], st["targets"])
        self._grid_batch = (st["best_x"].detach().float().cpu(), st["targets"].cpu())
        self._loop = {}

    # ------------------------------------------------------------------ student
    def _bank_indices(self) -> torch.Tensor:
        """The next batch of a shuffled pass over the bank (a new pass when one ends; the last batch of
        a pass may be smaller, as the official DataLoader's)."""
        n = len(self.bank)
        if self._perm is None or self._perm_pos >= len(self._perm):
            self._perm, self._perm_pos = torch.randperm(n, generator=self.rng), 0
        idx = self._perm[self._perm_pos : self._perm_pos + self.nayer.batch_size]
        self._perm_pos += len(idx)
        return idx

    def student_step(self, ep: int, step: int) -> torch.Tensor:
        if self.bank is None or len(self.bank) == 0:
            raise RuntimeError(
                "NAYER's memory bank is empty at the first student step: synthesise before distilling "
                "(distill.warmup >= 1, or distill.g_loops >= 1)."
            )
        idx = self._bank_indices()
        x, y = self.bank.get(idx)
        x, y, idx = x.to(self.device, non_blocking=True), y.to(self.device), idx.to(self.device)
        with torch.no_grad():  # the real-data train transform: RandomCrop(pad) + HFlip + Normalize
            x = augment(x, self.mean, self.std, self.pad if self.augment_bank else 0, self.augment_bank, self.rng)
        x = self._prep(x)
        self.student.train()
        raw = self.teacher(x, y, idx)
        teacher_out = ModelOutput(self.strategy.transform_teacher(raw.logits, y), raw.features)
        student_out = ModelOutput(self.student(x))
        # the student loss sees 1-based epochs of distillation (epoch 1 = the first after warm-up)
        terms = self.strategy(student_out, teacher_out, Batch(x, y, idx), ep - self.nayer.warmup + 1)
        loss = torch.stack([t.float() for t in terms.values()]).sum()
        if self.check_finite:
            self._stop_if_not_finite(loss, terms)
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        bs = x.shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/loss/{name}", value.detach(), batch_size=bs)
        self._train_loss_sum = self._train_loss_sum.to(loss.device) + loss.detach()
        self._train_loss_n += 1
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # a warm-up epoch has no student step: its history row has no train_loss
        sch = self.lr_schedulers()
        if sch is not None:
            with warnings.catch_warnings():  # warm-up epochs step the schedule without an optimiser step
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
                sch.step()  # closed-form in the epoch: the cosine starts after warm-up (kdx.optim.cosine)
        self.log("nayer/bank_images", float(len(self.bank)), on_step=False, on_epoch=True)
        if self.trainer.is_global_zero and self._grid_batch is not None and self.output_dir is not None:
            self._write_grid()

    def _write_grid(self) -> None:
        from torchvision.utils import make_grid, save_image

        x, t = self._grid_batch
        s = self.nayer
        k = max(1, min(s.grid_per_class, int(torch.bincount(t, minlength=self.num_classes).max())))
        rows = []
        for c in range(min(s.grid_classes, self.num_classes)):
            imgs = x[t == c][:k]
            if len(imgs) < k:
                imgs = torch.cat([imgs, torch.zeros((k - len(imgs), *x.shape[1:]))])
            rows.append(imgs)
        grid = make_grid(torch.cat(rows), nrow=k, padding=1)
        path = self.output_dir / "nayer" / f"synthetic_epoch{self.current_epoch + 1:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        logger = self.logger
        if logger is not None and type(logger).__name__ == "WandbLogger":
            logger.log_image(key="nayer/synthetic", images=[str(path)], caption=[f"epoch {self.current_epoch + 1}"])

    # ------------------------------------------------------------------ checkpoint and results
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["nayer"] = {
            "generator": {k: v.detach().cpu() for k, v in self.generator.state_dict().items()},
            "bn_mmt": self.hooks.state_dict() if self.hooks is not None else None,
            "bank": self.bank.state_dict() if self.bank is not None else None,
            "rng": self.rng.get_state(),
            "times": dict(self.times),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("nayer")
        if state is None:
            raise ValueError("This checkpoint has no NAYER state (it was not saved by distill=nayer): resume it with its own method.")
        self.generator.load_state_dict(state["generator"])
        if self.hooks is not None and state.get("bn_mmt") is not None:
            self.hooks.load_state_dict(state["bn_mmt"])
        if state.get("bank") is not None:
            if self.bank is None:
                self.setup("fit")
            self.bank.load_state_dict(state["bank"])
        self.rng.set_state(state["rng"])
        self.times.update(state.get("times", {}))
        self._restored_rank0_state = True

    def results_extra(self) -> dict[str, Any]:
        """What results.json records about the synthesis (the bank, times, generator size)."""
        s = self.nayer
        epochs = int(self.trainer.max_epochs) if self._trainer is not None else None
        return {"nayer": {
            "bank": self.bank.describe() if self.bank is not None else None,
            "bank_images_full_run": s.bank_images(epochs) if epochs else None,
            "generator_params": sum(p.numel() for p in self.generator.parameters()),
            "synthesis_time_s": round(self.times["synthesis_s"], 2),
            "student_time_s": round(self.times["student_s"], 2),
            "label_embedding_dim": int(self.generator.label_emb.shape[1]),
        }}


class DataFreeDataModule(pl.LightningDataModule):
    """The run's datamodule for evaluation (validation/test loaders, their transforms); its training
    loader is replaced by NAYER's work units, so no training image is ever read."""

    def __init__(self, inner: pl.LightningDataModule, module: DataFreeModule) -> None:
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_module", module)

    def __getattr__(self, name: str):
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def prepare_data(self) -> None:
        self.inner.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        self.inner.setup(stage)

    def train_dataloader(self) -> DataLoader:
        ep = int(self.trainer.current_epoch) if self.trainer is not None else 0
        n = self._module.nayer.units(ep)
        if n < 1:
            raise ValueError(f"NAYER epoch {ep} has no work (distill.g_loops/gwp_loops and distill.kd_steps are 0).")
        return DataLoader(torch.arange(n), batch_size=None, shuffle=False)

    def _share_trainer(self) -> None:
        self.inner.trainer = self.trainer

    def val_dataloader(self):
        self._share_trainer()
        return self.inner.val_dataloader()

    def test_dataloader(self):
        self._share_trainer()
        return self.inner.test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, torch.Tensor):  # a work unit
            return batch
        self._share_trainer()
        return self.inner.on_after_batch_transfer(batch, dataloader_idx)

    def describe(self) -> dict[str, Any]:
        d = self.inner.describe() if hasattr(self.inner, "describe") else {"name": getattr(self.inner, "name", None)}
        d["training_images_used"] = 0
        return d


def build_data_free(cfg: DictConfig, strategy: NAYER, student: nn.Module, teacher, dm, output_dir: Path):
    """The module, the datamodule wrapper and the extra Trainer arguments of a data-free run."""
    names = list(dm.class_names)
    label_emb = strategy.lte(names, str(getattr(dm, "name", "")))
    log.info("NAYER: %d×%d label-text embeddings (%s); the student optimiser is distill.optim and its schedule "
             "distill.scheduler (the top-level optim/scheduler groups are not used).",
             label_emb.shape[0], label_emb.shape[1], type(strategy.lte).__name__)
    module = DataFreeModule(
        student=student, strategy=strategy, num_classes=len(names), teacher=teacher, label_emb=label_emb,
        image_shape=tuple(dm.image_shape), mean=dm.mean, std=dm.std, pad=int(getattr(dm, "pad", 4)),
        augment_bank=bool(getattr(dm, "augment", True)), output_dir=str(output_dir), seed=int(cfg.seed),
        has_heldout_val=bool(getattr(dm, "val_split", 0)), channels_last=bool(cfg.perf.channels_last),
        check_finite=bool(cfg.perf.check_finite),
    )
    return module, DataFreeDataModule(dm, module), {"reload_dataloaders_every_n_epochs": 1}


__all__ = ["DataFreeDataModule", "DataFreeModule", "build_data_free"]
