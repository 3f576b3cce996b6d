"""Using a trained student from Python.

    from kdx.api import load_student, evaluate
    student = load_student("outputs/2026-11-30/12-00-00_kd_resnet8")    # a run folder
    logits = student(images)            # uint8 [B,C,H,W] 0-255, or float in [0, 1]: normalised as in training
    labels = student.predict(images)    # class indices; student.class_names[i] names them
    evaluate("outputs/.../12-00-00_kd_resnet8")  # {'acc1': ..., 'acc5': ..., 'n': ..., 'split': 'test', ...}

A run folder holds ``student.pt`` (last weights), ``student_best.pt`` (the best epoch's) and ``student.json``
(architecture, model settings, class names, the normalisation, the data settings); those are all that is read, so a
copied run folder works elsewhere. A teacher trained by kdx (``teacher.pt`` + ``teacher.json``) loads the same way
(``load_student(path_to_teacher.pt)``).
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from kdx.errors import CheckpointError, ConfigError
from kdx.io import load_into, load_state_dict_file

__all__ = ["Predictor", "evaluate", "load_student"]

WEIGHTS = {"last": "student.pt", "best": "student_best.pt"}


class Predictor(nn.Module):
    """A trained network with its input normalisation: ``forward(x)`` → logits, :meth:`predict` → class indices.

    ``x`` is uint8 ``[B, C, H, W]`` (0–255, what kdx's array loaders yield) or floating point in ``[0, 1]`` (e.g.
    torchvision's ``ToTensor()``); either is normalised with the training split's mean/std, as in training.
    Already normalised floats go to :attr:`net` directly. Always in eval mode; no gradients in :meth:`predict`.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], meta: dict[str, Any]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1), persistent=False)
        self.meta = meta
        self.class_names: list[str] = list(meta.get("class_names") or [])
        self.eval()

    def train(self, mode: bool = True) -> "Predictor":
        return super().train(False)

    def normalise(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div(255)
        elif not torch.is_floating_point(x):
            raise TypeError(f"images must be uint8 (0-255) or float in [0, 1], got {x.dtype}")
        return (x.to(self.mean.dtype) - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalise(x))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self(x).argmax(dim=1)


def _locate(path: str | Path, which: str) -> tuple[Path, Path]:
    """(weights file, sidecar) of a run folder or of a weights file beside its ``.json``."""
    p = Path(path).expanduser()
    if p.is_dir():
        if which not in WEIGHTS:
            raise ConfigError(f"which={which!r}: choose one of {', '.join(WEIGHTS)}.")
        weights, sidecar = p / WEIGHTS[which], p / "student.json"
        if not weights.is_file():
            done = (p / "results.json").is_file()
            raise CheckpointError(f"{weights} does not exist: "
                                  + ("the run wrote no best-epoch weights (choose which='last')." if done else
                                     f"{p} is not a finished kdx run folder (student.pt, student.json)."))
        return weights, sidecar
    if not p.is_file():
        raise CheckpointError(f"{p} is neither a run folder nor a weights file.")
    for sidecar in (p.with_suffix(".json"), p.parent / "student.json"):
        if sidecar.is_file():
            return p, sidecar
    raise CheckpointError(f"No sidecar for {p}: kdx writes student.json (teacher.json) beside the weights, and it "
                          "holds the architecture and normalisation the network needs.")


def load_student(path: str | Path, which: str = "last", device: str | torch.device = "cpu") -> Predictor:
    """The student of a finished run, ready to predict (:class:`Predictor`).

    ``path``: a run folder (``which``: ``"last"`` → ``student.pt``, ``"best"`` → ``student_best.pt``), or a weights
    file with its sidecar beside it (``student.pt`` + ``student.json``, ``teacher.pt`` + ``teacher.json``; a
    Lightning checkpoint in the run's ``checkpoints/`` uses the run's ``student.json``).
    """
    from hydra.utils import instantiate

    weights, sidecar = _locate(path, which)
    meta = json.loads(sidecar.read_text())
    try:
        model, num_classes, norm = meta["model"], int(meta["num_classes"]), meta["normalisation"]
    except KeyError as e:
        raise CheckpointError(f"{sidecar} lacks {e}: it was not written by this kdx version.") from None
    from kdx.resolvers import register_resolvers

    register_resolvers()
    net = instantiate(model, num_classes=num_classes)
    load_into(net, load_state_dict_file(weights, "path"), weights, "path")
    return Predictor(net, norm["mean"], norm["std"], {**meta, "weights": str(weights)}).to(device)


def evaluate(path: str | Path, split: str = "test", which: str = "last", device: str | torch.device = "cpu",
             batch_size: Optional[int] = None, data: Optional[dict[str, Any]] = None,
             precision: Optional[str] = None) -> dict[str, Any]:
    """Top-1/top-5 accuracy (%) of a run's student (``path`` and ``which`` as in :func:`load_student`) on a split of
    its own dataset: ``split`` ``"test"`` (what ``results.json`` reports as ``test_acc1_last``/``best``) or ``"val"``
    (the held-out split, when the run had one).

    The data are those the run recorded (``student.json``'s config); ``data`` changes settings of it (e.g.
    ``{"root": "/elsewhere", "test_subset": None}``). ``precision`` defaults to the run's (bf16 autocast when it
    trained in ``bf16-mixed``), so the numbers are the run's own.
    """
    from kdx.build import instantiate_data
    from omegaconf import OmegaConf

    student = load_student(path, which, device)
    config = student.meta.get("config") or {}
    if "data" not in config:
        raise CheckpointError(f"{student.meta['weights']}: its sidecar records no data settings to evaluate on.")
    node = OmegaConf.create(config["data"])
    for key, value in (data or {}).items():
        if key not in node:
            raise ConfigError(f"data={{{key!r}: ...}}: not a setting of data={node.get('name')} "
                              f"(settings: {', '.join(map(str, node.keys()))}).")
        node[key] = value
    if batch_size is not None:
        node.eval_batch_size = int(batch_size)
    dm = instantiate_data(node)
    dm.setup()
    loaders = {"test": dm.test_dataloader, "val": dm.val_dataloader}
    if split not in loaders:
        raise ConfigError(f"split={split!r}: choose 'test' or 'val'.")
    if split == "val" and not dm.has_heldout_val:
        raise ConfigError("split='val': the run had no held-out split (data.val_split=0); use split='test'.")
    precision = precision or str(((config.get("trainer") or {}).get("precision")) or "32-true")
    dev = torch.device(device)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision.startswith("bf16") else
                torch.autocast(dev.type, dtype=torch.float16) if precision.startswith("16") else nullcontext())
    correct1 = correct5 = n = 0
    with torch.no_grad(), autocast:
        for batch in loaders[split]():
            x, y, _ = dm.transform_batch([t.to(dev) for t in batch[:3]], train=False)
            logits = student.net(x).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y[:, None]).any(dim=1).sum())
            n += int(y.numel())
    return {"acc1": 100.0 * correct1 / max(n, 1), "acc5": 100.0 * correct5 / max(n, 1), "n": n, "split": split,
            "weights": student.meta["weights"], "dataset": dm.dataset_key, "precision": precision}
