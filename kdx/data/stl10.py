"""STL-10 (10 classes, 3×96×96; 5,000 labelled training and 8,000 test images) in memory.

``root`` holds torchvision's files, ``stl10_binary/{train,test}_{X,y}.bin`` and ``class_names.txt``, as
``torchvision.datasets.STL10(root, download=True)`` leaves them (the ``stl10_binary.tar.gz`` of
https://cs.stanford.edu/~acoates/stl10/, unpacked). They are read here directly, in torchvision's layout
(``X``: uint8, each image 3×96×96 stored column-major, so rows and columns are swapped back; ``y``: labels
1..10, made 0..9), without torchvision's md5 check of the 2.6 GB archive. The 100,000 unlabelled images are not
used. Normalisation: the per-channel statistics of the training split (computed; null ``mean``/``std``) unless
given. Training augmentation: batched RandomCrop(96, pad) + flip on the device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from kdx.data.arrays import ArrayDataModule
from kdx.data.base import offline_error
from kdx.data.datasets import SplitArrays

SIZE = 96
FOLDER = "stl10_binary"
_WHAT = f"STL-10 ({FOLDER}/{{train,test}}_X.bin, {{train,test}}_y.bin)"


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[N, 3, 96, 96]`` and int64 labels 0..9 of ``split`` (``train`` or ``test``)."""
    raw = np.fromfile(folder / f"{split}_X.bin", dtype=np.uint8)
    if raw.size % (3 * SIZE * SIZE):
        raise ValueError(f"{folder / f'{split}_X.bin'}: {raw.size} bytes is not a whole number of 3×96×96 images")
    x = np.ascontiguousarray(raw.reshape(-1, 3, SIZE, SIZE).transpose(0, 1, 3, 2))
    y = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1
    if len(y) != len(x) or (len(y) and not 0 <= y.min() <= y.max() <= 9):
        raise ValueError(f"{folder}: {len(x)} {split} images but {len(y)} labels, or labels outside 1..10")
    return x, y


class STL10DataModule(ArrayDataModule):
    """STL-10's labelled splits (see the module docstring); ``common`` are :class:`ArrayDataModule`'s arguments."""

    def __init__(
        self,
        root: str = "./data",
        name: str = "stl10",
        download: bool = True,
        mean: tuple[float, ...] | list[float] | None = None,
        std: tuple[float, ...] | list[float] | None = None,
        **common,
    ) -> None:
        super().__init__(name=name, root=root, **common)
        if (mean is None) != (std is None):
            raise ValueError("data.mean / data.std: give both, or neither (null: computed on the training split)")
        self.download = bool(download)
        self._image_shape = (3, SIZE, SIZE)
        self._num_classes = 10
        self._mean = tuple(float(v) for v in mean) if mean is not None else None
        self._std = tuple(float(v) for v in std) if std is not None else None

    @property
    def folder(self) -> Path:
        return Path(os.path.expanduser(self.root)) / FOLDER

    def _missing(self) -> list[str]:
        files = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")
        return [f for f in files if not (self.folder / f).is_file()]

    def _fetch(self) -> None:
        """torchvision's download (``stl10_binary.tar.gz``, 2.6 GB) into ``root`` when files are missing."""
        missing = self._missing()
        if not missing:
            return
        if not self.download:
            raise offline_error(_WHAT, self.root, None, f"missing {', '.join(missing)}; download is disabled")
        from torchvision.datasets import STL10

        try:
            STL10(os.path.expanduser(self.root), split="train", download=True)
        except Exception as e:  # offline: URLError, socket errors, ...
            raise offline_error(_WHAT, self.root, None, f"download failed: {e}") from e

    def prepare_data(self) -> None:
        self._fetch()

    def _peek(self) -> None:
        names = self.folder / "class_names.txt"
        if self._class_names is None and names.is_file():
            self._class_names = [n.strip() for n in names.read_text().splitlines() if n.strip()]

    def _load_arrays(self) -> SplitArrays:
        if self._rank_world()[1] == 1:
            self._fetch()  # under DDP prepare_data (rank 0) downloads
        elif self._missing():
            raise offline_error(_WHAT, self.root, None, f"missing {', '.join(self._missing())}")
        self._peek()
        (train_x, train_y), (test_x, test_y) = read_split(self.folder, "train"), read_split(self.folder, "test")
        return SplitArrays(train_x, train_y, test_x, test_y, self._class_names,
                           f"stl10:{self.folder.resolve()}")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "download": self.download}


__all__ = ["STL10DataModule", "read_split"]
