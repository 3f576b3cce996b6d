"""Teachers: where soft targets come from.

Two roles, two classes:

- :class:`TeacherSource` is what a ``teacher=`` config node builds (``_target_``): the *recipe* for getting a
  teacher (a checkpoint, the teacher store, training one first; or a label table built by ReffAKD's stage A).
  Every argument of its constructor is a setting it uses. :meth:`TeacherSource.load` finds or builds what is
  missing (through the run context, which can run another kdx job) and returns the teacher.
- :class:`Teacher` is the frozen object the training step calls: ``(x, y, idx) -> ModelOutput``. It is never
  trained by the student's optimiser: the regime holds it outside its registered submodules (so it is not in
  ``parameters()``, checkpoints, or DDP).

Every capability the orchestration reads is declared here with its default; subclasses override them.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from kdx.distill.base import ModelOutput
from kdx.teachers.store import TeacherStore


class Teacher(nn.Module):
    #: whether the teacher's own test accuracy means anything (False for label tables)
    measures_accuracy: bool = True
    #: test accuracy recorded with the checkpoint (None: the regime measures it once)
    known_acc1: Optional[float] = None

    def __init__(self) -> None:
        super().__init__()
        #: a short description for results files (architecture, checkpoint, sha256 ...)
        self.info: dict[str, Any] = {}
        #: sizes and times for results.json's ``resources`` (e.g. ReffAKD's autoencoder and table build)
        self.resources: dict[str, Any] = {}
        #: pictures a logger shows once when fitting starts: key → PNG path (ReffAKD's similarity heat-map)
        self.images: dict[str, str] = {}

    def describe(self) -> str:
        """One line for the run's log naming what was loaded (the same facts ``results.json``'s ``teacher_info``
        records): here the generic fields of :attr:`info`; subclasses say more."""
        return ", ".join(f"{k} {v}" for k, v in self.info.items() if v is not None) or type(self).__name__

    @property
    def network(self) -> Optional[nn.Module]:
        """The network whose modules feature taps and BN-statistics hooks attach to; None for a label table."""
        return None

    @property
    def sees_own_view(self) -> bool:
        """Whether :meth:`adapt_input` changes the batch (a pretrained teacher's own size/normalisation)."""
        return False

    def adapt_input(self, x: Tensor) -> Tensor:
        """The teacher's own view of the student's batch ``x`` (its normalisation and input size, built on the
        device: :class:`kdx.models.input_view.InputView`); whoever calls the teacher passes it this. Identity here."""
        return x

    def forward(self, x: Tensor, y: Tensor, idx: Tensor) -> ModelOutput:  # pragma: no cover
        raise NotImplementedError

    # Hooks the regime calls around training (no-ops here; the teacher-logit cache uses them)
    def fill(self, trainer: Any, prep: Callable[[Tensor], Tensor]) -> None:
        """At fit start, before the first step: build what training steps will read."""

    def set_epoch(self, epoch: int) -> None:
        """At the start of each training epoch (0-based)."""

    def metrics(self) -> dict[str, float]:
        """Extra values logged with each validation."""
        return {}

    @contextmanager
    def batch_norm_batch_stats(self) -> Iterator[None]:
        """Inside the block the network's BatchNorm layers use (and update) batch statistics, as an official code
        that leaves its teacher in train mode does (``Strategy.teacher_bn_batch_stats``); eval mode after."""
        bns = [m for m in (self.network.modules() if self.network is not None else []) if isinstance(m, _BatchNorm)]
        for m in bns:
            m.train(True)
        try:
            yield
        finally:
            for m in bns:
                m.train(False)

    def for_evaluation(self) -> "Teacher":
        """The teacher that scores held-out images (its own accuracy); a cache of training logits defers."""
        return self


class TeacherContext:
    """What a :class:`TeacherSource` may use while loading: the run's data identity (key, classes, image shape and
    normalisation), the teacher store, this process's rank, and two ways to run another kdx job (the composition
    root, :class:`kdx.build.RunContext`, implements them with the runner it was given; teachers never import the
    runner)."""

    dataset_key: str
    num_classes: int
    output_dir: Path
    store: TeacherStore
    rank: int
    image_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def train_teacher(self, model: Any, recipe: Any) -> tuple[Path, dict[str, Any]]:  # pragma: no cover
        """Train the network ``model`` (a model config node) from labels with ``recipe`` (``teacher.train``);
        returns the weights' path and their sidecar."""
        raise NotImplementedError

    def run_task(self, task: str, folder: str) -> dict[str, Any]:  # pragma: no cover
        """Run this run's config as another ``task`` (e.g. ``reffakd_ae``) in ``<run>/<folder>``; its results."""
        raise NotImplementedError


class TeacherSource:
    """What a ``teacher=`` config node builds; :meth:`load` returns the :class:`Teacher` of the run."""

    #: whether the teacher is a network (feature taps, BN statistics, the logit cache need one); False for tables
    has_network: ClassVar[bool] = True
    #: the network's model config node (``teacher.model``), checked at start-up (feature taps); None for tables
    model_config: Optional[Any] = None

    def load(self, ctx: TeacherContext) -> Teacher:  # pragma: no cover - every source implements it
        raise NotImplementedError


__all__ = ["Teacher", "TeacherContext", "TeacherSource"]
