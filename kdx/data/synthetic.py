"""A deterministic synthetic image-classification dataset for fast tests.

Each class ``k`` has a random mean colour and a random low-frequency pattern
(a 4x4 grid of values upsampled to the image size); a sample is
``colour + 0.5 * pattern + noise`` with per-sample brightness jitter and
Gaussian noise, clipped to uint8. Everything comes from
``np.random.default_rng(data_seed)``, so the data are identical everywhere,
and a linear model separates the classes well above chance.
"""

from __future__ import annotations

import numpy as np

from kdx.data.arrays import ArrayDataModule
from kdx.data.datasets import SplitArrays


def make_synthetic(
    n: int, num_classes: int, image_size: int, channels: int, data_seed: int, split: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images [n, C, S, S] and int64 labels (balanced, shuffled)."""
    proto = np.random.default_rng([data_seed, 0])  # class prototypes shared by both splits
    colour = proto.uniform(50, 205, size=(num_classes, channels, 1, 1))
    grid = proto.normal(0, 60, size=(num_classes, channels, 4, 4))
    reps = -(-image_size // 4)
    pattern = np.kron(grid, np.ones((1, 1, reps, reps)))[:, :, :image_size, :image_size]
    templates = colour + 0.5 * pattern  # [K, C, S, S]

    rng = np.random.default_rng([data_seed, 1 + split])
    y = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    bright = rng.normal(0, 10, size=(n, 1, 1, 1))
    noise = rng.normal(0, 25, size=(n, channels, image_size, image_size))
    x = np.clip(np.rint(templates[y] + bright + noise), 0, 255).astype(np.uint8)
    return x, y


class SyntheticDataModule(ArrayDataModule):
    """Synthetic data with ``num_classes`` classes of ``channels x image_size x image_size`` images.

    ``train_size``/``test_size`` are the generated split sizes (the
    ``train_size`` *property* reports the training set actually used, after
    ``subset``/``val_split``). ``mean``/``std`` are computed from the train split.
    """

    def __init__(
        self,
        num_classes: int = 100,
        image_size: int = 32,
        channels: int = 3,
        train_size: int = 512,
        test_size: int = 256,
        data_seed: int = 0,
        name: str = "synthetic",
        root: str = "",
        **common,
    ) -> None:
        super().__init__(name=name, root=root, **common)
        self.n_train, self.n_test = int(train_size), int(test_size)
        self.data_seed = int(data_seed)
        self._num_classes = int(num_classes)
        self._image_shape = (int(channels), int(image_size), int(image_size))
        self._class_names = [f"class_{k}" for k in range(self._num_classes)]

    def _load_arrays(self) -> SplitArrays:
        k, (c, s, _) = self._num_classes, self._image_shape
        train_x, train_y = make_synthetic(self.n_train, k, s, c, self.data_seed, split=0)
        test_x, test_y = make_synthetic(self.n_test, k, s, c, self.data_seed, split=1)
        return SplitArrays(train_x, train_y, test_x, test_y, self._class_names, f"synthetic:data_seed={self.data_seed}")

    def describe(self) -> dict:
        d = super().describe()
        d["data_seed"] = self.data_seed
        return d
