"""Offline array files (``.npz``) for image classification.

Two layouts are understood, for the splits ``train`` and ``test``:

(a) JPEG layout (e.g. ``shared/data/cifar10_jpeg/cifar10_jpeg.npz``):
    ``{split}_jpeg`` uint8 [bytes] (all JPEG files concatenated),
    ``{split}_offsets`` int64 [N+1] (image i is ``jpeg[off[i]:off[i+1]]``),
    ``{split}_labels`` [N], optional ``class_names``.
    Decoded once with PIL; the decoded arrays are cached as ``.npy`` under
    ``cache_dir`` (default ``$KDX_ARRAY_CACHE``, else ``<$KDX_CACHE or ~/.cache/kdx>/arrays``), keyed
    by a hash of the file's absolute path, size and mtime, written atomically
    (temporary file + ``os.replace``) and memory-mapped on later loads.
    The file's sha256 (what results.json records) is cached in the same folder
    (:func:`file_sha256`), so a large file is hashed once, not on every run.

(b) raw layout: ``{split}_x`` uint8 [N, H, W, C] or [N, H, W] (grayscale) and
    ``{split}_labels`` (or ``{split}_fine_labels``), optional ``class_names``
    (or ``fine_label_names``).

All loaders return images as uint8 [N, C, H, W].
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from kdx.data.arrays import ArrayDataModule
from kdx.data.datasets import SplitArrays
from kdx.errors import ConfigError
from kdx.io import atomic_path, atomic_write_bytes, sha256_file
from kdx.paths import default_cache_dir as kdx_cache_dir

SPLITS = ("train", "test")


def default_cache_dir() -> str:
    return os.environ.get("KDX_ARRAY_CACHE") or os.path.join(kdx_cache_dir(), "arrays")


def _layout(files: list[str]) -> str:
    if all(f"{s}_jpeg" in files and f"{s}_offsets" in files for s in SPLITS):
        return "jpeg"
    if all(f"{s}_x" in files for s in SPLITS):
        return "raw"
    raise ValueError(
        f"unknown array-file layout (keys: {sorted(files)}); expected "
        "{train,test}_jpeg + {train,test}_offsets + {train,test}_labels, or {train,test}_x + {train,test}_labels"
    )


def _labels(d, split: str) -> np.ndarray:
    for key in (f"{split}_labels", f"{split}_fine_labels"):
        if key in d.files:
            return np.asarray(d[key]).astype(np.int64)
    raise KeyError(f"no {split}_labels / {split}_fine_labels in the array file")


def _class_names(d) -> list[str] | None:
    for key in ("class_names", "fine_label_names"):
        if key in d.files:
            return [str(v) for v in np.asarray(d[key]).tolist()]
    return None


def _to_nchw(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {x.dtype}")
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise ValueError(f"images must be [N,H,W,C] or [N,H,W], got {x.shape}")


def _decode_one(buf: np.ndarray) -> Image.Image:
    return Image.open(io.BytesIO(buf.tobytes()))


def decode_jpeg_split(jpeg: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Decode concatenated JPEG files into uint8 [N, C, H, W] (RGB, or 1 channel if grayscale)."""
    n = len(offsets) - 1
    if n == 0:
        raise ValueError("empty split")
    first = _decode_one(jpeg[offsets[0] : offsets[1]])
    mode = "L" if first.mode in ("L", "1", "I;16") else "RGB"
    w, h = first.size
    c = 1 if mode == "L" else 3
    out = np.empty((n, c, h, w), np.uint8)
    for i in range(n):
        img = np.asarray(_decode_one(jpeg[offsets[i] : offsets[i + 1]]).convert(mode))
        if img.shape[:2] != (h, w):
            raise ValueError(f"image {i} is {img.shape[:2]}, expected {(h, w)}")
        out[i] = img[None] if c == 1 else img.transpose(2, 0, 1)
    return out


def _cache_folder(path: Path, cache_dir: str | None) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(os.path.expanduser(cache_dir or default_cache_dir())) / f"{path.stem}-{key}"


def file_sha256(path: str | os.PathLike, cache_dir: str | None = None) -> str:
    """The sha256 of an array file, computed once and kept beside its decoded-array cache (keyed by the file's
    absolute path, size and mtime, so a changed file is hashed again); an unwritable cache only costs time."""
    p = Path(os.path.expanduser(str(path)))
    record = _cache_folder(p, cache_dir) / "sha256"
    try:
        digest = record.read_text().strip()
        if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
            return digest
    except OSError:
        pass
    digest = sha256_file(p)
    try:
        atomic_write_bytes(record, digest.encode())
    except OSError:
        pass
    return digest


def read_members(path: str | os.PathLike, keys: tuple[str, ...], setting: str) -> dict[str, np.ndarray]:
    """Arrays ``keys`` of an ``.npz`` (only those are decompressed); a missing one is an error naming ``setting``."""
    with np.load(Path(os.path.expanduser(str(path))), allow_pickle=False) as d:
        missing = [k for k in keys if k not in d.files]
        if missing:
            raise ConfigError(f"{setting}: the array file {path} has no {missing} (it has {sorted(d.files)}).")
        return {k: np.asarray(d[k]) for k in keys}


