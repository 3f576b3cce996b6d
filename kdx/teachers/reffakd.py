"""ReffAKD (Doshi & Kim, arXiv 2404.09886), stage B: a table of class soft labels as a teacher (``teacher=reffakd``).

- :class:`ReffAKDTeacher`: for label ``y`` the teacher logits are ``T·log Q[y]``, so that ``softmax(z_t / T) = Q[y]``
  exactly at the loss's temperature ``T``; KD, DKD and TopKD then run unchanged on it (``distill=dkd
  teacher=reffakd``). It reads the label, so its own accuracy means nothing (``measures_accuracy = False``).
- :class:`ReffAKDSource` (the ``teacher=reffakd`` node): ``teacher.artifact`` if given, else the artifact in the
  teacher store (``paths.teachers/<dataset>/reffakd-<hash of teacher.ae>/``), else (``auto_build``) stage A runs
  first as a kdx task of this run (:mod:`kdx.teachers.reffakd_stage_a`, through the run context).
The table's math and files: :mod:`kdx.teachers.reffakd_table`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from kdx.distill.base import ModelOutput
from kdx.errors import CheckpointError, ConfigError
from kdx.teachers.base import Teacher, TeacherContext, TeacherSource
from kdx.teachers.reffakd_stats import table_stats
from kdx.teachers.reffakd_table import HEATMAP, AESettings, artifact_complete, artifact_name, read_artifact

log = logging.getLogger(__name__)


class ReffAKDTeacher(Teacher):
    """Soft-label table teacher: ``forward(x, y, idx) -> ModelOutput(T·log Q[y])``."""

    measures_accuracy = False

    def __init__(self, artifact: str | Path, temperature: float = 4.0, num_classes: Optional[int] = None,
                 built_in_run: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"teacher.temperature={temperature!r} must be > 0.")
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
            "ae_zero_output_test_mse": meta.get("zero_output_test_mse"),  # absent from tables built before it
            "table_stats": table_stats(Q),
        }
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


class ReffAKDSource(TeacherSource):
    """``teacher=reffakd``: the table from ``artifact``, else the store, else stage A first (``auto_build``)."""

    has_network = False

    def __init__(self, temperature: float = 4.0, artifact: Optional[str] = None, auto_build: bool = True,
                 ae: Optional[DictConfig] = None) -> None:
        self.temperature, self.artifact, self.auto_build = float(temperature), artifact, bool(auto_build)
        self.ae: AESettings = instantiate(ae) if ae is not None else AESettings()

    def load(self, ctx: TeacherContext) -> ReffAKDTeacher:
        if self.artifact:
            d = Path(str(self.artifact)).expanduser()
            _, meta = read_artifact(d)
            if meta.get("dataset") not in (None, ctx.dataset_key):
                log.warning("teacher.artifact=%s was built on '%s', this run's data are '%s'.", d, meta.get("dataset"),
                            ctx.dataset_key)
            return ReffAKDTeacher(d, self.temperature, ctx.num_classes)
        d = ctx.store.entry_dir(ctx.dataset_key, artifact_name(self.ae))
        built = False
        if not artifact_complete(d):
            if not self.auto_build:
                raise CheckpointError(
                    f"No ReffAKD soft-label table for '{ctx.dataset_key}' with these teacher.ae settings ({d}). Build "
                    "it with `python -m kdx task=reffakd_ae teacher=reffakd data=...`, pass teacher.artifact=<folder>, "
                    "or set teacher.auto_build=true."
                )
            log.warning("No ReffAKD soft-label table for '%s' with these settings in the teacher store (%s): running "
                        "stage A first (training the autoencoder, %s epochs), then distilling.", ctx.dataset_key, d,
                        self.ae.epochs)
            built = not ctx.run_task("reffakd_ae", "reffakd_ae").get("skipped", False)
        return ReffAKDTeacher(d, self.temperature, ctx.num_classes, built_in_run=built)


__all__ = ["ReffAKDSource", "ReffAKDTeacher"]
