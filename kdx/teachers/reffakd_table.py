"""ReffAKD's soft-label table (a leaf module): its math, its files and the settings of stage A that key it.

- :func:`class_similarity`: the C×C matrix ``A`` from already selected embeddings (step B.3–4 of the official
  code): the cosine of every unordered pair ``i < j`` (eps 1e-8) is added to ``sum[c_i, c_j]`` and
  ``sum[c_j, c_i]`` when the classes differ, once to ``sum[c, c]`` when they agree; ``A = sum / count`` and
  ``A[c, c] += diag_bonus``.
- :func:`soft_labels`: ``Q = softmax(A, dim=1)`` (no temperature).
- :class:`AESettings`: ``teacher.ae``, stage A's recipe (the official defaults); all but ``eval_batch_size`` key the
  artifact, ``paths.teachers/<dataset>/reffakd-<hash of the settings>/`` (:func:`artifact_name`).
- :func:`read_artifact`: the table of an artifact folder, checked against its sha256.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdx.errors import CheckpointError, ConfigError
from kdx.io import sha256_file

TABLE, AE_WEIGHTS, META, HEATMAP = "table.pt", "ae.pt", "reffakd.json", "similarity.png"
_NOT_KEYED = ("eval_batch_size",)


@dataclass
class AESettings:
    """``teacher.ae``: ReffAKD stage A, the official recipe by default (docs/methods.md, ReffAKD)."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    milestones: list = field(default_factory=lambda: [60, 120, 160])
    gamma: float = 0.2
    pad: int = 4
    rotation: float = 15.0
    samples_per_class: int = 40
    selection_seed: int = 42
    diag_bonus: float = 0.0225
    embed_augmented: bool = True
    recon_target: str = "normalised"
    seed: int = 0
    eval_batch_size: int = 1000

    def __post_init__(self) -> None:
        self.milestones = [int(m) for m in self.milestones]
        if self.recon_target not in ("normalised", "pixels"):
            raise ConfigError(f"teacher.ae.recon_target={self.recon_target!r}: normalised (the official code: MSE "
                              "against the normalised input) or pixels (against x/255, which the sigmoid can reach).")
        for key in ("epochs", "batch_size", "samples_per_class", "eval_batch_size"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"teacher.ae.{key}={getattr(self, key)!r} must be >= 1.")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def settings_hash(settings: AESettings) -> str:
    keyed = {k: v for k, v in sorted(settings.as_dict().items()) if k not in _NOT_KEYED}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:10]


def artifact_name(settings: AESettings) -> str:
    """The store entry name of a table: ``reffakd-<short hash of the settings>``."""
    return f"reffakd-{settings_hash(settings)}"


def class_similarity(embeddings: Tensor, labels: Tensor, num_classes: int, diag_bonus: float = 0.0225) -> Tensor:
    """Mean pairwise cosine similarity between and within classes, float64 ``[C, C]``.

    ``embeddings`` ``[N, D]`` and ``labels`` ``[N]`` are the selected samples (e.g. 40 per class).
    Every unordered pair is used once: cross-class pairs count for both ``[a, b]`` and ``[b, a]``
    (so ``A`` is symmetric), same-class pairs once for ``[c, c]``. Every class needs at least two
    samples (a class's own mean is over its pairs).
    """
    e = embeddings.detach().to(torch.float64).flatten(1)
    y = torch.as_tensor(labels, device=e.device).long()
    if e.shape[0] != y.shape[0]:
        raise ValueError(f"{e.shape[0]} embeddings but {y.shape[0]} labels")
    counts = torch.bincount(y, minlength=num_classes)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    if bool((counts < 2).any()):
        few = torch.nonzero(counts < 2).flatten().tolist()
        raise ValueError(
            f"class_similarity needs at least 2 samples of every class; classes {few[:10]} have fewer. "
            "Raise teacher.ae.samples_per_class or use a larger data subset."
        )
    norm = e.norm(dim=1)
    cos = (e @ e.T) / torch.outer(norm, norm).clamp_min(1e-8)  # torch.cosine_similarity's eps on the product
    upper = torch.triu(torch.ones_like(cos, dtype=torch.bool), diagonal=1)
    onehot = torch.nn.functional.one_hot(y, num_classes).to(torch.float64)
    pair_sum = onehot.T @ (cos * upper) @ onehot  # [a, b]: Σ over i<j with c_i = a, c_j = b
    pair_cnt = onehot.T @ upper.to(torch.float64) @ onehot
    eye = torch.eye(num_classes, dtype=torch.bool, device=e.device)
    total = torch.where(eye, pair_sum, pair_sum + pair_sum.T)
    count = torch.where(eye, pair_cnt, pair_cnt + pair_cnt.T)
    return total / count + diag_bonus * eye.to(torch.float64)


def soft_labels(A: Tensor) -> Tensor:
    """``Q = softmax(A, dim=1)``: row ``c`` is the soft label of class ``c`` (rows sum to 1)."""
    return torch.softmax(A, dim=1)


def artifact_complete(d: Path) -> bool:
    return (d / META).is_file() and (d / TABLE).is_file() and (d / AE_WEIGHTS).is_file()


def read_artifact(d: Path, setting: str = "teacher.artifact") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The soft-label table ``{"A", "Q"}`` and the metadata of an artifact folder (checked by sha256)."""
    d = Path(d)
    if not artifact_complete(d):
        raise CheckpointError(
            f"{d} is not a ReffAKD artifact (needs {TABLE}, {AE_WEIGHTS} and {META}). Set {setting} to the "
            "folder `python -m kdx task=reffakd_ae teacher=reffakd data=...` wrote, or leave it null."
        )
    meta = json.loads((d / META).read_text())
    digest = sha256_file(d / TABLE)
    if digest != meta.get("table_sha256"):
        raise CheckpointError(
            f"{d / TABLE} does not match the sha256 in {d / META}: the file was changed or truncated. "
            f"Delete the folder {d} to rebuild it (stage A reruns)."
        )
    table = torch.load(d / TABLE, map_location="cpu", weights_only=True)
    return table, meta


__all__ = ["AESettings", "artifact_complete", "artifact_name", "class_similarity", "read_artifact", "settings_hash", "soft_labels"]
