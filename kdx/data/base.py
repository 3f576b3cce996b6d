"""Base datamodules: common arguments, stratified splits, deterministic loaders.

Every batch is a tuple ``(x, y, idx)``: images, int64 labels and int64 indices
of the samples *within the datamodule's split dataset* (``train_dataset``,
``val_dataset`` or ``test_dataset``; ``0 <= idx < len(dataset)``). The index of
a sample in the original file/split is ``dataset.source_index[idx]``.

:class:`ArrayDataModule` keeps each split in memory as a uint8 tensor
``[N, C, H, W]``; loaders yield raw uint8 batches, and augmentation plus
normalisation run batched in :meth:`ArrayDataModule.on_after_batch_transfer`
(on the accelerator) as a pure function of ``(seed, epoch, idx)``. With
``on_device`` the split itself lives on the accelerator and batches are
gathered there (:class:`DeviceBatches`), with the same order and augmentation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from kdx.data.augment import apply_crop_flip, crop_flip_params, draw_view, normalize, view_params
from kdx.data.sampler import EpochBatchSampler

# --------------------------------------------------------------------------- splits


def resolve_amount(amount: float | int, n: int, what: str) -> int:
    """Turn a fraction in ``(0, 1]`` (float) or a count (int) into a count in ``[0, n]``."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} must be a float fraction or an int count, got {amount!r}")
    if isinstance(amount, (float, np.floating)):
        if 0 < amount <= 1:
            return int(round(float(amount) * n))
        if not float(amount).is_integer():
            raise ValueError(f"{what}={amount}: a fraction must lie in (0, 1]")
    count = int(amount)
    if not 0 <= count <= n:
        raise ValueError(f"{what}={amount}: a count must lie in [0, {n}]")
    return count


