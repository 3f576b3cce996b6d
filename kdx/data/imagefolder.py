"""Image-folder datasets (Tiny-ImageNet, ImageNet) with PIL transforms in workers.

Layout under ``root``: ``{train_dir}/<class>/**/*.JPEG`` (torchvision
ImageFolder; Tiny-ImageNet's ``train/<wnid>/images/`` works too), and either
``{test_dir}/<class>/...`` or Tiny-ImageNet's raw validation layout
``{test_dir}/images/*.JPEG`` + ``{test_dir}/val_annotations.txt``. Class
indices follow the sorted training folders; ``root/words.txt`` (Tiny-ImageNet)
gives readable class names when present.

Transforms (torchvision): for ``image_size <= 64`` training uses
RandomCrop(image_size, padding=pad or image_size // 8) + RandomHorizontalFlip,
evaluation only resizes/centre-crops to ``image_size`` (no-ops at native size);
for larger images RandomResizedCrop + flip, and Resize(image_size * 8 / 7) +
CenterCrop for evaluation. Batches arrive float-normalised; the datamodule does
not touch them in ``on_after_batch_transfer``.

Order is deterministic as in the in-memory datamodules, and the random
transform of sample ``idx`` in epoch ``e`` is drawn from torch's RNG seeded
with a hash of ``(seed, e, idx)`` (in a forked RNG scope), so augmentation is
reproducible across runs, resumes and worker counts too.

Decoding (``decode``): ``cpu`` (default) decodes and transforms in the loader's workers, ``num_workers`` of them
(null: :func:`default_num_workers`, the CPUs this process may use divided among the node's training processes),
into pinned memory when a GPU is present. ``gpu`` (image_size > 64 only; needs a CUDA GPU) lets the workers read
the files' bytes only and decodes and augments each batch on the batch's device after the transfer
(:mod:`kdx.data.device_decode`), with the same random crops and flips as ``cpu``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, find_classes, make_dataset

from kdx.data import device_decode as dd
from kdx.data.augment import hash_uniform32, normalize
from kdx.data.base import BaseDataModule, offline_error
from kdx.data.sampler import EpochBatchSampler
from kdx.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODERS = ("cpu", "gpu")
#: the most loader workers one training process gets by default
MAX_DEFAULT_WORKERS = 32


def default_num_workers(processes: int = 1) -> int:
    """Loader workers per training process: the CPUs this process may run on (``os.sched_getaffinity``, which
    honours cgroup/SLURM CPU binding) shared by the node's ``processes`` training processes, one CPU left to each
    process itself, at most :data:`MAX_DEFAULT_WORKERS`."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(MAX_DEFAULT_WORKERS, cpus // max(1, int(processes)) - 1))


class _EpochTagged(torch.utils.data.Sampler):
    """Wraps an :class:`EpochBatchSampler`, yielding ``(epoch, batch)`` keys; forwards ``set_epoch``."""

    def __init__(self, sampler: EpochBatchSampler) -> None:
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield epoch, batch

    def __len__(self) -> int:
        return len(self.sampler)


