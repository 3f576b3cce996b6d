"""SVHN (Street View House Numbers, cropped digits, 10 classes, 3x32x32) through torchvision.

``root`` holds torchvision's ``train_32x32.mat`` / ``test_32x32.mat`` (and ``extra_32x32.mat``
with ``use_extra``); reading them needs ``scipy``. Digits must not be mirrored, so training
augmentation is RandomCrop(32, pad 4) only unless ``flip=true``. Normalisation: the usual SVHN
statistics, mean (0.4377, 0.4438, 0.4728), std (0.1980, 0.2010, 0.1970).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from kdx.data.arrays import ArrayDataModule
from kdx.data.base import offline_error
from kdx.data.datasets import SplitArrays

SVHN_CLASSES = [str(i) for i in range(10)]


class SVHNDataModule(ArrayDataModule):
    """SVHN; see the module docstring. ``use_extra`` appends the 531k 'extra' images to training."""

    def __init__(
        self,
        root: str = "./data",
        name: str = "svhn",
        download: bool = True,
        use_extra: bool = False,
        flip: bool = False,
        **common,
    ) -> None:
        super().__init__(name=name, root=root, **common)
        self.download = bool(download)
        self.use_extra = bool(use_extra)
        self.flip = bool(flip)
        self._num_classes = 10
        self._class_names = list(SVHN_CLASSES)
        self._image_shape = (3, 32, 32)
        self._mean, self._std = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)

    def _open(self, split: str, download: bool):
        try:
            import scipy.io  # noqa: F401  (torchvision's SVHN reads .mat files with scipy)
        except ImportError as e:
            raise ImportError("data=svhn reads torchvision's .mat files with scipy: `pip install scipy`.") from e
        from torchvision.datasets import SVHN

        what = f"SVHN ({split}_32x32.mat)"
        try:
            return SVHN(os.path.expanduser(self.root), split=split, download=download)
        except RuntimeError as e:
            raise offline_error(what, self.root, None, str(e)) from e
        except Exception as e:  # download errors when offline
            raise offline_error(what, self.root, None, f"download failed: {e}") from e

    def _splits(self) -> tuple[str, ...]:
        return ("train", "test", "extra") if self.use_extra else ("train", "test")

    def prepare_data(self) -> None:
        if self.download:
            for split in self._splits():
                self._open(split, download=True)

    def _load_arrays(self) -> SplitArrays:
        download = self.download and self._rank_world()[1] == 1
        train = self._open("train", download)
        test = self._open("test", download)
        train_x, train_y = train.data, np.asarray(train.labels, np.int64)
        if self.use_extra:
            extra = self._open("extra", download)
            train_x = np.concatenate([train_x, extra.data])
            train_y = np.concatenate([train_y, np.asarray(extra.labels, np.int64)])
        return SplitArrays(
            train_x=np.ascontiguousarray(train_x, np.uint8),
            train_y=train_y,
            test_x=np.ascontiguousarray(test.data, np.uint8),
            test_y=np.asarray(test.labels, np.int64),
            class_names=list(SVHN_CLASSES),
            source=f"torchvision:{os.path.abspath(os.path.expanduser(self.root))}",
        )

    @property
    def hflip(self) -> bool:  # ArrayDataModule's crop/flip (also stored views) mirror only when ``flip``
        return self.flip

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "use_extra": self.use_extra, "flip": self.flip}