def stratified_split(labels: np.ndarray, k: int, seed: Sequence[int] | int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``k`` of ``len(labels)`` positions, class-proportionally.

    Each class ``c`` (``n_c`` samples) contributes ``floor(k * n_c / N)``
    samples plus at most one more (largest remainders first, ties to the
    smaller class id), chosen by a permutation from ``np.random.default_rng(seed)``.
    Returns ``(taken, rest)``: sorted int64 position arrays, disjoint, covering all.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 <= k <= n:
        raise ValueError(f"cannot take {k} of {n} samples")
    classes, counts = np.unique(labels, return_counts=True)
    quota = k * counts / max(n, 1)
    take = np.floor(quota).astype(np.int64)
    extra = k - int(take.sum())
    if extra > 0:
        order = np.lexsort((classes, -(quota - take)))  # largest remainder, then class id
        take[order[:extra]] += 1
    rng = np.random.default_rng(seed)
    taken = []
    for c, t in zip(classes, take):
        pos = np.flatnonzero(labels == c)
        taken.append(pos[rng.permutation(len(pos))[:t]])
    taken_idx = np.sort(np.concatenate(taken)).astype(np.int64) if taken else np.zeros(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[taken_idx] = False
    return taken_idx, np.flatnonzero(mask).astype(np.int64)


# --------------------------------------------------------------------------- datasets


class ArrayDataset(Dataset):
    """A split held in memory: ``x`` uint8 ``[N, C, H, W]``, ``y`` int64 ``[N]``.

    ``ds[list_of_indices]`` returns the whole batch ``(x[B,C,H,W], y[B], idx[B])``
    (one tensor index; used with ``DataLoader(batch_size=None, sampler=EpochBatchSampler)``);
    ``ds[i]`` returns one sample ``(x[C,H,W], y, idx)``.
    ``source_index[i]`` is sample ``i``'s index in the original split.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, source_index: torch.Tensor | None = None) -> None:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"x must be uint8 [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        self.x = x
        self.y = y.to(torch.int64)
        self.source_index = torch.arange(len(x)) if source_index is None else torch.as_tensor(source_index)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(index, (int, np.integer)):
            i = int(index)
            return self.x[i], self.y[i], torch.tensor(i, dtype=torch.int64)
        idx = torch.as_tensor(index, dtype=torch.int64)
        return self.x[idx], self.y[idx], idx

    @property
    def labels(self) -> np.ndarray:
        return self.y.numpy()


class DeviceBatches:
    """The batches of an :class:`EpochBatchSampler` over an :class:`ArrayDataset` held on a device.

    A loader for ``data.on_device=true``: the split is copied to ``device`` once (uint8) and
    each batch is one index gather there, so no DataLoader, worker or host-to-device copy
    runs per step. The batches are those of ``DataLoader(dataset, batch_size=None,
    sampler=sampler)``: the same indices in the same order (``EpochBatchSampler.index_batches``,
    which ``__iter__`` also yields), the same
    DDP shard; Lightning finds ``sampler.set_epoch`` as on a DataLoader.
    """

    def __init__(self, dataset: ArrayDataset, sampler: EpochBatchSampler, device: torch.device | str) -> None:
        self.dataset, self.sampler, self.device = dataset, sampler, torch.device(device)
        self.batch_sampler = None  # Lightning inspects loaders with a ``sampler`` as DataLoaders
        self._xy: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def _split(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._xy is None:
            x = self.dataset.x
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                if x.nbytes > free // 2:
                    raise MemoryError(
                        f"data.on_device=true: the split takes {x.nbytes / 2**30:.2f} GiB but {self.device} has "
                        f"{free / 2**30:.2f} GiB free (at most half is used for data). Set data.on_device=false."
                    )
            self._xy = (x.to(self.device), self.dataset.y.to(self.device))
        return self._xy

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        x, y = self._split()
        for i in self.sampler.index_batches(self.device):
            yield x[i], y[i], i


@dataclass
class SplitArrays:
    """What an :class:`ArrayDataModule` subclass loads: uint8 NCHW arrays, int labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str] | None = None
    source: str = ""


# --------------------------------------------------------------------------- base


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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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


class ArrayDataModule(BaseDataModule):
    """In-memory uint8 datasets with batched, deterministic augmentation.

    Subclasses implement ``_load_arrays() -> SplitArrays`` (images as uint8
    ``[N, C, H, W]`` NumPy arrays, possibly memory-mapped) and set the
    metadata attributes. Loaders yield ``(x uint8, y, idx)``;
    :meth:`on_after_batch_transfer` turns ``x`` into float32 normalised images,
    applying, in training only (``trainer.training`` and ``augment``),
    RandomCrop(H, padding=pad, zero fill) + RandomHorizontalFlip(0.5) with
    parameters ``crop_flip_params(seed, trainer.current_epoch, idx, pad)``.
    Outside a Trainer call :meth:`transform_batch` yourself.

    With stored views (:meth:`use_stored_views`, set by ``teacher.cache=augmented``) the
    parameters of epoch ``e`` are those of view ``draw_view(seed, e, idx, V)`` instead, the
    same crops the teacher-logit cache was filled with (:mod:`kdx.teachers.cache`).
    """

    _arrays: SplitArrays | None = None
    #: whether the training augmentation mirrors (SVHN's digits are not mirrored)
    hflip: bool = True
    #: number of stored views per sample (0: a fresh crop/flip every epoch)
    views: int = 0

    def _load_arrays(self) -> SplitArrays:
        raise NotImplementedError

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._load_arrays()
        for split in ("train", "test"):
            x, y = getattr(arrays, f"{split}_x"), getattr(arrays, f"{split}_y")
            if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(y):
                raise ValueError(f"{split}: expected uint8 [N,C,H,W] and N labels, got {x.dtype} {x.shape}, {len(y)}")
        self._arrays = arrays
        self.source = arrays.source
        if self._class_names is None and arrays.class_names is not None:
            self._class_names = list(arrays.class_names)
        if self._num_classes is None:
            self._num_classes = len(self._class_names) if self._class_names else int(arrays.train_y.max()) + 1
        if self._image_shape is None:
            self._image_shape = tuple(int(s) for s in arrays.train_x.shape[1:])
        if self._mean is None or self._std is None:
            self._mean, self._std = channel_stats(arrays.train_x)
        if tuple(arrays.train_x.shape[1:]) != tuple(self._image_shape):
            raise ValueError(f"images are {arrays.train_x.shape[1:]}, expected {self._image_shape}")
        return np.asarray(arrays.train_y), np.asarray(arrays.test_y)

    def _make_dataset(self, split: str, positions: np.ndarray, train: bool) -> ArrayDataset:
        x_all, y_all = getattr(self._arrays, f"{split}_x"), getattr(self._arrays, f"{split}_y")
        if len(positions) == len(x_all):  # everything, in order: copy once (memmap -> RAM)
            x, y = np.array(x_all), np.array(y_all)
        else:
            x, y = x_all[positions], np.asarray(y_all)[positions]
        return ArrayDataset(
            torch.from_numpy(np.ascontiguousarray(x)),
            torch.from_numpy(np.asarray(y, dtype=np.int64)),
            torch.from_numpy(positions.astype(np.int64)),
        )

    def _after_setup(self) -> None:
        self._arrays = None  # keep only the selected samples

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader | DeviceBatches:
        if not self.on_device:
            return super()._loader(dataset, train)
        key = (id(dataset), str(self._device()))  # one device copy per split, reused by every loader
        splits = self.__dict__.setdefault("_device_splits", {})
        loader = DeviceBatches(dataset, self._sampler(len(dataset), train), self._device())
        if key in splits:
            loader._xy = splits[key]
        else:
            splits[key] = loader._split()
        return loader

    # ---- augmentation
    @property
    def random_augmentation(self) -> bool:
        """Whether training inputs change from epoch to epoch (a random crop or flip is on)."""
        return self.augment and (self.pad > 0 or self.hflip)

    def use_stored_views(self, views: int) -> None:
        """Draw each epoch's crop/flip from ``views`` fixed views per sample (0: fresh every epoch)."""
        if views < 0:
            raise ValueError(f"views must be >= 0, got {views}")
        self.views = int(views)

    def crop_flip(self, epoch: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training crop offsets and flips ``(dx, dy, flip)`` of samples ``idx`` in ``epoch`` (0-based)."""
        if self.views:
            return self.view_crop_flip(draw_view(self.seed, epoch, idx, self.views), idx)
        return self._mask_flip(crop_flip_params(self.seed, epoch, idx, self.pad))

    def view_crop_flip(self, view: int | torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The parameters of stored view ``view`` (an int or one per sample) of samples ``idx``."""
        return self._mask_flip(view_params(view, idx, self.pad, self.views or None))

    def _mask_flip(self, params: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        dx, dy, flip = params
        return dx, dy, (flip if self.hflip else torch.zeros_like(flip))

    def augment_batch(self, batch: Any, params: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        """uint8 batch -> float32 normalised batch, cropped and flipped with the given ``(dx, dy, flip)``."""
        x, y, idx = batch
        return normalize(apply_crop_flip(x, *params, self.pad), self.mean, self.std), y, idx

    def transform_batch(self, batch: Any, train: bool, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 batch -> float32 normalised batch (augmented when ``train`` and ``augment``)."""
        x, y, idx = batch
        if train and self.augment:
            return self.augment_batch(batch, self.crop_flip(epoch, idx))
        return normalize(x, self.mean, self.std), y, idx

    def transform_view_batch(self, batch: Any, view: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 batch -> view ``view`` of each sample, as training shows it (what the teacher cache stores)."""
        if not self.augment:
            return self.transform_batch(batch, train=False)
        return self.augment_batch(batch, self.view_crop_flip(view, batch[2]))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x = batch[0]
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8):
            return batch  # already transformed
        trainer = self.trainer
        train = trainer is not None and bool(trainer.training)
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        return self.transform_batch(batch, train=train, epoch=epoch)


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (of pixel/255) of a uint8 ``[N, C, H, W]`` array."""
    c = x.shape[1]
    s = np.zeros(c, np.float64)
    s2 = np.zeros(c, np.float64)
    for i in range(0, len(x), chunk):
        b = np.asarray(x[i : i + chunk], dtype=np.float64) / 255.0
        s += b.sum(axis=(0, 2, 3))
        s2 += (b * b).sum(axis=(0, 2, 3))
    m = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / m
    std = np.sqrt(np.maximum(s2 / m - mean**2, 0.0))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def offline_error(what: str, root: str, npz_path: str | None, detail: str = "") -> FileNotFoundError:
    """The error raised when a dataset is neither on disk nor downloadable."""
    root_abs = os.path.abspath(os.path.expanduser(root))
    msg = (
        f"{what} not found. Looked for the torchvision files in data.root={root!r} ({root_abs})"
        + (f" and for an array file at data.npz_path={npz_path!r}" if npz_path is not None else ", data.npz_path is not set")
        + ". To fix: run once with internet access and data.download=true (the files go to data.root), "
        "or set data.root to a folder that already holds them, or point data.npz_path to an offline "
        "array file (.npz in the layout described in kdx/data/npz.py)."
        + (f" ({detail})" if detail else "")
    )
    return FileNotFoundError(msg)


__all__ = [
    "ArrayDataModule",
    "ArrayDataset",
    "BaseDataModule",
    "DeviceBatches",
    "SplitArrays",
    "channel_stats",
    "offline_error",
    "resolve_amount",
    "stratified_split",
]

