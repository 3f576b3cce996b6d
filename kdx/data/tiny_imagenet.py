"""Tiny-ImageNet (200 classes, 3×64×64) in memory, from the archive's own layout.

``root`` is the unzipped ``tiny-imagenet-200`` folder of http://cs231n.stanford.edu/tiny-imagenet-200.zip:
``wnids.txt`` (the 200 WordNet ids), ``words.txt`` (readable names, optional), ``train/<wnid>/images/*.JPEG``
(500 per class) and ``val/images/*.JPEG`` with ``val/val_annotations.txt`` (``file<TAB>wnid<TAB>box``; 50 per
class). The test split is that labelled validation set (the archive's ``test/`` has no labels), as in mdistiller,
NAYER and ReffAKD. Class ``k`` is the ``k``-th of the sorted wnids, which is also the order of the sorted training
folders (torchvision's ImageFolder, mdistiller) and of NAYER's ``wnids.txt`` reading; class names are the first
synonym in ``words.txt``.

The 110,000 JPEGs are decoded once (PIL, converted to RGB: the archive holds some greyscale images) into uint8
arrays (1.35 GB) cached as ``.npy`` under ``cache_dir``, keyed by the file list with sizes and mtimes, and
memory-mapped on later runs. Training augmentation is the array datamodules' batched RandomCrop(64, pad) + flip on
the device (NAYER's RandomCrop(64, 4) + flip at the default ``pad=4``). Normalisation: mdistiller's Tiny-ImageNet
statistics by default.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kdx.data.arrays import ArrayDataModule
from kdx.data.base import offline_error
from kdx.data.datasets import SplitArrays
from kdx.io import atomic_path, atomic_write_bytes
from kdx.paths import default_cache_dir

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
#: mdistiller's mdistiller/dataset/tiny_imagenet.py Normalize values
MEAN, STD = (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)
_WHAT = "Tiny-ImageNet (wnids.txt, train/<wnid>/images/*.JPEG, val/images + val/val_annotations.txt)"
_FIX = (f"To fix: download {URL} (cs231n, 237 MB), unzip it and set data.root to the tiny-imagenet-200 folder "
        "it makes (e.g. data.root=/data/tiny-imagenet-200).")


def scan(root: str) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """The sorted wnids and the ``(path, label)`` lists of the training and the (labelled) validation split."""
    base = Path(os.path.expanduser(root))
    wnids_file, ann = base / "wnids.txt", base / "val" / "val_annotations.txt"
    missing = [str(p) for p in (wnids_file, base / "train", ann, base / "val" / "images") if not p.exists()]
    if missing:
        raise offline_error(_WHAT, root, None, f"missing: {', '.join(missing)}", fix=_FIX)
    wnids = sorted({w.strip() for w in wnids_file.read_text().split() if w.strip()})
    index = {w: k for k, w in enumerate(wnids)}
    train = []
    for w in wnids:
        folder = base / "train" / w / "images"
        if not folder.is_dir():
            raise offline_error(_WHAT, root, None, f"missing: {folder}", fix=_FIX)
        train += [(str(folder / f), index[w]) for f in sorted(os.listdir(folder)) if f.lower().endswith(".jpeg")]
    test = []
    for line in ann.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            if parts[1] not in index:
                raise ValueError(f"{ann}: class {parts[1]!r} of {parts[0]} is not in {wnids_file}")
            test.append((str(base / "val" / "images" / parts[0]), index[parts[1]]))
    test.sort()
    if not train or not test:
        raise offline_error(_WHAT, root, None, "no images found", fix=_FIX)
    return wnids, train, test


def readable_names(root: str, wnids: list[str]) -> list[str]:
    """The first synonym of each wnid in ``root/words.txt`` (the wnid itself when absent)."""
    words = Path(os.path.expanduser(root)) / "words.txt"
    table: dict[str, str] = {}
    if words.is_file():
        for line in words.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                table[parts[0]] = parts[1].split(",")[0].strip()
    return [table.get(w, w) for w in wnids]


def decode_files(paths: list[str]) -> np.ndarray:
    """Decode image files (RGB) into one uint8 ``[N, 3, H, W]`` array; every image must have the first one's size."""
    first = Image.open(paths[0])
    w, h = first.size
    out = np.empty((len(paths), 3, h, w), np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            a = np.asarray(img.convert("RGB"))
        if a.shape[:2] != (h, w):
            raise ValueError(f"{path} is {a.shape[1]}×{a.shape[0]}, expected {w}×{h} like {paths[0]}")
        out[i] = a.transpose(2, 0, 1)
    return out


def _listing_key(root: str, samples: dict[str, list[tuple[str, int]]]) -> str:
    h = hashlib.sha256(os.path.abspath(os.path.expanduser(root)).encode())
    for split, items in samples.items():
        for path, label in items:
            st = os.stat(path)
            h.update(f"{split}\t{os.path.basename(path)}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_cached(root: str, samples: dict[str, list[tuple[str, int]]], cache_dir: str | None) -> tuple[dict, str]:
    """The decoded ``{split}_x`` arrays (memory-mapped from the cache, or decoded and cached now) and their source."""
    folder = Path(os.path.expanduser(cache_dir or os.path.join(default_cache_dir(), "arrays")))
    folder = folder / f"tiny_imagenet-{_listing_key(root, samples)}"
    done = folder / "meta.json"
    if done.is_file():
        arrays = {f"{s}_x": np.load(folder / f"{s}_x.npy", mmap_mode="r") for s in samples}
        return arrays, f"tiny-imagenet-cache:{folder}"
    arrays = {f"{s}_x": decode_files([p for p, _ in items]) for s, items in samples.items()}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for key, value in arrays.items():
            with atomic_path(folder / f"{key}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, value)
        atomic_write_bytes(done, json.dumps({"root": os.path.abspath(root)}).encode())  # last: marks it complete
    except OSError:
        pass  # an unwritable cache only costs time
    return arrays, f"tiny-imagenet:{os.path.abspath(os.path.expanduser(root))}"


class TinyImageNetDataModule(ArrayDataModule):
    """Tiny-ImageNet from its unzipped archive folder (see the module docstring); ``common`` are
    :class:`ArrayDataModule`'s arguments (batch size, splits, augmentation ...)."""

    def __init__(
        self,
        root: str = "./data/tiny-imagenet-200",
        name: str = "tiny_imagenet",
        mean: tuple[float, ...] | list[float] | None = MEAN,
        std: tuple[float, ...] | list[float] | None = STD,
        cache_dir: str | None = None,
        **common,
    ) -> None:
        super().__init__(name=name, root=root, **common)
        if (mean is None) != (std is None):
            raise ValueError("data.mean / data.std: give both, or neither (null: computed on the training split)")
        self.cache_dir = cache_dir
        self._mean = tuple(float(v) for v in mean) if mean is not None else None
        self._std = tuple(float(v) for v in std) if std is not None else None

    def _peek(self) -> None:
        path = Path(os.path.expanduser(self.root)) / "wnids.txt"
        if not path.is_file():
            raise offline_error(_WHAT, self.root, None, f"missing: {path}", fix=_FIX)
        wnids = sorted({w.strip() for w in path.read_text().split() if w.strip()})
        self._class_names, self._num_classes = readable_names(self.root, wnids), len(wnids)
        folder = path.parent / "train" / wnids[0] / "images"
        first = sorted(os.listdir(folder))[0] if folder.is_dir() and os.listdir(folder) else None
        if first is not None and self._image_shape is None:
            with Image.open(folder / first) as img:  # the header only: the images' size before decoding any
                self._image_shape = (3, img.size[1], img.size[0])

    def _load_arrays(self) -> SplitArrays:
        wnids, train, test = scan(self.root)
        arrays, source = load_cached(self.root, {"train": train, "test": test}, self.cache_dir)
        return SplitArrays(
            train_x=arrays["train_x"], train_y=np.asarray([y for _, y in train], np.int64),
            test_x=arrays["test_x"], test_y=np.asarray([y for _, y in test], np.int64),
            class_names=readable_names(self.root, wnids), source=source,
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "cache_dir": self.cache_dir}


__all__ = ["TinyImageNetDataModule", "decode_files", "readable_names", "scan"]
