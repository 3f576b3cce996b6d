"""The data-free regime's memory bank: every synthesised batch, sampled by the student's steps.

The official code writes each batch as 8-bit PNG files and re-reads the whole folder (it grows for the
whole run). Here the bank is a ring buffer of at most ``max_images`` images, held as ``uint8`` (default,
3 KiB per 32×32 RGB image), ``float16`` or ``float32``, in memory or in a file on disk (``path``: a folder,
one ``numpy.memmap`` file per DDP rank); when it is full the oldest images are replaced. Labels (the classes the generator
was asked for) are kept beside the images as int64.

``rounding`` (uint8 only): ``round`` = nearest 8-bit level; ``floor`` = the official PNG round trip
(``uint8(255·x)`` truncates, then ``/255`` on loading).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


class MemoryBank:
    def __init__(
        self,
        image_shape: Sequence[int],
        max_images: int = 400_000,
        dtype: str = "uint8",
        rounding: str = "round",
        path: Optional[str] = None,
        in_checkpoint: bool = True,
        rank: int = 0,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"module.bank.dtype={dtype!r}: use one of {', '.join(_DTYPES)}")
        if rounding not in ("round", "floor"):
            raise ValueError(f"module.bank.rounding={rounding!r}: use round or floor (the official PNG truncation)")
        if int(max_images) < 1:
            raise ValueError(f"module.bank.max_images={max_images} must be >= 1")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.max_images = int(max_images)
        self.dtype_name, self.dtype = dtype, _DTYPES[dtype]
        self.rounding = rounding
        self.path = None if path in (None, "") else Path(path) / f"bank_rank{int(rank)}.bin"
        self.in_checkpoint = bool(in_checkpoint)
        self.count = 0  # images held
        self.next = 0  # ring write position
        self.added = 0  # images ever added
        self.y = torch.zeros(0, dtype=torch.int64)
        self._mm: Optional[np.memmap] = None
        self._x = torch.zeros((0, *self.image_shape), dtype=self.dtype)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            mode = "r+" if self.path.is_file() and self.path.stat().st_size == self._file_bytes() else "w+"
            self._mm = np.memmap(self.path, dtype=np.dtype(dtype), mode=mode, shape=(self.max_images, *self.image_shape))
            self.y = torch.zeros(self.max_images, dtype=torch.int64)

    # ---- sizes
    @property
    def bytes_per_image(self) -> int:
        return int(np.prod(self.image_shape)) * torch.tensor([], dtype=self.dtype).element_size()

    def _file_bytes(self) -> int:
        return self.max_images * self.bytes_per_image

    @property
    def nbytes(self) -> int:
        """Bytes the held images take (in memory, or on disk with ``path``)."""
        return self.count * self.bytes_per_image

    def __len__(self) -> int:
        return self.count

    # ---- writing
    def _encode(self, x: Tensor) -> Tensor:
        x = x.detach().float().clamp(0, 1).cpu()
        if self.dtype is torch.uint8:
            x = x * 255
            return (x.round() if self.rounding == "round" else x.floor()).to(torch.uint8)
        return x.to(self.dtype)

    def _grow(self, need: int) -> None:
        cap = self._x.shape[0]
        if need <= cap:
            return
        new_cap = min(self.max_images, max(need, 2 * cap, 1024))
        grown = torch.empty((new_cap, *self.image_shape), dtype=self.dtype)
        grown[:cap] = self._x
        y = torch.zeros(new_cap, dtype=torch.int64)
        y[:cap] = self.y
        self._x, self.y = grown, y

    def add(self, x: Tensor, y: Tensor) -> None:
        """Append a batch (float images in [0, 1], ``[B, *image_shape]``) and its labels."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"bank images are {self.image_shape}, got {tuple(x.shape[1:])}")
        data, labels = self._encode(x), y.detach().to("cpu", torch.int64)
        if data.shape[0] > self.max_images:  # keep the last max_images of an oversized batch
            data, labels = data[-self.max_images :], labels[-self.max_images :]
        n = data.shape[0]
        if self._mm is None:
            self._grow(min(self.count + n, self.max_images))
        pos = (self.next + torch.arange(n)) % self.max_images
        if self._mm is not None:
            order = torch.argsort(pos)
            self._mm[pos[order].numpy()] = data[order].numpy()
        else:
            self._x[pos] = data
        self.y[pos] = labels
        self.next = int((self.next + n) % self.max_images)
        self.count = min(self.count + n, self.max_images)
        self.added += n

    # ---- reading
    def get(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Images (float32 in [0, 1]) and labels at positions ``idx`` (``0 <= idx < len(self)``)."""
        idx = torch.as_tensor(idx, dtype=torch.int64).cpu()
        if self._mm is not None:
            order = torch.argsort(idx)
            raw = torch.empty((len(idx), *self.image_shape), dtype=self.dtype)
            raw[order] = torch.from_numpy(np.ascontiguousarray(self._mm[idx[order].numpy()]))
        else:
            raw = self._x[idx]
        x = raw.float().div_(255) if self.dtype is torch.uint8 else raw.float()
        return x, self.y[idx]

    # ---- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        state = {"count": self.count, "next": self.next, "added": self.added, "y": self.y[: self.capacity].clone()}
        if self._mm is not None:
            self._mm.flush()
            state["path"] = str(self.path)
        elif self.in_checkpoint:
            state["x"] = self._x[: self.count].clone()
        return state

    @property
    def capacity(self) -> int:
        return self.max_images if self._mm is not None else self._x.shape[0]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        count = int(state["count"])
        if count > self.max_images:
            raise ValueError(f"the checkpoint's bank holds {count} images, more than module.bank.max_images={self.max_images}")
        if self._mm is None:
            if "x" not in state:
                raise ValueError(
                    "this checkpoint was saved without the memory bank (module.bank.in_checkpoint=false or an "
                    "on-disk bank): resuming would start from an empty bank. Resume with the same module.bank settings."
                )
            x = state["x"]
            self._x = torch.empty((max(count, 1), *self.image_shape), dtype=self.dtype)
            self._x[:count] = x.to(self.dtype)
            self.y = torch.zeros(self._x.shape[0], dtype=torch.int64)
        self.y[: len(state["y"])] = state["y"][: self.y.shape[0]]
        self.count, self.next, self.added = count, int(state["next"]), int(state["added"])

    def describe(self) -> dict[str, Any]:
        return {"images": self.count, "images_added": self.added, "max_images": self.max_images, "dtype": self.dtype_name,
                "rounding": self.rounding, "bytes": self.nbytes, "MiB": round(self.nbytes / 2**20, 2),
                "on_disk": None if self.path is None else str(self.path)}


__all__ = ["MemoryBank"]
