"""CIFAR-10 / CIFAR-100 datamodules (torchvision files or an offline array file).

``source='auto'`` tries, in order: torchvision's files under ``root``
(``CIFAR10(root, download=False)`` succeeds), the array file ``npz_path``
(when unset: the conventional locations under ``root``, e.g.
``root/cifar10_jpeg/cifar10_jpeg.npz``), then a torchvision download (when
``download``). If all fail the error names ``data.root`` and ``data.npz_path``.
"""

from __future__ import annotations

import os

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100

from kdx.data.arrays import ArrayDataModule
from kdx.data.base import offline_error
from kdx.data.datasets import SplitArrays
from kdx.data.npz import load_array_file

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
SOURCES = ("auto", "torchvision", "npz")


class _CIFARDataModule(ArrayDataModule):
    """Shared logic; subclasses set the class attributes below."""

    tv_class: type = CIFAR10
    dataset_title: str = "CIFAR"
    classes: list[str] = []
    default_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    default_std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    npz_candidates: tuple[str, ...] = ()

    default_name: str = "cifar"

    def __init__(
        self,
        root: str = "./data",
        name: str | None = None,
        source: str = "auto",
        npz_path: str | None = None,
        download: bool = True,
        cache_dir: str | None = None,
        **common,
    ) -> None:
        """``name`` defaults to the dataset's own (cifar10 / cifar100); ``common`` are
        :class:`ArrayDataModule`'s arguments (batch size, splits, augmentation ...)."""
        super().__init__(name=name or self.default_name, root=root, **common)
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.source_mode = source
        self.npz_path = npz_path
        self.download = bool(download)
        self.cache_dir = cache_dir
        self._num_classes = len(self.classes)
        self._class_names = list(self.classes)
        self._image_shape = (3, 32, 32)
        self._mean, self._std = tuple(self.default_mean), tuple(self.default_std)

    # -- source resolution
    def _npz_file(self) -> str | None:
        if self.npz_path is not None:
            p = os.path.expanduser(self.npz_path)
            return p if os.path.isfile(p) else None
        for rel in self.npz_candidates:
            p = os.path.join(os.path.expanduser(self.root), rel)
            if os.path.isfile(p):
                return p
        return None

    def _torchvision(self, download: bool) -> SplitArrays:
        root = os.path.expanduser(self.root)
        train = self.tv_class(root, train=True, download=download)
        test = self.tv_class(root, train=False, download=download)
        return SplitArrays(
            train_x=np.ascontiguousarray(train.data.transpose(0, 3, 1, 2)),
            train_y=np.asarray(train.targets, dtype=np.int64),
            test_x=np.ascontiguousarray(test.data.transpose(0, 3, 1, 2)),
            test_y=np.asarray(test.targets, dtype=np.int64),
            class_names=list(train.classes),
            source=f"torchvision:{os.path.abspath(root)}",
        )

    def _may_download(self) -> bool:
        # Download in prepare_data (rank 0); setup() downloads only when not distributed.
        return self.download and self._rank_world()[1] == 1

    def _resolve(self, download: bool) -> SplitArrays:
        title, mode = self.dataset_title, self.source_mode
        if mode in ("auto", "torchvision"):
            try:
                return self._torchvision(download=False)
            except RuntimeError:
                pass
        if mode in ("auto", "npz"):
            npz = self._npz_file()
            if npz is not None:
                arrays = load_array_file(npz, self.cache_dir)
                if len(arrays.class_names or self.classes) != len(self.classes):
                    raise ValueError(f"{npz} has {len(arrays.class_names)} classes, {title} has {len(self.classes)}")
                return arrays
            if mode == "npz":
                raise offline_error(title, self.root, self.npz_path, "source='npz' but no array file was found")
        if download:
            try:
                return self._torchvision(download=True)
            except Exception as e:  # offline: URLError, socket errors, ...
                raise offline_error(title, self.root, self.npz_path, f"download failed: {e}") from e
        raise offline_error(title, self.root, self.npz_path, "download is disabled" if not self.download else "")

    def _torchvision_present(self) -> bool:
        """Whether torchvision's (md5-checked) files are under ``root``, without loading them."""
        probe = self.tv_class.__new__(self.tv_class)
        probe.root = os.path.expanduser(self.root)
        try:
            return bool(probe._check_integrity())
        except Exception:
            return False

    def prepare_data(self) -> None:
        """Download (Lightning calls this once per node, on local rank 0) when nothing local is found."""
        if not self.download or self.source_mode == "npz" or self._torchvision_present():
            return
        if self.source_mode == "auto" and self._npz_file() is not None:
            return
        try:
            for train in (True, False):
                self.tv_class(os.path.expanduser(self.root), train=train, download=True)
        except Exception as e:
            raise offline_error(self.dataset_title, self.root, self.npz_path, f"download failed: {e}") from e

    def _load_arrays(self) -> SplitArrays:
        return self._resolve(download=self._may_download())


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (10 classes, 3x32x32); mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616)."""

    tv_class = CIFAR10
    dataset_title = "CIFAR-10"
    classes = CIFAR10_CLASSES
    default_mean = (0.4914, 0.4822, 0.4465)
    default_std = (0.2470, 0.2435, 0.2616)
    npz_candidates = ("cifar10_jpeg/cifar10_jpeg.npz", "cifar10.npz", "cifar10/cifar10.npz")
    default_name = "cifar10"


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (100 fine classes, 3x32x32); mean (0.5071, 0.4867, 0.4408), std (0.2675, 0.2565, 0.2761)."""

    tv_class = CIFAR100
    dataset_title = "CIFAR-100"
    classes = CIFAR100_CLASSES
    default_mean = (0.5071, 0.4867, 0.4408)
    default_std = (0.2675, 0.2565, 0.2761)
    npz_candidates = ("cifar100.npz", "cifar100/cifar100.npz", "cifar100_jpeg/cifar100_jpeg.npz")
    default_name = "cifar100"
