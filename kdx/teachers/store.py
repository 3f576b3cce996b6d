"""The teacher store: trained teachers keyed by dataset and architecture.

Layout: ``<paths.teachers>/<dataset key>/<arch>/teacher.pt`` (the weights, a plain state dict) with
``teacher.json`` beside it (architecture, dataset, classes, test accuracy, sha256 of the weights, the budget it
was trained with, the config that trained it). Writes are atomic. A file lock per entry makes concurrent jobs
that need the same missing teacher train it once: the first takes the lock and trains, the others wait and
then find it.

Honest: a model enters the store only when its run completed its whole configured budget (no
``limit_*_batches``, ``max_steps``, ``fast_dev_run``, ``overfit_batches`` or stop before the last epoch: its
sidecar's ``budget.complete``), and an entry is never overwritten. ``python -m kdx.teachers list|show|remove``
lists, inspects and removes entries.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from kdx.errors import CheckpointError
from kdx.io import atomic_path, atomic_write_json, file_lock, sha256_file

WEIGHTS, SIDECAR = "teacher.pt", "teacher.json"
log = logging.getLogger(__name__)


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", part)


class TeacherStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()

    def entry_dir(self, dataset_key: str, arch: str) -> Path:
        return self.root / _safe(dataset_key) / _safe(arch)

    @contextmanager
    def lock(self, dataset_key: str, arch: str) -> Iterator[None]:
        d = self.entry_dir(dataset_key, arch)
        with file_lock(d.parent / f".{d.name}.lock"):
            yield

    def lookup(self, dataset_key: str, arch: str) -> Optional[tuple[Path, dict[str, Any]]]:
        """The weights path and sidecar of a stored teacher, checked against its sha256."""
        d = self.entry_dir(dataset_key, arch)
        weights, sidecar = d / WEIGHTS, d / SIDECAR
        if not (weights.is_file() and sidecar.is_file()):
            return None
        meta = json.loads(sidecar.read_text())
        digest = sha256_file(weights)
        if digest != meta.get("sha256"):
            raise CheckpointError(
                f"Stored teacher {weights} does not match the sha256 recorded in {sidecar} "
                f"({digest[:12]}… vs {str(meta.get('sha256'))[:12]}…): the file was changed or truncated. "
                f"Remove it with `python -m kdx.teachers remove {dataset_key} {arch}` to retrain it, or pass "
                "teacher.ckpt=<path>."
            )
        return weights, meta

    def register(self, dataset_key: str, arch: str, weights: Path, meta: dict[str, Any]) -> Optional[Path]:
        """Store ``weights`` when their run completed its whole budget and no teacher is stored under this key;
        returns the stored path, or None (with the reason logged). Call it under :meth:`lock`."""
        budget = meta.get("budget") or {}
        if not budget.get("complete"):
            log.warning("Not storing this %s as the '%s' teacher: its run was cut short (%s); it is used for this run "
                        "only.", arch, dataset_key, budget.get("cut") or "no budget record")
            return None
        if self.lookup(dataset_key, arch) is not None:
            log.info("A %s teacher for '%s' is already stored in %s: kept as it is (never overwritten).", arch,
                     dataset_key, self.entry_dir(dataset_key, arch))
            return None
        path = self._put(dataset_key, arch, weights, meta)
        log.info("Stored the %s teacher for '%s': %s (test top-1 %s %%, %s epochs)", arch, dataset_key, path,
                 _fmt(meta.get("test_acc1")), budget.get("epochs"))
        return path

    def _put(self, dataset_key: str, arch: str, weights: Path, meta: dict[str, Any]) -> Path:
        """Copy ``weights`` into the store with its sidecar (atomically: weights first, the sidecar marks it)."""
        d = self.entry_dir(dataset_key, arch)
        d.mkdir(parents=True, exist_ok=True)
        with atomic_path(d / WEIGHTS) as tmp:
            shutil.copyfile(weights, tmp)
        meta = dict(meta, sha256=sha256_file(d / WEIGHTS))
        atomic_write_json(d / SIDECAR, meta)
        return d / WEIGHTS

    def entries(self) -> list[tuple[str, str, dict[str, Any]]]:
        """``(dataset key, arch, sidecar)`` of every stored teacher (sidecars unchecked: listing is cheap)."""
        out = []
        for sidecar in sorted(self.root.glob(f"*/*/{SIDECAR}")):
            try:
                meta = json.loads(sidecar.read_text())
            except (OSError, json.JSONDecodeError):
                meta = {"error": "unreadable teacher.json"}
            out.append((sidecar.parent.parent.name, sidecar.parent.name, meta))
        return out

    def remove(self, dataset_key: str, arch: str) -> Path:
        """Delete one entry (under its lock); raises :class:`CheckpointError` when there is none."""
        d = self.entry_dir(dataset_key, arch)
        if not d.is_dir():
            known = ", ".join(f"{k} {a}" for k, a, _ in self.entries()) or "none"
            raise CheckpointError(f"No stored teacher '{dataset_key} {arch}' in {self.root} (stored: {known}).")
        with self.lock(dataset_key, arch):
            shutil.rmtree(d)
        return d


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else str(value)


__all__ = ["TeacherStore"]
