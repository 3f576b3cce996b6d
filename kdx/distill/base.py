"""The seams every method plugs into.

- :class:`Batch`: a training batch (images, labels, sample indices, and the extra augmented views a strategy
  asked for).
- :class:`ModelOutput`: what a network (student or teacher) gives a strategy: logits, the tap sets the strategy
  reads, its logits on the extra views, and its classifier when the strategy asks for it.
- :class:`Strategy`: ``(student_out, teacher_out, batch, epoch) -> {term: weighted loss}``. What the
  orchestration reads from a strategy is declared on this class with its default (see :class:`Strategy`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor


class Batch(NamedTuple):
    """A training batch: images, int64 labels, int64 sample indices of the split, and the extra augmented views of
    the same samples that the strategy declares (``Strategy.views``: ``{"strong": images}`` for MLKD)."""

    x: Tensor
    y: Tensor
    idx: Tensor
    views: Mapping[str, Tensor] = {}


@dataclass
class ModelOutput:
    """A network's output as a strategy sees it.

    - ``logits``: on ``batch.x``;
    - ``taps``: ``{set: [feature, ...]}``, the tap sets the strategy reads from this network
      (``Strategy.student_taps`` / ``teacher_taps``; see :mod:`kdx.features`);
    - ``views``: logits on each extra view of the batch (``Strategy.views``);
    - ``head``: the network's classifier (``Strategy.needs_head``), e.g. for logits of pooled regions (SDD);
    - ``extra``: the student's extra outputs the strategy declares (``Strategy.student_outputs``), e.g. DeiT's
      distillation-token logits ``{"dist": ...}``.
    """

    logits: Tensor
    taps: dict[str, list[Tensor]] = field(default_factory=dict)
    views: dict[str, Tensor] = field(default_factory=dict)
    head: Optional[nn.Module] = None
    extra: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class DataInfo:
    """What a strategy may need from the training data at build time (:meth:`Strategy.attach_data`)."""

    num_classes: int
    train_labels: Tensor  # int64 [N]: the label of each training sample, by its index (batch.idx)
    seed: int  # the run's seed: per-sample random draws are functions of (seed, epoch, idx)

    @property
    def train_size(self) -> int:
        return int(self.train_labels.shape[0])


TeacherTransform = Callable[[Tensor, Tensor], Tensor]
LogitTransform = Callable[[Tensor], Tensor]


class Strategy(nn.Module):
    """Base class of distillation strategies. Subclasses implement :meth:`loss_terms`.

    What the orchestration reads, declared here with its default:

    - ``needs_teacher``: whether the run needs a teacher (False for plain CE: the run then trains a network from
      labels, and its model may become a stored teacher).
    - ``regime``: the training regime that runs the strategy (``module=distill``; data-free strategies declare
      ``datafree``); the composition root refuses a mismatch.
    - ``student_taps`` / ``teacher_taps``: the tap sets the strategy reads from each network (``("blocks",)`` for
      AFD; ``("feats",)``, ``("preact_feats",)``, ``("pooled_feat",)`` ... for the mdistiller family; see
      :mod:`kdx.features`). Nothing is hooked for a logit method (``needs_features`` is then False).
    - ``views``: extra augmented views of every training sample the strategy needs, each seen by both networks
      (``("strong",)`` for MLKD); the datamodule must provide them.
    - ``needs_head``: whether the strategy needs each network's classifier (``ModelOutput.head``).
    - ``student_outputs``: names of the extra outputs the student returns in training after its logits
      (``(logits, *extra)``; DeiT's ``("dist",)``), given to the strategy as ``ModelOutput.extra``; the strategy
      switches the student to return them (:meth:`attach_networks`). Empty: the student returns logits.
    - ``task_terms``: the names of the task (label) terms; every other term is distillation (``optim=dot`` steps
      on the two parts separately).
    - ``supports_ddp``: False for a strategy with state that DDP ranks would have to share (a memory bank);
      the run then stops under several processes instead of training wrong.
    - ``teacher_bn_batch_stats``: True when the method's official code runs the teacher's BatchNorm layers with
      batch statistics (the teacher left in train mode, e.g. mdistiller's OFD); kdx's teacher is otherwise
      always in eval mode. An instance attribute a strategy may set from a switch.

    Transforms: ``teacher_transform`` ``(logits_teacher, target) -> logits`` on the teacher's side (TopKD's TSM),
    applied by the step before the loss; ``logit_transform`` ``logits -> logits`` on both sides (logit
    standardisation), applied by a logit strategy to the inputs of its distillation terms
    (:meth:`transform_logits`), never to its cross-entropy. Both are identity by default.

    Hooks at build time (after seeding, before the optimiser exists, so what they build trains with the student
    and every DDP rank builds the same): :meth:`attach_data` (the training labels, e.g. CRD's negatives by
    class), :meth:`attach_networks` (the networks themselves, e.g. OFD's margins from the teacher's BN
    statistics), then :meth:`build_feature_modules` (with the tapped shapes).
    """

    needs_teacher: ClassVar[bool] = True
    regime: ClassVar[str] = "distill"
    student_taps: ClassVar[tuple[str, ...]] = ()
    teacher_taps: ClassVar[tuple[str, ...]] = ()
    views: ClassVar[tuple[str, ...]] = ()
    needs_head: ClassVar[bool] = False
    student_outputs: ClassVar[tuple[str, ...]] = ()
    task_terms: ClassVar[frozenset[str]] = frozenset({"ce"})
    supports_ddp: ClassVar[bool] = True
    teacher_bn_batch_stats: bool = False

    def __init__(self, teacher_transform: Optional[TeacherTransform] = None,
                 logit_transform: Optional[LogitTransform] = None) -> None:
        super().__init__()
        self.teacher_transform = teacher_transform
        self.logit_transform = logit_transform

    @property
    def needs_features(self) -> bool:
        """Whether any network is tapped (feature hooks are registered only then)."""
        return bool(self.student_taps or self.teacher_taps)

    def transform_teacher(self, logits_teacher: Tensor, target: Tensor) -> Tensor:
        """Teacher logits as the loss should see them (TopKD's scaling plugs in here)."""
        if self.teacher_transform is None:
            return logits_teacher
        return self.teacher_transform(logits_teacher, target)

    def transform_logits(self, logits_student: Tensor, logits_teacher: Tensor) -> tuple[Tensor, Tensor]:
        """The inputs of a distillation term: both sides through ``logit_transform`` (identity by default)."""
        if self.logit_transform is None:
            return logits_student, logits_teacher
        return self.logit_transform(logits_student), self.logit_transform(logits_teacher)

    def attach_data(self, info: DataInfo) -> None:
        """Read what the training data decide (its size, the labels by sample index)."""

    def check_networks(self, student: Optional[nn.Module], teacher: Optional[nn.Module]) -> None:
        """Refuse architectures the method cannot use (a :class:`~kdx.errors.ConfigError` naming the setting), on
        throwaway untrained builds at start-up, before a missing teacher is trained; None: a network not built for
        the check (the method reads no features of it)."""

    def attach_networks(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        """Read what the networks decide (``teacher`` is the teacher's network, None for a label table); nothing
        read here may be kept as a submodule (the teacher must stay outside the optimiser and checkpoints)."""

    def build_feature_modules(self, teacher_shapes: dict[str, list[torch.Size]],
                              student_shapes: dict[str, list[torch.Size]]) -> None:
        """Build the shape-dependent modules: ``{set: [B×C×H×W or B×C shape, ...]}`` of each tapped network."""

    def loss_terms(
        self, student: ModelOutput, teacher: Optional[ModelOutput], batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """Weighted loss terms; ``epoch`` is 1-based (the first epoch is 1)."""
        raise NotImplementedError

    def reads_labels(self) -> bool:
        """Whether the loss reads ``batch.y`` (a weighted CE, a target-class mask, ...). True unless a strategy knows
        better: a data-free synthesiser whose samples carry no label (DAFL) refuses a loss that reads them."""
        return True

    def logged_values(self) -> dict[str, Tensor | float]:
        """Values of the latest step that are not loss terms (a learned temperature, a schedule's weight), logged as
        ``train/<name>`` at each logging point and kept in each epoch's history row; tensors may stay on the device
        (they are read back only there). None by default."""
        return {}

    def forward(self, student, teacher, batch, epoch):  # noqa: D102 - nn.Module entry point
        return self.loss_terms(student, teacher, batch, epoch)


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """``min(e / W, 1)`` with the 1-based epoch ``e`` (epoch 1 gives 1/W); W ≤ 0 means none."""
    if warmup_epochs <= 0:
        return 1.0
    return min(epoch / warmup_epochs, 1.0)
