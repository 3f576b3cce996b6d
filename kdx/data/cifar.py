"""CIFAR-10 / CIFAR-100 datamodules (torchvision files or an offline array file).

``source='auto'`` tries torchvision's files under ``root`` (``CIFAR10(root, download=False)``
succeeds) and the array file ``npz_path`` (when unset: the conventional locations under ``root``,
e.g. ``root/cifar10_jpeg/cifar10_jpeg.npz``), then a torchvision download (when ``download``).
CIFAR-10 tries torchvision's files first (its array copy is a lossy JPEG one); CIFAR-100 tries the
array file first (``cifar100/cifar100.npz`` is an exact copy, original order). If all fail the error
names ``data.root`` and ``data.npz_path``. ``describe()`` (results.json) records the file read and,
for an array file, its sha256 (hashed once, cached: :func:`kdx.data.npz.file_sha256`).

CIFAR-100's ``labels='coarse'`` trains on the 20 superclasses (their official names); the dataset key
(teacher store, results) is then ``<name>-coarse``.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import replace
from typing import Any, Optional

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100

from kdx.data.arrays import ArrayDataModule
from kdx.data.base import offline_error
from kdx.data.datasets import SplitArrays
from kdx.data.npz import file_sha256, load_array_file, read_members
from kdx.errors import ConfigError

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
CIFAR100_COARSE_CLASSES = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices "
    "household_furniture insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes "
    "large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles small_mammals trees "
    "vehicles_1 vehicles_2"
).split()
SOURCES = ("auto", "torchvision", "npz")
LABELS = ("fine", "coarse")


class _CIFARDataModule(ArrayDataModule):
    """Shared logic; subclasses set the class attributes below."""

    tv_class: type = CIFAR10
    dataset_title: str = "CIFAR"
    classes: list[str] = []
    default_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    default_std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    npz_candidates: tuple[str, ...] = ()
    #: whether ``source='auto'`` reads the array file before torchvision's files (an exact copy: CIFAR-100)
    prefer_array_file: bool = False

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
        self.source_file: Optional[str] = None
        self.source_sha256: Optional[str] = None

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

    def _from_torchvision(self) -> Optional[SplitArrays]:
        try:
            arrays = self._torchvision(download=False)
        except RuntimeError:
            return None
        self.source_file, self.source_sha256 = os.path.abspath(os.path.expanduser(self.root)), None
        return arrays

    def _from_array_file(self) -> Optional[SplitArrays]:
        npz = self._npz_file()
        if npz is None:
            return None
        arrays = self._read_array_file(npz)
        if len(arrays.class_names or self._class_names) != len(self._class_names):
            raise ValueError(f"{npz} has {len(arrays.class_names)} classes, {self.dataset_title} has "
                             f"{len(self._class_names)}")
        self.source_file = os.path.abspath(npz)
        self.source_sha256 = file_sha256(npz, self.cache_dir)
        return arrays

    def _read_array_file(self, npz: str) -> SplitArrays:
        return load_array_file(npz, self.cache_dir)

    def _resolve(self, download: bool) -> SplitArrays:
        title, mode = self.dataset_title, self.source_mode
        readers = {"torchvision": self._from_torchvision, "npz": self._from_array_file}
        for src in ("npz", "torchvision") if self.prefer_array_file else ("torchvision", "npz"):
            if mode in ("auto", src):
                arrays = readers[src]()
                if arrays is not None:
                    return arrays
        if mode == "npz":
            raise offline_error(title, self.root, self.npz_path, "source='npz' but no array file was found")
        if download:
            try:
                arrays = self._torchvision(download=True)
            except Exception as e:  # offline: URLError, socket errors, ...
                raise offline_error(title, self.root, self.npz_path, f"download failed: {e}") from e
            self.source_file = os.path.abspath(os.path.expanduser(self.root))
            return arrays
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

    def describe(self) -> dict[str, Any]:
        """The base summary plus the file (or torchvision folder) read and, for an array file, its sha256."""
        return {**super().describe(), "source_file": self.source_file, "source_sha256": self.source_sha256}


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
    """CIFAR-100 (100 fine classes, or the 20 coarse ones with ``labels='coarse'``, 3x32x32);
    mean (0.5071, 0.4867, 0.4408), std (0.2675, 0.2565, 0.2761)."""

    tv_class = CIFAR100
    dataset_title = "CIFAR-100"
    classes = CIFAR100_CLASSES
    default_mean = (0.5071, 0.4867, 0.4408)
    default_std = (0.2675, 0.2565, 0.2761)
    npz_candidates = ("cifar100/cifar100.npz", "cifar100.npz", "cifar100_jpeg/cifar100_jpeg.npz")
    prefer_array_file = True
    default_name = "cifar100"

    def __init__(self, labels: str = "fine", name: str | None = None, **kwargs) -> None:
        """``labels``: ``fine`` (100 classes) or ``coarse`` (the 20 superclasses; the dataset key gets ``-coarse``)."""
        if labels not in LABELS:
            raise ConfigError(f"data.labels={labels!r}: choose one of {list(LABELS)} "
                              "(CIFAR-100's fine or coarse labels).")
        name = name or self.default_name
        if labels == "coarse" and not name.endswith("-coarse"):
            name += "-coarse"  # another task: its own teachers and tables in the store
        super().__init__(name=name, **kwargs)
        self.labels = labels
        if labels == "coarse":
            self._num_classes, self._class_names = len(CIFAR100_COARSE_CLASSES), list(CIFAR100_COARSE_CLASSES)

    def _torchvision(self, download: bool) -> SplitArrays:
        arrays = super()._torchvision(download)
        if self.labels == "fine":
            return arrays
        folder = os.path.join(os.path.expanduser(self.root), self.tv_class.base_folder)
        coarse = {}
        for split, (fname, _) in (("train", self.tv_class.train_list[0]), ("test", self.tv_class.test_list[0])):
            with open(os.path.join(folder, fname), "rb") as f:  # md5-checked by torchvision above
                coarse[split] = np.asarray(pickle.load(f, encoding="latin1")["coarse_labels"], dtype=np.int64)
        with open(os.path.join(folder, self.tv_class.meta["filename"]), "rb") as f:
            names = [str(n) for n in pickle.load(f, encoding="latin1")["coarse_label_names"]]
        return replace(arrays, train_y=coarse["train"], test_y=coarse["test"], class_names=names)

    def _read_array_file(self, npz: str) -> SplitArrays:
        arrays = super()._read_array_file(npz)
        if self.labels == "fine":
            return arrays
        keys = ("train_coarse_labels", "test_coarse_labels", "coarse_class_names")
        m = read_members(npz, keys, "data.labels=coarse")
        return replace(arrays, train_y=m[keys[0]].astype(np.int64), test_y=m[keys[1]].astype(np.int64),
                       class_names=[str(n) for n in m[keys[2]].tolist()])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "labels": self.labels}
