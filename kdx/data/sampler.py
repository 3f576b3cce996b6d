"""Deterministic, resumable batch sampling.

:class:`EpochBatchSampler` yields *lists of indices* (one list per batch). The
order is a pure function of ``(seed, epoch)``: no hidden RNG state is consumed,
so a run resumed at epoch ``e`` sees exactly the batches of an uninterrupted run.
Lightning calls :meth:`EpochBatchSampler.set_epoch` at the start of every epoch
(it looks for ``set_epoch`` on ``dataloader.sampler``), so use it as
``DataLoader(dataset, batch_size=None, sampler=EpochBatchSampler(...))`` with a
dataset whose ``__getitem__`` accepts a list of indices.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser on a Python int (exact 64-bit arithmetic)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed derived from ``(seed, epoch)`` (order-sensitive hash)."""
    h = splitmix64(int(seed) & _MASK64)
    h = splitmix64(h ^ (int(epoch) & _MASK64))
    return h & ((1 << 63) - 1)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices whose order depends only on ``(seed, epoch)``.

    Args:
        n: dataset size.
        batch_size: samples per batch (per rank).
        seed: run seed; the permutation of epoch ``e`` is
            ``torch.randperm(n, generator=Generator().manual_seed(epoch_seed(seed, e)))``.
        shuffle: permute (training) or keep ``0..n-1`` (evaluation).
        drop_last: drop this rank's last incomplete batch.
        rank, world_size: DDP sharding. Rank ``r`` takes the strided slice
            ``perm[r::world_size]`` so shards are disjoint.
        pad_to_world_size: when true (the default for ``shuffle=True``), the
            permutation is padded by wrapping around (as ``DistributedSampler``
            does) to a multiple of ``world_size`` so every rank sees the same
            number of samples; when false (evaluation) nothing is repeated and
            ranks may differ by one sample.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad_to_world_size: bool | None = None,
    ) -> None:
        if n < 0 or batch_size < 1:
            raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        self.n = int(n)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.pad_to_world_size = self.shuffle if pad_to_world_size is None else bool(pad_to_world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration yields."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Number of samples this rank sees per epoch."""
        if self.pad_to_world_size:
            return math.ceil(self.n / self.world_size)
        return max(0, math.ceil((self.n - self.rank) / self.world_size))

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch (int64 tensor)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        if self.pad_to_world_size and self.n > 0:
            total = math.ceil(self.n / self.world_size) * self.world_size
            if total > self.n:
                reps = math.ceil(total / self.n)
                perm = perm.repeat(reps)[:total]
        return perm[self.rank :: self.world_size]

    def index_batches(self, device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
        """This epoch's batches as int64 index tensors (on ``device``): what ``__iter__`` yields as lists."""
        idx = self.indices() if device is None else self.indices().to(device)
        bs = self.batch_size
        stop = len(idx) - len(idx) % bs if self.drop_last else len(idx)
        for start in range(0, stop, bs):
            yield idx[start : start + bs]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.index_batches():
            yield batch.tolist()

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __repr__(self) -> str:
        return (
            f"EpochBatchSampler(n={self.n}, batch_size={self.batch_size}, seed={self.seed}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, rank={self.rank}, "
            f"world_size={self.world_size}, epoch={self.epoch})"
        )
