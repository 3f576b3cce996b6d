"""Safe file handling: atomic writes, hashing, and checkpoint loading with clear errors.

Checkpoint layouts :func:`load_state_dict_file` reads (``weights_only=True``, so no code in a file runs):

- a plain state dict; a ``.safetensors`` file;
- Lightning's ``{"state_dict": ...}`` (kdx's own: the ``student.`` part);
- mdistiller's and CRD's (RepDistiller's) released CIFAR-100 teachers, as they are:
  ``<arch>_vanilla/ckpt_epoch_240.pth`` = ``{"epoch": 240, "model": state_dict, "accuracy": tensor, "optimizer": ...}``
  (``*_best.pth``: ``best_acc``; ``*_last.pth`` also holds the run's ``argparse.Namespace`` ``opt``, allowed here).
  Their parameter names are kdx's own for every zoo architecture both repositories define (resnet8…110, resnet8x4,
  resnet32x4, ResNet18/50, wrn_16_1…wrn_40_2, vgg8…19, MobileNetV2, ShuffleV1/V2: same modules, same order, same
  outputs; tests/test_released_teachers.py), so no key is renamed;
- ``{"net": ...}`` / ``{"student": ...}``; a ``module.`` (DataParallel) or ``model.`` prefix is stripped.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import fcntl
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from kdx.errors import CheckpointError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto ``path`` if the block succeeds, removed if not.

    So a kill never leaves a half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_state_dict_file(path: str | os.PathLike, setting: str) -> dict[str, torch.Tensor]:
    """Load a state dict safely (``weights_only=True`` or safetensors) from common layouts.

    Accepted: a plain state dict; ``{"state_dict": ...}`` (Lightning, with a ``student.`` or
    ``model.`` prefix stripped); ``{"model": ...}`` / ``{"net": ...}`` (mdistiller/CRD style);
    a ``.safetensors`` file. ``setting`` names the config key that chose the file, for errors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. Set {setting}=<path to a checkpoint>.")
    try:
        obj = _read(path)
    except Exception as e:  # truncated zip, foreign pickle, random bytes ...
        raise CheckpointError(
            f"Cannot read checkpoint {path}: it is truncated, corrupted or not a PyTorch/safetensors "
            f"weights file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"Re-create it, or point {setting} to another file."
        ) from None
    return _extract_state_dict(obj, path, setting)


def _read(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    with torch.serialization.safe_globals([argparse.Namespace]):  # RepDistiller's *_last.pth keep their options
        return torch.load(path, map_location="cpu", weights_only=True)


STATE_DICT_KEYS = ("state_dict", "model", "net", "student")


def _extract_state_dict(obj: Any, path: Path, setting: str) -> dict[str, torch.Tensor]:
    top = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} holds no state dict of tensors (found: {top}). Accepted layouts: a state dict, or a dict with "
            f"one under {list(STATE_DICT_KEYS)} (Lightning; mdistiller/CRD teachers: {{'model': ...}}). "
            f"Point {setting} to a weights file."
        )
    sd = dict(obj)
    if any(k.startswith("student.") for k in sd):  # a kdx Lightning checkpoint: the student only
        sd = {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")}
    for prefix in ("model.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint in mdistiller's/CRD's layout says about itself: ``{"epochs", "layout"}`` (the epoch it was
    saved at); ``{}`` for other layouts or unreadable files (loading reports those)."""
    try:
        obj = _read(Path(path))
    except Exception:
        return {}
    if not (isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and isinstance(obj.get("epoch"), int)):
        return {}
    return {"epochs": int(obj["epoch"]), "layout": "mdistiller/CRD {'epoch', 'model', ...}"}


def _folder_arch(path: Path | str) -> str:
    """The architecture a released teacher's folder names (``resnet32x4_vanilla/ckpt_epoch_240.pth``), or ''."""
    folder = Path(path).parent.name
    return folder[: -len("_vanilla")] if folder.endswith("_vanilla") else ""


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path | str, setting: str) -> None:
    """``model.load_state_dict`` with a message that names the file and the likely cause."""
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if mismatched or missing or unexpected:
        lines = [f"Checkpoint {path} does not fit the model ({type(model).__name__})."]
        if mismatched:
            lines.append("Shape mismatches (a different class count or width?): " + "; ".join(mismatched[:4]))
        if missing:
            lines.append(f"Missing keys ({len(missing)}): " + ", ".join(missing[:4]))
        if unexpected:
            lines.append(f"Unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:4]))
        arch = _folder_arch(path)
        if arch:
            lines.append(f"Its folder names the architecture '{arch}' (mdistiller/CRD release): "
                         f"try teacher_arch={arch}.")
        lines.append(f"Check the architecture and dataset, or set {setting} to a matching checkpoint.")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{dotted key: leaf}`` (an empty mapping stays a leaf), for config diffs and keys."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: obj}


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created with its folder): one process at a time across jobs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
