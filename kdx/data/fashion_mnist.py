"""Fashion-MNIST as a 3x32x32 dataset, so CIFAR-sized models apply unchanged.

``root`` is the folder that contains ``FashionMNIST/raw`` (torchvision layout).
Each 28x28 grey image is zero-padded by 2 px on every side to 32x32 and
replicated to 3 channels. Normalisation uses the published statistics of the
original 28x28 images, mean 0.2860 and std 0.3530 per channel; on the padded
32x32 images the true mean/std are lower (about 0.219 / 0.330), i.e. the
padding normalises to (0 - 0.2860) / 0.3530 ~ -0.81, not to 0.

``channels=1`` keeps the images grey (1x32x32) and ``resize=true`` scales them to 32x32 (PIL bilinear, as
``transforms.Resize((32, 32))``) instead of padding: ReffAKD's Fashion-MNIST notebooks (1-channel LeNet-5 and
autoencoder on resized images, normalised with the same 0.2860 / 0.3530).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
from torchvision.datasets import FashionMNIST

from kdx.data.arrays import ArrayDataModule
from kdx.data.base import offline_error
from kdx.data.datasets import SplitArrays

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def to_32(x: np.ndarray, channels: int = 3, resize: bool = False) -> np.ndarray:
    """uint8 [N, 28, 28] -> uint8 [N, channels, 32, 32]: a 2 px zero border, or (``resize``) PIL's bilinear
    resize to 32x32 (what ``transforms.Resize((32, 32))`` does to the PIL image); grey replicated to ``channels``."""
    x = np.asarray(x, np.uint8)
    if resize:
        grey = np.stack([np.asarray(Image.fromarray(a).resize((32, 32), Image.BILINEAR)) for a in x])
    else:
        grey = np.zeros((len(x), 32, 32), np.uint8)
        grey[:, 2:30, 2:30] = x
    return np.ascontiguousarray(np.repeat(grey[:, None], channels, axis=1))


class FashionMNISTDataModule(ArrayDataModule):
    """Fashion-MNIST (10 classes), images 3x32x32; see the module docstring."""

    def __init__(
        self,
        root: str = "./data",
        name: str = "fashion_mnist",
        download: bool = True,
        channels: int = 3,
        resize: bool = False,
        **common,
    ) -> None:
        super().__init__(name=name, root=root, **common)
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels!r}: 1 (grey) or 3 (grey replicated)")
        self.download = bool(download)
        self.channels, self.resize = int(channels), bool(resize)
        self._num_classes = 10
        self._class_names = list(FASHION_MNIST_CLASSES)
        self._image_shape = (self.channels, 32, 32)
        self._mean, self._std = (0.2860,) * self.channels, (0.3530,) * self.channels

    def _open(self, train: bool, download: bool) -> FashionMNIST:
        try:
            return FashionMNIST(os.path.expanduser(self.root), train=train, download=download)
        except RuntimeError as e:
            raise offline_error("Fashion-MNIST (FashionMNIST/raw/*-ubyte)", self.root, None, str(e)) from e
        except Exception as e:  # download errors when offline
            raise offline_error("Fashion-MNIST (FashionMNIST/raw/*-ubyte)", self.root, None, f"download failed: {e}") from e

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self._open(train, download=True)

    def _load_arrays(self) -> SplitArrays:
        download = self.download and self._rank_world()[1] == 1
        train, test = self._open(True, download), self._open(False, download)
        return SplitArrays(
            train_x=to_32(train.data.numpy(), self.channels, self.resize),
            train_y=train.targets.numpy().astype(np.int64),
            test_x=to_32(test.data.numpy(), self.channels, self.resize),
            test_y=test.targets.numpy().astype(np.int64),
            class_names=list(FASHION_MNIST_CLASSES),
            source=f"torchvision:{os.path.abspath(os.path.expanduser(self.root))}",
        )

    def describe(self) -> dict:
        return {**super().describe(), "channels": self.channels, "resize": self.resize}
