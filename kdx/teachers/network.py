"""A frozen network teacher, loaded from ``teacher.ckpt`` or from the teacher store.

Frozen means: ``eval()`` always (also after ``train()`` is called on it), no parameter
requires grad, the forward runs under ``torch.no_grad()``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from kdx.distill.base import ModelOutput
from kdx.io import CheckpointError, load_into, load_state_dict_file, sha256_file
from kdx.teachers.base import Teacher
from kdx.teachers.store import TeacherStore

log = logging.getLogger(__name__)


class NetworkTeacher(Teacher):
    def __init__(
        self,
        model: nn.Module,
        ckpt: Optional[str] = None,
        arch: Optional[str] = None,
        sidecar: Optional[dict[str, Any]] = None,
        dataset_key: Optional[str] = None,
        auto_train: bool = True,
        train: Optional[dict[str, Any]] = None,
        store_tag: Optional[str] = None,
        cache: Any = "off",
        cache_views: int = 4,
        cache_dtype: str = "auto",
        cache_dir: Optional[str] = None,
    ) -> None:
        """``cache*`` are read by the runner, which wraps this teacher in :class:`kdx.teachers.cache.CachedTeacher`."""
        super().__init__()
        if ckpt is None:
            raise CheckpointError("No teacher checkpoint: set teacher.ckpt=<path> (or let kdx train one).")
        self.net = model
        load_into(self.net, load_state_dict_file(ckpt, "teacher.ckpt"), ckpt, "teacher.ckpt")
        self.net.requires_grad_(False)
        self.eval()
        meta = sidecar or {}
        if meta.get("num_classes") is not None:
            n_out = _num_outputs(self.net)
            if n_out is not None and n_out != meta["num_classes"]:
                raise CheckpointError(f"Sidecar of {ckpt} says {meta['num_classes']} classes, weights have {n_out}.")
        same_data = dataset_key is None or meta.get("dataset") in (None, dataset_key)
        self.known_acc1 = meta.get("test_acc1") if same_data else None
        self.info = {
            "arch": arch or meta.get("arch"),
            "ckpt": str(ckpt),
            "sha256": meta.get("sha256") or sha256_file(ckpt),
            "dataset": meta.get("dataset"),
            "recorded_test_acc1": meta.get("test_acc1"),
        }

    def train(self, mode: bool = True) -> "NetworkTeacher":
        return super().train(False)  # frozen: BN uses running statistics, always

    @property
    def feature_module(self) -> nn.Module:
        """The network that feature taps hook (``teacher.model.taps``); see :mod:`kdx.features`."""
        return self.net

    @torch.no_grad()
    def forward(self, x, y=None, idx=None) -> ModelOutput:
        return ModelOutput(self.net(x))

    @classmethod
    def prepare(cls, cfg, ctx) -> dict[str, Any]:
        """Find the teacher's weights: ``teacher.ckpt``, else the store, else train one."""
        tcfg = cfg.teacher
        arch = tcfg.model.name
        key = ctx.dataset_key + (f"-{tcfg.store_tag}" if tcfg.get("store_tag") else "")
        if tcfg.get("ckpt"):
            ckpt = Path(tcfg.ckpt).expanduser()
            meta = _sidecar_for(ckpt)
            if meta.get("arch") not in (None, arch):
                raise CheckpointError(
                    f"teacher.ckpt={ckpt} was trained as '{meta['arch']}' but the teacher model is '{arch}'. "
                    f"Set model@teacher.model={meta['arch']} or pass a {arch} checkpoint."
                )
            if meta.get("num_classes") not in (None, ctx.num_classes):
                raise CheckpointError(
                    f"teacher.ckpt={ckpt} has {meta['num_classes']} classes but data={ctx.dataset_key} has "
                    f"{ctx.num_classes}. Pass a teacher trained on this dataset (teacher.ckpt=...)."
                )
            return {"ckpt": str(ckpt), "arch": arch, "sidecar": _brief(meta), "dataset_key": ctx.dataset_key}
        store = TeacherStore(cfg.paths.teachers)
        if _is_ddp_child():
            # DDP processes started by rank 0 follow it: rank 0 holds the lock and writes the store;
            # if it is training the teacher, this process joins that training as a DDP rank.
            found = store.lookup(key, arch)
            weights, meta = found if found is not None else ctx.train_teacher(cfg)
            return {"ckpt": str(weights), "arch": arch, "sidecar": _brief(meta), "dataset_key": ctx.dataset_key}
        with store.lock(key, arch):
            found = store.lookup(key, arch)
            if found is None:
                if not tcfg.get("auto_train", True):
                    raise CheckpointError(
                        f"No {arch} teacher for '{key}' in the teacher store {store.entry_dir(key, arch)}. "
                        f"Pass teacher.ckpt=<path>, train one with `python -m kdx task=train model={arch} "
                        f"data=...`, or set teacher.auto_train=true."
                    )
                log.warning(
                    "No %s teacher for '%s' in the teacher store (%s): training it first with the teacher "
                    "recipe (teacher.train), then distilling.", arch, key, store.root,
                )
                weights, meta = ctx.train_teacher(cfg)
                store.put(key, arch, weights, meta)
                found = store.lookup(key, arch)
                log.info("Stored the new teacher at %s", found[0])
            weights, meta = found
        return {"ckpt": str(weights), "arch": arch, "sidecar": _brief(meta), "dataset_key": ctx.dataset_key}


_SIDECAR_FIELDS = ("arch", "dataset", "num_classes", "test_acc1", "sha256")


def _brief(meta: dict[str, Any]) -> dict[str, Any]:
    """The sidecar fields the teacher needs (not its nested config, which holds _target_ nodes)."""
    return {k: meta.get(k) for k in _SIDECAR_FIELDS}


def _is_ddp_child() -> bool:
    import os

    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) > 0


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
