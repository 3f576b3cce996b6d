"""The base datamodule: common arguments, stratified splits, deterministic loaders, and the capabilities the
orchestration reads (declared here with their defaults; subclasses override them).

Every batch is a tuple ``(x, y, idx)``: images, int64 labels and int64 indices
of the samples *within the datamodule's split dataset* (``train_dataset``,
``val_dataset`` or ``test_dataset``; ``0 <= idx < len(dataset)``). The index of
a sample in the original file/split is ``dataset.source_index[idx]``.

:class:`kdx.data.arrays.ArrayDataModule` keeps each split in memory as a uint8 tensor
``[N, C, H, W]``; loaders yield raw uint8 batches, and augmentation plus
normalisation run batched in :meth:`ArrayDataModule.on_after_batch_transfer`
(on the accelerator) as a pure function of ``(seed, epoch, idx)``. With
``on_device`` the split itself lives on the accelerator and batches are
gathered there (:class:`DeviceBatches`), with the same order and augmentation.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from kdx.data.sampler import EpochBatchSampler
from kdx.errors import ConfigError
from kdx.data.splits import resolve_amount, stratified_split


class BaseDataModule(LightningDataModule):
    """Arguments, stratified held-out/subset selection and loaders shared by all datamodules.

    Subclasses implement ``_load() -> (train_labels, test_labels)`` (loading
    whatever they need) and ``_make_dataset(split, positions, train)``; and set
    ``_num_classes``, ``_image_shape``, ``_mean``, ``_std``, ``_class_names`` when
    known (otherwise they are filled by ``_load``).

    Args:
        name: dataset key (used e.g. in teacher-store paths), e.g. ``'cifar100'``.
        root: data folder.
        batch_size: training batch size per process.
        eval_batch_size: evaluation batch size (default ``2 * batch_size``).
        val_split: 0 for no held-out split; else a fraction in (0, 1) (float) or
            a count (int) taken out of the training split, stratified by class,
            drawn with ``split_seed`` (independent of the run ``seed``).
        split_seed: seed of the held-out and subset draws.
        augment: training augmentation on/off.
        pad: RandomCrop padding.
        seed: run seed: data order and augmentation are functions of (seed, epoch, idx).
        num_workers: DataLoader workers.
        subset: stratified subset of the training split (fraction or total
            count), drawn before ``val_split`` is taken out of it.
        test_subset: the same for the test split.
        drop_last: drop the last incomplete training batch.
        on_device: keep each split on the accelerator as one uint8 tensor and gather
            batches there, without DataLoader workers (array datasets only; see
            :class:`DeviceBatches`).
    """

    #: whether the splits are held in memory as uint8 arrays (``train_dataset.x``/``.y``: ReffAKD's stage A)
    in_memory: ClassVar[bool] = False
    #: whether a training sample can show one of a fixed set of stored views (``teacher_cache=augmented``)
    supports_stored_views: ClassVar[bool] = False
    #: whether the training augmentation mirrors images
    hflip: ClassVar[bool] = True
    #: the side the transforms resize to (image folders); None: the images' own size
    image_size: Optional[int] = None
    #: extra augmented views of a training sample this datamodule can give (``Strategy.views``: "strong")
    supported_views: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        name: str,
        root: str,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_split: float | int = 0,
        split_seed: int = 0,
        augment: bool = True,
        pad: int = 4,
        seed: int = 0,
        num_workers: int = 0,
        subset: float | int | None = None,
        test_subset: float | int | None = None,
        drop_last: bool = False,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"data.batch_size={batch_size}: a batch needs at least one sample (set data.batch_size >= 1)")
        if eval_batch_size is not None and int(eval_batch_size) < 1:
            raise ValueError(f"data.eval_batch_size={eval_batch_size}: set it >= 1 (or null: 2 × data.batch_size)")
        self.name = str(name)
        self.root = str(root)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size else 2 * self.batch_size
        self.val_split = val_split if val_split else 0
        self.split_seed = int(split_seed)
        self.augment = bool(augment)
        self.pad = int(pad)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.subset = subset
        self.test_subset = test_subset
        self.drop_last = bool(drop_last)
        self.on_device = bool(on_device)
        self.extra_view_names: tuple[str, ...] = ()  # request_views()

        self._num_classes: int | None = None
        self._class_names: list[str] | None = None
        self._image_shape: tuple[int, int, int] | None = None
        self._mean: tuple[float, ...] | None = None
        self._std: tuple[float, ...] | None = None
        self.source: str | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self._full_sizes: dict[str, int] = {}

    # ---- subclass hooks
    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _make_dataset(self, split: str, positions: np.ndarray, train: bool) -> Dataset:
        raise NotImplementedError

    def _after_setup(self) -> None:
        """Called once the split datasets exist (e.g. to free full arrays)."""

    # ---- metadata (known before setup for the fixed datasets; else loads)
    def _peek(self) -> None:
        """Optionally fill cheap metadata (e.g. from file headers) without loading data."""

    def _meta(self, attr: str) -> Any:
        if getattr(self, attr) is None:
            self._peek()
        if getattr(self, attr) is None:
            self.setup()
        return getattr(self, attr)

    @property
    def num_classes(self) -> int:
        return self._meta("_num_classes")

    @property
    def class_names(self) -> list[str]:
        names = self._meta("_class_names")
        return list(names) if names is not None else [str(i) for i in range(self.num_classes)]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self._meta("_image_shape"))

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self._meta("_mean"))

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self._meta("_std"))

    @property
    def train_size(self) -> int:
        self.setup()
        return len(self.train_dataset)

    @property
    def is_setup(self) -> bool:
        return self.train_dataset is not None

    # ---- setup
    def setup(self, stage: str | None = None) -> None:
        """Load the data (once) and build ``train/val/test_dataset``; idempotent."""
        if self.is_setup:
            return
        train_labels, test_labels = self._load()
        train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
        self._full_sizes = {"train": len(train_labels), "test": len(test_labels)}

        train_pos = np.arange(len(train_labels), dtype=np.int64)
        if self.subset is not None:
            k = resolve_amount(self.subset, len(train_labels), "subset")
            train_pos, _ = stratified_split(train_labels, k, [self.split_seed, 1])
        val_pos = None
        if self.val_split:
            k = resolve_amount(self.val_split, len(train_pos), "val_split")
            if not 0 < k < len(train_pos):
                raise ValueError(f"val_split={self.val_split} leaves no training or no held-out samples")
            held, kept = stratified_split(train_labels[train_pos], k, [self.split_seed, 2])
            val_pos, train_pos = train_pos[held], train_pos[kept]
        test_pos = np.arange(len(test_labels), dtype=np.int64)
        if self.test_subset is not None:
            k = resolve_amount(self.test_subset, len(test_labels), "test_subset")
            test_pos, _ = stratified_split(test_labels, k, [self.split_seed, 3])

        self.train_dataset = self._make_dataset("train", train_pos, True)
        self.val_dataset = self._make_dataset("train", val_pos, False) if val_pos is not None else None
        self.test_dataset = self._make_dataset("test", test_pos, False)
        self._after_setup()

    # ---- loaders
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _sampler(self, n: int, train: bool) -> EpochBatchSampler:
        rank, world = self._rank_world()
        return EpochBatchSampler(
            n,
            self.batch_size if train else self.eval_batch_size,
            seed=self.seed,
            shuffle=train,
            drop_last=self.drop_last if train else False,
            rank=rank,
            world_size=world,
        )

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=self._sampler(len(dataset), train),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A batch of tensors already on ``device`` (every CPU run, ``on_device`` loaders) is passed through as it
        is, without Lightning's walk over the batch (kdx.bench_phases); any other batch moves as Lightning moves it."""
        if isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """``[held_out, test]`` when ``val_split > 0``, else the test loader alone."""
        self.setup()
        test = self._loader(self.test_dataset, train=False)
        if self.val_dataset is None:
            return test
        return [self._loader(self.val_dataset, train=False), test]

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_dataset, train=False)

    # ---- what the orchestration reads
    @property
    def dataset_key(self) -> str:
        """The teacher-store key of this data: its name, plus the training subset when one is used."""
        return self.name + (f"-subset{self.subset}" if self.subset else "")

    @property
    def has_heldout_val(self) -> bool:
        """Whether a held-out split of the training data selects the best epoch (else the test split does)."""
        return bool(self.val_split)

    @property
    def random_augmentation(self) -> bool:
        """Whether training inputs change from epoch to epoch."""
        return self.augment

    def transform_batch(self, batch: Any, train: bool, epoch: int = 0) -> Any:
        """A loader's batch as the model sees it; here the datasets already transformed it (image folders)."""
        return batch

    def request_views(self, names: tuple[str, ...], who: str = "the strategy") -> None:
        """Give every training batch these extra views of its samples (``(x, y, idx, {name: images})``)."""
        missing = [n for n in names if n not in self.supported_views]
        if missing:
            raise ConfigError(
                f"{who} needs the {missing} view(s) of every training sample, which data={self.name} "
                f"({type(self).__name__}) cannot give (it gives {sorted(self.supported_views) or 'none'}). Use an "
                "array dataset (cifar10, cifar100, svhn, fashion_mnist, synthetic, array files) or another method."
            )
        self.extra_view_names = tuple(names)

    def use_stored_views(self, views: int) -> None:
        """Draw each epoch's augmentation from ``views`` fixed views per sample (``supports_stored_views`` only)."""
        raise NotImplementedError(f"{type(self).__name__} cannot show stored views (teacher_cache=augmented)")

    def train_labels(self) -> torch.Tensor:
        """The label of every training sample by its index (``batch.idx``), int64."""
        self.setup()
        return torch.as_tensor(self.train_dataset.labels, dtype=torch.int64)

    def train_fingerprint(self) -> str:
        """A hash of the training split's contents (the teacher-logit cache's key)."""
        self.setup()
        return self.train_dataset.content_hash()

    # ---- reporting
    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable summary for results files."""
        self.setup()
        return {
            "name": self.name,
            "class": type(self).__name__,
            "source": self.source,
            "root": self.root,
            "sizes": {
                "train": len(self.train_dataset),
                "val": len(self.val_dataset) if self.val_dataset is not None else 0,
                "test": len(self.test_dataset),
                "full_train": self._full_sizes.get("train"),
                "full_test": self._full_sizes.get("test"),
            },
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "image_shape": list(self.image_shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "subset": self.subset,
            "test_subset": self.test_subset,
            "val_split": self.val_split,
            "split_seed": self.split_seed,
            "augment": self.augment,
            "pad": self.pad,
            "seed": self.seed,
            "on_device": self.on_device,
        }


def offline_error(what: str, root: str, npz_path: str | None, detail: str = "",
                  fix: str | None = None) -> FileNotFoundError:
    """The error raised when a dataset is neither on disk nor downloadable.

    ``fix`` replaces the default remedy (download or an array file) for datasets kdx cannot download itself
    (Tiny-ImageNet, ImageNet): where a user gets the files and which setting points to them."""
    root_abs = os.path.abspath(os.path.expanduser(root))
    if fix is not None:
        looked = f"Looked for its files in data.root={root!r} ({root_abs})"
    else:
        looked = (f"Looked for the torchvision files in data.root={root!r} ({root_abs})"
                  + (f" and for an array file at data.npz_path={npz_path!r}" if npz_path is not None
                     else ", data.npz_path is not set"))
        fix = ("To fix: run once with internet access and data.download=true (the files go to data.root), "
               "or set data.root to a folder that already holds them, or point data.npz_path to an offline "
               "array file (.npz in the layout described in kdx/data/npz.py).")
    return FileNotFoundError(f"{what} not found. {looked}. {fix}" + (f" ({detail})" if detail else ""))


__all__ = ["BaseDataModule", "offline_error"]