def load_array_file(path: str, cache_dir: str | None = None, use_cache: bool = True) -> SplitArrays:
    """Load an array file in either layout; images as uint8 [N, C, H, W].

    For the JPEG layout the decoded arrays come from (or go to) the cache and
    are memory-mapped (read-only); ``SplitArrays.source`` says which happened.
    """
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise FileNotFoundError(f"array file not found: {path}")
    with np.load(p, allow_pickle=False) as d:
        layout = _layout(d.files)
        if layout == "raw":
            return SplitArrays(
                train_x=_to_nchw(d["train_x"]),
                train_y=_labels(d, "train"),
                test_x=_to_nchw(d["test_x"]),
                test_y=_labels(d, "test"),
                class_names=_class_names(d),
                source=f"npz:{p}",
            )
        folder = _cache_folder(p, cache_dir)
        meta_file = folder / "meta.json"
        if use_cache and meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in ("train_x", "test_x")}
            arrays.update({k: np.load(folder / f"{k}.npy") for k in ("train_y", "test_y")})
            return SplitArrays(**arrays, class_names=meta.get("class_names"), source=f"npz-jpeg-cache:{p}")
        arrays = {}
        for s in SPLITS:
            arrays[f"{s}_x"] = decode_jpeg_split(d[f"{s}_jpeg"], d[f"{s}_offsets"])
            arrays[f"{s}_y"] = _labels(d, s)
        names = _class_names(d)
    if use_cache:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for k, v in arrays.items():
                with atomic_path(folder / f"{k}.npy") as tmp, open(tmp, "wb") as f:
                    np.save(f, v)
            meta = {"source": str(p.resolve()), "class_names": names}
            atomic_write_bytes(meta_file, json.dumps(meta).encode())  # written last: marks the cache complete
        except OSError:
            pass  # an unwritable cache only costs time
    return SplitArrays(**arrays, class_names=names, source=f"npz-jpeg:{p}")


def _npz_member_shape(p: Path, key: str) -> tuple[int, ...]:
    """Shape of array ``key`` in an .npz, read from its header only."""
    with zipfile.ZipFile(p) as z, z.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, _ = np.lib.format.read_array_header_2_0(f)
    return tuple(shape)


def peek_array_file(path: str) -> dict:
    """Cheap metadata (``num_classes``, ``image_shape`` C,H,W, ``class_names``) without decoding."""
    p = Path(os.path.expanduser(path))
    with np.load(p, allow_pickle=False) as d:
        layout = _layout(d.files)
        names = _class_names(d)
        num_classes = len(names) if names else int(_labels(d, "train").max()) + 1
        if layout == "jpeg":
            off = d["train_offsets"]
            first = _decode_one(d["train_jpeg"][off[0] : off[1]])
            w, h = first.size
            shape = (1 if first.mode in ("L", "1", "I;16") else 3, h, w)
        else:
            s = _npz_member_shape(p, "train_x")
            shape = (1, s[1], s[2]) if len(s) == 3 else (s[3], s[1], s[2])
    return {"num_classes": num_classes, "image_shape": shape, "class_names": names, "layout": layout}


class ArrayFileDataModule(ArrayDataModule):
    """Any dataset stored as an array file (see the module docstring for layouts), any number of classes
    (``data=array data.path=<file>.npz``): the class count is the number of ``class_names`` when the file has
    them, else the largest training label + 1.

    ``name`` (the dataset key: teacher store, results, report) defaults to the file's name without ``.npz``.

    ``mean``/``std`` default to per-channel statistics of the file's train split.
    A relative ``path`` is looked up under ``root`` when ``root`` is given.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        root: str | None = None,
        mean: tuple[float, ...] | list[float] | None = None,
        std: tuple[float, ...] | list[float] | None = None,
        cache_dir: str | None = None,
        **common,
    ) -> None:
        path = os.path.expanduser(str(path))
        if root is not None and not os.path.isabs(path) and os.path.exists(os.path.join(root, path)):
            path = os.path.join(root, path)
        if name is None:  # the file's name is the dataset key (teacher store, results, report)
            name = os.path.basename(path).removesuffix(".npz")
        super().__init__(name=name, root=root if root is not None else os.path.dirname(os.path.abspath(path)), **common)
        self.path = path
        self.cache_dir = cache_dir
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self._mean = tuple(float(v) for v in mean) if mean is not None else None
        self._std = tuple(float(v) for v in std) if std is not None else None

    def _peek(self) -> None:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"array file not found: data.path={self.path!r}")
        info = peek_array_file(self.path)
        self._num_classes = self._num_classes or info["num_classes"]
        self._image_shape = self._image_shape or info["image_shape"]
        self._class_names = self._class_names or info["class_names"]

    def _load_arrays(self) -> SplitArrays:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"array file not found: data.path={self.path!r}")
        return load_array_file(self.path, self.cache_dir)

    def describe(self) -> dict:
        """The base summary plus the file read and its sha256 (cached: :func:`file_sha256`)."""
        return {**super().describe(), "source_file": os.path.abspath(self.path),
                "source_sha256": file_sha256(self.path, self.cache_dir)}
