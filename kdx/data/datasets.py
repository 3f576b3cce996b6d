"""In-memory splits: :class:`ArrayDataset` (uint8 images, labels, sample indices), :class:`DeviceBatches` (a split
kept on the accelerator, batches gathered there) and :class:`SplitArrays` (what an array datamodule loads)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdx.data.sampler import EpochBatchSampler


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

    def content_hash(self) -> str:
        """A hash of the pixels, labels and source indices."""
        h = hashlib.blake2b(digest_size=16)
        h.update(memoryview(self.x.contiguous().numpy()).cast("B"))
        h.update(self.y.numpy().tobytes())
        h.update(self.source_index.numpy().tobytes())
        return h.hexdigest()


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


__all__ = ["ArrayDataset", "DeviceBatches", "SplitArrays"]
