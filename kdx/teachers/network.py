"""A frozen network teacher, and where its weights come from (``teacher=net``).

- :class:`NetworkTeacher`: frozen means ``eval()`` always (also after ``train()`` is called on it), no parameter
  requires grad, the forward runs under ``torch.no_grad()``.
- :class:`NetworkTeacherSource` (the ``teacher=net`` node): ``teacher.ckpt`` if given; else the teacher store
  (``paths.teachers/<dataset>/<arch>/``); else, with ``auto_train``, kdx trains the teacher first with the teacher
  recipe :class:`TeacherRecipe` (``teacher.train``) and stores it (only a run of its whole budget is stored).
- Under DDP every rank takes part in training a missing teacher; only rank 0 holds the store's lock and writes
  (:func:`kdx.dist.rank` tells the ranks apart under torchrun, Lightning, submitit and SLURM).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig

from kdx.distill.base import ModelOutput
from kdx.errors import CheckpointError
from kdx.labels import model_name
from kdx.io import load_into, load_state_dict_file, sha256_file
from kdx.teachers.base import Teacher, TeacherContext, TeacherSource

log = logging.getLogger(__name__)


class NetworkTeacher(Teacher):
    """A trained network, frozen; ``meta`` is its sidecar (architecture, dataset, classes, accuracy, sha256)."""

    def __init__(self, net: nn.Module, ckpt: str | Path, meta: Optional[dict[str, Any]] = None,
                 dataset_key: Optional[str] = None) -> None:
        super().__init__()
        self.net = net
        load_into(self.net, load_state_dict_file(ckpt, "teacher.ckpt"), ckpt, "teacher.ckpt")
        self.net.requires_grad_(False)
        self.eval()
        meta = meta or {}
        if meta.get("num_classes") is not None:
            n_out = _num_outputs(self.net)
            if n_out is not None and n_out != meta["num_classes"]:
                raise CheckpointError(f"Sidecar of {ckpt} says {meta['num_classes']} classes, weights have {n_out}.")
        same_data = dataset_key is None or meta.get("dataset") in (None, dataset_key)
        self.known_acc1 = meta.get("test_acc1") if same_data else None
        self.info = {
            "arch": meta.get("arch"),
            "ckpt": str(ckpt),
            "sha256": meta.get("sha256") or sha256_file(ckpt),
            "dataset": meta.get("dataset"),
            "recorded_test_acc1": meta.get("test_acc1"),
            "epochs": meta.get("epochs"),
            "budget": meta.get("budget"),
        }
        if not (meta.get("budget") or {}).get("complete", True):
            log.warning("teacher.ckpt=%s was trained with a cut-short budget (%s): its soft targets are those of a "
                        "barely trained network.", ckpt, meta["budget"].get("cut"))

    def describe(self) -> str:
        i = self.info
        budget = i.get("budget") or {}
        cut = "" if budget.get("complete", True) else f", cut short: {budget.get('cut')}"
        acc = "unknown" if i["recorded_test_acc1"] is None else f"{float(i['recorded_test_acc1']):.2f} %"
        return (f"{i['arch'] or 'network'} from {i['ckpt']} (sha256 {str(i['sha256'])[:12]}, trained on "
                f"{i['dataset'] or 'unknown data'} for {_epochs(i['epochs'])}{cut}, "
                f"recorded test top-1 {acc})")

    def train(self, mode: bool = True) -> "NetworkTeacher":
        return super().train(False)  # frozen: BN uses running statistics, always

    @property
    def network(self) -> nn.Module:
        return self.net

    @torch.no_grad()
    def forward(self, x, y=None, idx=None) -> ModelOutput:
        return ModelOutput(self.net(x))


@dataclass
class TeacherRecipe:
    """``teacher.train``: how a missing teacher is trained (plain cross-entropy, the run's data).

    ``max_epochs``/``optim``/``scheduler`` null take this run's own (the scheduler's ``total_epochs`` follows the
    teacher's epochs). A config node that only describes: the run context reads it to build the teacher's run.
    """

    max_epochs: Optional[int] = None
    optim: Optional[Any] = None
    scheduler: Optional[Any] = None
    seed: int = 0


class NetworkTeacherSource(TeacherSource):
    """``teacher=net``: a network teacher from ``ckpt``, else the store, else trained first (``auto_train``)."""

    has_network = True

    def __init__(self, model: DictConfig, ckpt: Optional[str] = None, auto_train: bool = True,
                 store_tag: Optional[str] = None, train: Optional[DictConfig] = None) -> None:
        self.model_config, self.ckpt, self.auto_train = model, ckpt, bool(auto_train)
        self.store_tag, self.recipe = store_tag, train
        self.arch = model_name(model)

    def load(self, ctx: TeacherContext) -> NetworkTeacher:
        net = instantiate(self.model_config, num_classes=ctx.num_classes)
        if self.ckpt:
            path = Path(str(self.ckpt)).expanduser()
            meta = _sidecar_for(path)
            self._check_sidecar(path, meta, ctx)
            return NetworkTeacher(net, path, {**meta, "arch": self.arch}, ctx.dataset_key)
        key = ctx.dataset_key + (f"-{self.store_tag}" if self.store_tag else "")
        store = ctx.store
        if ctx.rank > 0:
            # rank 0 holds the lock and writes the store; if it is training the teacher, this rank joins it
            found = store.lookup(key, self.arch)
            weights, meta = found if found is not None else ctx.train_teacher(self.model_config, self.recipe)
            return NetworkTeacher(net, weights, meta, ctx.dataset_key)
        with store.lock(key, self.arch):
            found = store.lookup(key, self.arch)
            if found is None:
                if not self.auto_train:
                    raise CheckpointError(
                        f"No {self.arch} teacher for '{key}' in the teacher store {store.entry_dir(key, self.arch)}. "
                        f"Pass teacher.ckpt=<path>, train one with `python -m kdx task=train model={self.arch} "
                        f"data=...`, or set teacher.auto_train=true."
                    )
                log.warning("No %s teacher for '%s' in the teacher store (%s): training it first with the teacher "
                            "recipe (teacher.train), then distilling.", self.arch, key, store.root)
                weights, meta = ctx.train_teacher(self.model_config, self.recipe)
                found = (weights, meta) if store.register(key, self.arch, weights, meta) is None \
                    else store.lookup(key, self.arch)
            weights, meta = found
        return NetworkTeacher(net, weights, meta, ctx.dataset_key)

    def _check_sidecar(self, path: Path, meta: dict[str, Any], ctx: TeacherContext) -> None:
        if meta.get("arch") not in (None, self.arch):
            raise CheckpointError(
                f"teacher.ckpt={path} was trained as '{meta['arch']}' but the teacher model is '{self.arch}'. "
                f"Set teacher_arch={meta['arch']} or pass a {self.arch} checkpoint."
            )
        if meta.get("num_classes") not in (None, ctx.num_classes):
            raise CheckpointError(
                f"teacher.ckpt={path} has {meta['num_classes']} classes but data={ctx.dataset_key} has "
                f"{ctx.num_classes}. Pass a teacher trained on this dataset (teacher.ckpt=...)."
            )


def _epochs(n: Optional[int]) -> str:
    return "? epochs" if n is None else f"{n} epoch" + ("" if n == 1 else "s")


def _sidecar_for(ckpt: Path) -> dict[str, Any]:
    for cand in (ckpt.with_suffix(".json"), ckpt.parent / "teacher.json"):
        if cand.is_file():
            try:
                return json.loads(cand.read_text())
            except json.JSONDecodeError:
                return {}
    return {}


def _num_outputs(net: nn.Module) -> Optional[int]:
    last = None
    for m in net.modules():
        if isinstance(m, nn.Linear):
            last = m
    return None if last is None else last.out_features


__all__ = ["NetworkTeacher", "NetworkTeacherSource", "TeacherRecipe"]