class FileListDataset(Dataset):
    """``(path, label)`` samples; ``ds[(epoch, [i, ...])]`` returns a stacked batch ``(x, y, idx)``."""

    def __init__(self, samples: list[tuple[str, int]], transform: Any, seed: int = 0,
                 source_index: np.ndarray | None = None, encoded: bool = False) -> None:
        self.samples = samples
        self.transform = transform
        self.encoded = bool(encoded)  # batches hold the files' bytes (EncodedImages), decoded on the device
        self.seed = int(seed)
        self.source_index = torch.as_tensor(
            np.arange(len(samples)) if source_index is None else source_index, dtype=torch.int64
        )

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([s[1] for s in self.samples], dtype=np.int64)

    def content_hash(self) -> str:
        """A hash of the file list (paths and labels) and source indices."""
        h = hashlib.blake2b(digest_size=16)
        for path, label in self.samples:
            h.update(f"{path}\t{label}\n".encode())
        h.update(self.source_index.numpy().tobytes())
        return h.hexdigest()

    def _load(self, i: int, sample_seed: int) -> torch.Tensor:
        img = default_loader(self.samples[i][0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.transform(img)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        single = isinstance(index, (int, np.integer))
        idx = torch.as_tensor([index] if single else index, dtype=torch.int64)
        y = torch.as_tensor([self.samples[i][1] for i in idx.tolist()], dtype=torch.int64)
        if self.encoded:
            data = dd.EncodedImages([dd.read_encoded(self.samples[i][0]) for i in idx.tolist()])
            return (data, y[0], idx[0]) if single else (data, y, idx)
        seeds = hash_uniform32(self.seed, epoch, idx, stream=3).tolist()
        x = torch.stack([self._load(i, s) for i, s in zip(idx.tolist(), seeds)])
        return (x[0], y[0], idx[0]) if single else (x, y, idx)


class ImageFolderDataModule(BaseDataModule):
    """Tiny-ImageNet / ImageNet style folders under ``root`` (see the module docstring)."""

    def __init__(
        self,
        root: str,
        name: str = "imagefolder",
        image_size: int = 64,
        train_dir: str = "train",
        test_dir: str = "val",
        mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
        std: tuple[float, ...] | list[float] = IMAGENET_STD,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_split: float | int = 0,
        split_seed: int = 0,
        augment: bool = True,
        pad: int | None = None,
        seed: int = 0,
        num_workers: int | None = None,
        subset: float | int | None = None,
        test_subset: float | int | None = None,
        drop_last: bool = False,
        decode: str = "cpu",
    ) -> None:
        image_size = int(image_size)
        super().__init__(
            name=name, root=root, batch_size=batch_size, eval_batch_size=eval_batch_size, val_split=val_split,
            split_seed=split_seed, augment=augment, pad=image_size // 8 if pad is None else int(pad), seed=seed,
            num_workers=0, subset=subset, test_subset=test_subset, drop_last=drop_last,
        )
        #: loader workers per process; None: default_num_workers() for the node's processes, when loaders are built
        self.num_workers: Optional[int] = None if num_workers is None else int(num_workers)
        self.decode = check_decode(decode, image_size)
        self.image_size = image_size
        self.train_dir, self.test_dir = train_dir, test_dir
        self._image_shape = (3, image_size, image_size)
        self._mean, self._std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self._samples: dict[str, list[tuple[str, int]]] = {}

    # -- folders
    def _dir(self, sub: str) -> str:
        path = os.path.join(os.path.expanduser(self.root), sub)
        if not os.path.isdir(path):
            raise offline_error(
                f"{self.name} ({self.train_dir}/<class>/*, {self.test_dir}/<class>/*)", self.root, None,
                f"no folder {path}",
                fix=f"To fix: set data.root to the folder that holds '{self.train_dir}/<class>/...' and "
                f"'{self.test_dir}/' (ImageFolder layout, or Tiny-ImageNet's val/images + val/val_annotations.txt), "
                "or data.train_dir / data.test_dir to their names.",
            )
        return path

    def _peek(self) -> None:
        if self._class_names is None:
            wnids, _ = find_classes(self._dir(self.train_dir))
            self._class_names = self._readable_names(wnids)
            self._num_classes = len(wnids)

    def _readable_names(self, wnids: list[str]) -> list[str]:
        """The first synonym of each class folder's wnid in ``root/words.txt`` (``wnid<TAB>names``, Tiny-ImageNet)
        or ``root/LOC_synset_mapping.txt`` (``wnid names``, the Kaggle ImageNet archive); else the folder names."""
        table = {}
        for file, sep in (("words.txt", "\t"), ("LOC_synset_mapping.txt", " ")):
            path = os.path.join(os.path.expanduser(self.root), file)
            if os.path.isfile(path):
                with open(path) as f:
                    for line in f:
                        parts = line.rstrip("\n").split(sep, 1)
                        if len(parts) == 2:
                            table[parts[0]] = parts[1].split(",")[0].strip()
                break
        return [table.get(w, w) for w in wnids]

    def _scan(self) -> tuple[list, list]:
        train_path, test_path = self._dir(self.train_dir), self._dir(self.test_dir)
        _, class_to_idx = find_classes(train_path)
        train = make_dataset(train_path, class_to_idx, extensions=IMG_EXTENSIONS)
        ann = os.path.join(test_path, "val_annotations.txt")
        if os.path.isfile(ann) and os.path.isdir(os.path.join(test_path, "images")):
            test = []
            with open(ann) as f:
                for line in f:
                    parts = line.split("\t")
                    if len(parts) >= 2:
                        test.append((os.path.join(test_path, "images", parts[0]), class_to_idx[parts[1]]))
            test.sort()
        else:
            test = make_dataset(test_path, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not train or not test:
            raise FileNotFoundError(f"{self.name}: no images found under data.root={self.root!r}")
        return train, test

    # -- BaseDataModule hooks
    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        self._peek()
        train, test = self._scan()
        self._samples = {"train": train, "test": test}
        self.source = f"imagefolder:{os.path.abspath(os.path.expanduser(self.root))}"
        return np.asarray([s[1] for s in train]), np.asarray([s[1] for s in test])

    def _transform(self, train: bool) -> T.Compose:
        s = self.image_size
        norm = [T.ToTensor(), T.Normalize(self._mean, self._std)]
        if s <= 64:
            base = [T.Resize(s), T.CenterCrop(s)]
            aug = [T.RandomCrop(s, padding=self.pad), T.RandomHorizontalFlip()] if train and self.augment else []
            return T.Compose(base + aug + norm)
        if train and self.augment:
            return T.Compose([T.RandomResizedCrop(s), T.RandomHorizontalFlip()] + norm)
        return T.Compose([T.Resize(int(round(s * 8 / 7))), T.CenterCrop(s)] + norm)

    def _make_dataset(self, split: str, positions: np.ndarray, train: bool) -> FileListDataset:
        samples = [self._samples[split][i] for i in positions.tolist()]
        return FileListDataset(samples, self._transform(train), seed=self.seed, source_index=positions,
                               encoded=self.decode == "gpu")

    def _after_setup(self) -> None:
        self._samples = {}

    def loader_workers(self) -> int:
        """``num_workers``, else :func:`default_num_workers` for this node's training processes."""
        if self.num_workers is not None:
            return self.num_workers
        return default_num_workers(int(self.trainer.num_devices) if self.trainer is not None else 1)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        workers = self.loader_workers()
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=_EpochTagged(self._sampler(len(dataset), train)),
            num_workers=workers,
            pin_memory=torch.cuda.is_available() and self.decode == "cpu",  # encoded bytes are read from host memory
            persistent_workers=workers > 0,
        )

    # ---- data.decode=gpu: batches of encoded files, decoded and augmented on their device
    def transform_batch(self, batch: Any, train: bool, epoch: int = 0) -> Any:
        """A loader's batch as the model sees it: a batch of encoded files (``decode=gpu``) decoded on the device of
        its labels and transformed there (augmented when ``train`` and ``augment``); other batches as they are."""
        x, y, idx = batch[:3]
        if not isinstance(x, dd.EncodedImages):
            return batch
        images = dd.decode_batch(x.data, y.device)
        s = self.image_size
        if train and self.augment:
            seeds = hash_uniform32(self.seed, epoch, idx.cpu(), stream=3).tolist()
            views = dd.train_views(images, dd.train_params(images, seeds), s)
        else:
            views = dd.eval_views(images, int(round(s * 8 / 7)), s)
        return normalize(views, self.mean, self.std), y, idx

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        train = trainer is not None and bool(trainer.training)
        return self.transform_batch(batch, train=train, epoch=int(trainer.current_epoch) if trainer is not None else 0)

    def describe(self) -> dict:
        d = super().describe()
        d.update(image_size=self.image_size, train_dir=self.train_dir, test_dir=self.test_dir, decode=self.decode,
                 num_workers=self.num_workers)
        return d


def check_decode(decode: str, image_size: int) -> str:
    """``data.decode`` checked: ``gpu`` only with a CUDA GPU and for ImageNet-sized images."""
    if decode not in DECODERS:
        raise ConfigError(f"data.decode={decode!r}: choose one of {', '.join(DECODERS)}.")
    if decode == "gpu" and not torch.cuda.is_available():
        raise ConfigError("data.decode=gpu decodes JPEGs on a CUDA GPU, and this machine has none (torch.cuda."
                          "is_available() is False). Set data.decode=cpu (decoding in the loader's workers).")
    if decode == "gpu" and image_size <= 64:
        raise ConfigError(f"data.decode=gpu is for large images (RandomResizedCrop; data.image_size={image_size} "
                          "<= 64). Keep data.decode=cpu, or use an in-memory dataset (data=tiny_imagenet), which "
                          "augments on the device already.")
    return decode
