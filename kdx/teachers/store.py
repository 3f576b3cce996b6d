"""The teacher store: trained teachers keyed by dataset and architecture.

Layout: ``<paths.teachers>/<dataset key>/<arch>/teacher.pt`` (the weights, a plain state
dict) with ``teacher.json`` beside it (architecture, dataset, classes, test accuracy,
sha256 of the weights, the config that trained it). Writes are atomic. A file lock per entry
makes concurrent jobs that need the same missing teacher train it once: the first takes the
lock and trains, the others wait and then find it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from kdx.io import CheckpointError, atomic_path, file_lock, atomic_write_json, sha256_file

WEIGHTS, SIDECAR = "teacher.pt", "teacher.json"


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", part)


class TeacherStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

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
                f"Delete the folder {d} to retrain it, or pass teacher.ckpt=<path>."
            )
        return weights, meta

    def put(self, dataset_key: str, arch: str, weights: Path, meta: dict[str, Any]) -> Path:
        """Copy ``weights`` into the store with its sidecar (atomically: weights first)."""
        d = self.entry_dir(dataset_key, arch)
        d.mkdir(parents=True, exist_ok=True)
        with atomic_path(d / WEIGHTS) as tmp:
            shutil.copyfile(weights, tmp)
        meta = dict(meta, sha256=sha256_file(d / WEIGHTS))
        atomic_write_json(d / SIDECAR, meta)
        return d / WEIGHTS
