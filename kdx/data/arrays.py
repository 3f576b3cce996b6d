"""In-memory uint8 datamodules with batched, deterministic augmentation (:class:`ArrayDataModule`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdx.data.augment import apply_crop_flip, crop_flip_params, draw_view, normalize, view_params
from kdx.data.base import BaseDataModule
from kdx.data.datasets import ArrayDataset, DeviceBatches, SplitArrays
from kdx.data.strong_augment import strong_view


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

    With stored views (:meth:`use_stored_views`, set by ``teacher_cache=augmented``) the
    parameters of epoch ``e`` are those of view ``draw_view(seed, e, idx, V)`` instead, the
    same crops the teacher-logit cache was filled with (:mod:`kdx.teachers.cache`).
    """

    in_memory = True
    supports_stored_views = True
    supported_views = frozenset({"strong"})
    _arrays: SplitArrays | None = None
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

    def extra_views(self, batch: Any, epoch: int) -> dict[str, torch.Tensor]:
        """The requested extra views of a uint8 batch (normalised): ``strong`` = MLKD's official strong view (crop +
        flip + RandAugment(2) + Cutout, a function of (seed, epoch, idx): :mod:`kdx.data.strong_augment`)."""
        x, _, idx = batch
        return {name: normalize(strong_view(x, self.seed, epoch, idx, self.pad), self.mean, self.std)
                for name in self.extra_view_names}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x = batch[0]
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8):
            return batch  # already transformed
        trainer = self.trainer
        train = trainer is not None and bool(trainer.training)
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        out = self.transform_batch(batch, train=train, epoch=epoch)
        if train and self.extra_view_names:
            return (*out, self.extra_views(batch, epoch))
        return out


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


__all__ = ["ArrayDataModule", "channel_stats"]
