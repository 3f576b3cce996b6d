"""ReffAKD (Doshi & Kim, arXiv 2404.09886), METHODS.md §5, stage B: a table of class soft labels as a teacher.

- :func:`class_similarity`: the C×C matrix ``A`` from already selected embeddings (step B.3–4 of
  the official code): the cosine of every unordered pair ``i < j`` (eps 1e-8) is added to
  ``sum[c_i, c_j]`` and ``sum[c_j, c_i]`` when the classes differ, once to ``sum[c, c]`` when they
  agree; ``A = sum / count`` and ``A[c, c] += diag_bonus``.
- :func:`soft_labels`: ``Q = softmax(A, dim=1)`` (no temperature).
- :class:`ReffAKDTeacher`: for label ``y`` the teacher logits are ``T·log Q[y]``, so that
  ``softmax(z_t / T) = Q[y]`` exactly at the loss's temperature ``T``; KD, DKD and TopKD then run
  unchanged on it (``distill=dkd teacher=reffakd``). It reads the label, so its own accuracy means
  nothing (``measures_accuracy = False``). Its ``prepare`` finds the stage-A artifact in the teacher
  store (``paths.teachers/<dataset>/reffakd-<hash of teacher.ae>/``) or runs stage A first
  (:mod:`kdx.teachers.reffakd_ae`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from kdx.distill.base import ModelOutput
from kdx.io import CheckpointError, sha256_file
from kdx.teachers.base import Teacher
from kdx.teachers.store import TeacherStore

log = logging.getLogger(__name__)

TABLE, AE_WEIGHTS, META, HEATMAP = "table.pt", "ae.pt", "reffakd.json", "similarity.png"


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


class ReffAKDTeacher(Teacher):
    """Soft-label table teacher: ``forward(x, y, idx) -> ModelOutput(T·log Q[y])``."""

    measures_accuracy = False
    has_network = False  # a label table: a teacher model set by an experiment is ignored

    def __init__(
        self,
        artifact: Optional[str] = None,
        temperature: float = 4.0,
        auto_build: bool = True,
        ae: Optional[dict[str, Any]] = None,
        dataset_key: Optional[str] = None,
        num_classes: Optional[int] = None,
        built_in_run: bool = False,
        model: Any = None,
        train: Any = None,
    ) -> None:
        # ``model`` / ``train``: the table has no network. An experiment that sets a network teacher's
        # model and recipe (``model@teacher.model=...``, ``teacher.train.*``, e.g. experiment=quickstart)
        # still composes and runs with teacher=reffakd: both are ignored (the runner does not build the model).
        super().__init__()
        if artifact is None:
            raise CheckpointError("No ReffAKD artifact: set teacher.artifact=<folder> (or let kdx build one).")
        if temperature <= 0:
            raise ValueError(f"teacher.temperature={temperature!r} must be > 0.")
        table, meta = read_artifact(Path(artifact))
        Q = table["Q"].to(torch.float64)
        if num_classes is not None and Q.shape[0] != num_classes:
            raise CheckpointError(
                f"The ReffAKD table {artifact} has {Q.shape[0]} classes but the data have {num_classes}. "
                "Set teacher.artifact to a table built on this dataset (or null to build one)."
            )
        self.temperature = float(temperature)
        self.register_buffer("log_q", torch.log(Q).to(torch.float32))
        self.info = {
            "arch": "reffakd",
            "artifact": str(artifact),
            "dataset": meta.get("dataset"),
            "settings_hash": meta.get("settings_hash"),
            "table_sha256": meta.get("table_sha256"),
            "temperature": self.temperature,
            "ae_params": meta.get("ae_params"),
            "ae_best_test_mse": meta.get("best_test_mse"),
        }
        # pictures a logger shows once at the start of the distillation (kdx.callbacks.LogTeacherImages)
        self.images = {"reffakd/similarity": str(Path(artifact) / HEATMAP)}
        self.resources = {
            "teacher_kind": "reffakd soft-label table (no teacher network at distillation time)",
            "ae_params": meta.get("ae_params"),
            "ae_train_time_s": meta.get("ae_train_time_s"),
            "ae_epochs": (meta.get("settings") or {}).get("epochs"),
            "soft_label_build_time_s": meta.get("soft_label_build_time_s"),
            "stage_a_device": meta.get("device"),
            "stage_a_ran_in_this_run": bool(built_in_run),
        }

    def train(self, mode: bool = True) -> "ReffAKDTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x=None, y=None, idx=None) -> ModelOutput:
        if y is None:
            raise ValueError("The ReffAKD teacher reads the labels: call it as teacher(x, y, idx).")
        return ModelOutput(self.temperature * self.log_q[y])

    @classmethod
    def prepare(cls, cfg, ctx) -> dict[str, Any]:
        """Find the artifact: ``teacher.artifact``, else the store, else run stage A (``teacher.auto_build``)."""
        from kdx.teachers.reffakd_ae import ae_settings, artifact_name, build_artifact

        tcfg = cfg.teacher
        common = {"dataset_key": ctx.dataset_key, "num_classes": ctx.num_classes}
        if tcfg.get("artifact"):
            d = Path(tcfg.artifact).expanduser()
            _, meta = read_artifact(d)
            if meta.get("dataset") not in (None, ctx.dataset_key):
                log.warning("teacher.artifact=%s was built on '%s', this run's data are '%s'.", d,
                            meta.get("dataset"), ctx.dataset_key)
            return {"artifact": str(d), **common}
        name = artifact_name(ae_settings(tcfg.ae))
        store = TeacherStore(cfg.paths.teachers)
        d = store.entry_dir(ctx.dataset_key, name)
        built = False
        with store.lock(ctx.dataset_key, name):
            if not artifact_complete(d):
                if not tcfg.get("auto_build", True):
                    raise CheckpointError(
                        f"No ReffAKD soft-label table for '{ctx.dataset_key}' with these teacher.ae settings "
                        f"({d}). Build it with `python -m kdx task=reffakd_ae teacher=reffakd data=...`, "
                        "pass teacher.artifact=<folder>, or set teacher.auto_build=true."
                    )
                log.warning(
                    "No ReffAKD soft-label table for '%s' with these settings in the teacher store (%s): running "
                    "stage A first (training the autoencoder, %s epochs), then distilling.",
                    ctx.dataset_key, d, tcfg.ae.epochs,
                )
                build_artifact(cfg, ctx.output_dir / "reffakd_ae", lock=False)
                built = True
        return {"artifact": str(d), "built_in_run": built, **common}
