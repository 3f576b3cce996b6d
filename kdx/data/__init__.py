"""Data layer: deterministic, resumable datamodules yielding ``(x, y, idx)`` batches."""

from kdx.data.augment import apply_crop_flip, crop_flip_params, normalize
from kdx.data.arrays import ArrayDataModule
from kdx.data.base import BaseDataModule
from kdx.data.datasets import ArrayDataset, SplitArrays
from kdx.data.splits import stratified_split
from kdx.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from kdx.data.fashion_mnist import FashionMNISTDataModule
from kdx.data.imagefolder import ImageFolderDataModule
from kdx.data.npz import ArrayFileDataModule, load_array_file
from kdx.paths import default_data_root
from kdx.data.sampler import EpochBatchSampler
from kdx.data.stl10 import STL10DataModule
from kdx.data.synthetic import SyntheticDataModule
from kdx.data.tiny_imagenet import TinyImageNetDataModule

__all__ = [
    "ArrayDataModule",
    "ArrayDataset",
    "ArrayFileDataModule",
    "BaseDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "EpochBatchSampler",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "STL10DataModule",
    "SplitArrays",
    "SyntheticDataModule",
    "TinyImageNetDataModule",
    "apply_crop_flip",
    "crop_flip_params",
    "default_data_root",
    "load_array_file",
    "normalize",
    "stratified_split",
]
