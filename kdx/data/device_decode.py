"""JPEG decoding and ImageNet-style augmentation of whole batches on the device (``data.decode=gpu``).

The loader's workers only read the files' bytes (:class:`EncodedImages`); the datamodule decodes a batch at once
with ``torchvision.io.decode_jpeg(list, device=<the batch's device>)`` (nvJPEG's batched decoder on a GPU) and
augments it there: per image a crop-and-resize, then a flip, then one normalisation of the stacked batch.

The random parameters equal those of the CPU pipeline (:class:`kdx.data.imagefolder.FileListDataset`): sample
``idx`` of epoch ``e`` seeds torch's RNG with ``hash_uniform32(seed, e, idx, 3)`` and draws
``RandomResizedCrop.get_params`` then the flip's ``torch.rand(1)``, exactly as ``Compose([RandomResizedCrop,
RandomHorizontalFlip, ...])`` does on the PIL image. So the two paths crop the same boxes and flip the same images;
pixels differ only by decoder and resampling (PIL's bilinear filter vs. torchvision's antialiased bilinear on
tensors, within a few levels of 255). Evaluation: Resize(shorter side) + CenterCrop, as torchvision.

Files nvJPEG cannot decode (ImageNet's few CMYK JPEGs, a PNG named .JPEG) are decoded on the CPU by
``torchvision.io.decode_image`` and moved to the device, one by one, when the batched call fails.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as F2

#: RandomResizedCrop's defaults (torchvision, mdistiller's ImageNet pipeline)
SCALE, RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)


class EncodedImages:
    """A batch of encoded image files (1-D uint8 CPU tensors) that passes through Lightning's transfer to the device
    untouched (``to`` and ``pin_memory`` return it as it is): the decoder reads the bytes from host memory."""

    def __init__(self, data: Sequence[Tensor]) -> None:
        self.data = list(data)

    def __len__(self) -> int:
        return len(self.data)

    def to(self, *args, **kwargs) -> "EncodedImages":
        return self

    def pin_memory(self, *args, **kwargs) -> "EncodedImages":
        return self


def read_encoded(path: str | Path) -> Tensor:
    """A file's bytes as a 1-D uint8 tensor."""
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


def decode_batch(data: Sequence[Tensor], device: torch.device | str) -> list[Tensor]:
    """RGB uint8 ``[3, H, W]`` images on ``device``, decoded in one batched call; files that call cannot take are
    decoded on the CPU (any format ``decode_image`` reads) and moved to ``device``."""
    device = torch.device(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, message=".*TorchCodec.*")  # 0.29's deprecation note
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            return list(decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(decode_image(d, mode=ImageReadMode.RGB).to(device))
            return out


def train_params(images: Sequence[Tensor], seeds: Sequence[int]) -> list[tuple[int, int, int, int, bool]]:
    """``(top, left, height, width, flip)`` of each image, drawn as the CPU pipeline draws them (module docstring)."""
    out = []
    for img, seed in zip(images, seeds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            i, j, h, w = RandomResizedCrop.get_params(img, list(SCALE), list(RATIO))
            flip = bool(torch.rand(1) < 0.5)
        out.append((i, j, h, w, flip))
    return out


def train_views(images: Sequence[Tensor], params: Sequence[tuple[int, int, int, int, bool]], size: int) -> Tensor:
    """uint8 ``[B, 3, size, size]``: each image cropped to its box, resized (bilinear, antialiased), maybe mirrored."""
    out = []
    for img, (i, j, h, w, flip) in zip(images, params):
        view = F2.resized_crop(img, i, j, h, w, [size, size], antialias=True)
        out.append(F2.horizontal_flip(view) if flip else view)
    return torch.stack(out)


def eval_views(images: Sequence[Tensor], resize: int, size: int) -> Tensor:
    """uint8 ``[B, 3, size, size]``: Resize(``resize``, the shorter side) + CenterCrop(``size``) of each image."""
    return torch.stack([F2.center_crop(F2.resize(img, [resize], antialias=True), [size, size]) for img in images])


__all__ = ["EncodedImages", "decode_batch", "eval_views", "read_encoded", "train_params", "train_views"]
