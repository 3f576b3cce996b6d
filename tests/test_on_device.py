"""``data.on_device=true``: the split on the accelerator, batches gathered and augmented there.

Checked on CPU against the regular DataLoader path (same batches, same order, same DDP shards)
and against torchvision (same crop/flip law, identical normalised values for given parameters).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from lightning.fabric.utilities.data import _set_sampler_epoch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from conftest import compose_cfg
from kdx.data.datasets import DeviceBatches
from kdx.data.sampler import EpochBatchSampler
from kdx.data.synthetic import SyntheticDataModule
from kdx.run import run



pytestmark = pytest.mark.usefixtures("one_thread")

def _dm(**kw) -> SyntheticDataModule:
    args = dict(num_classes=10, train_size=100, test_size=40, batch_size=16, seed=3)
    dm = SyntheticDataModule(**{**args, **kw})
    dm.setup()
    return dm


def _within(count: float, n: int, p: float, z: float = 5.0) -> bool:
    """``count`` of ``n`` Bernoulli(p) draws lies within ``z`` standard deviations of ``n p``."""
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


def test_crop_flip_law_is_torchvisions():
    """Offsets uniform on [0, 2 pad], flip with p = 1/2, independent: the law of RandomCrop + RandomHorizontalFlip.

    Fixed seeds make the test deterministic; the tolerances are 5 binomial standard deviations
    (a χ² bound of df + 5·sqrt(2 df) for the joint law), so a correct law passes with
    overwhelming probability for any seed and a biased one (e.g. offsets in [0, 2 pad)) fails.
    """
    pad, n = 4, 90_000
    dm = _dm(pad=pad)
    dx, dy, flip = dm.crop_flip(epoch=2, idx=torch.arange(n))
    k = 2 * pad + 1
    for v in (dx, dy):
        counts = torch.bincount(v, minlength=k)
        assert len(counts) == k and all(_within(c, n, 1 / k) for c in counts.tolist())
    assert _within(int(flip.sum()), n, 0.5)
    joint = torch.bincount((dx * k + dy) * 2 + flip.long(), minlength=k * k * 2).double()
    expected = n / (k * k * 2)
    chi2, df = float(((joint - expected) ** 2 / expected).sum()), k * k * 2 - 1
    assert chi2 < df + 5 * math.sqrt(2 * df)
    # torchvision's own draws on the padded image have the same support and the same uniform law
    torch.manual_seed(0)
    m = 9_000
    img = torch.zeros(3, 32 + 2 * pad, 32 + 2 * pad)
    tv = torch.tensor([T.RandomCrop.get_params(img, (32, 32)) for _ in range(m)])[:, :2]  # (top, left)
    for v in (tv[:, 0], tv[:, 1]):
        counts = torch.bincount(v, minlength=k)
        assert len(counts) == k and all(_within(c, m, 1 / k) for c in counts.tolist())


def _torchvision_reference(img: np.ndarray, dx: int, dy: int, flip: bool, pad: int, mean, std) -> torch.Tensor:
    """Pad + crop + hflip + ToTensor + Normalize with torchvision.transforms.functional on a PIL image."""
    pil = Image.fromarray(img.transpose(1, 2, 0))
    pil = TF.pad(pil, [pad], fill=0)
    pil = TF.crop(pil, dy, dx, img.shape[1], img.shape[2])
    if flip:
        pil = TF.hflip(pil)
    return TF.normalize(TF.to_tensor(pil), mean, std)


@pytest.mark.parametrize("pad", [4, 2])
def test_on_device_values_equal_torchvision(pad):
    dm = _dm(pad=pad, on_device=True, train_size=64)
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceBatches)
    _set_sampler_epoch(loader, 5)  # as Lightning does at each epoch start
    checked = 0
    for batch in loader:
        x, _, idx = dm.transform_batch(batch, train=True, epoch=5)
        dx, dy, flip = dm.crop_flip(5, idx)
        raw = dm.train_dataset.x[idx].numpy()
        for i in range(len(idx)):
            ref = _torchvision_reference(raw[i], int(dx[i]), int(dy[i]), bool(flip[i]), pad, dm.mean, dm.std)
            assert torch.equal(x[i], ref), (int(idx[i]), int(dx[i]), int(dy[i]), bool(flip[i]))
            checked += 1
    assert checked == 64 and flip.any() and not flip.all()


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_on_device_batches_equal_dataloader_batches(world, drop_last):
    dm = _dm()
    ds = dm.train_dataset
    for rank in range(world):
        for epoch in (0, 1, 7):
            args = dict(n=len(ds), batch_size=16, seed=3, shuffle=True, drop_last=drop_last, rank=rank, world_size=world)
            ref_sampler, dev_sampler = EpochBatchSampler(**args), EpochBatchSampler(**args)
            ref = DataLoader(ds, batch_size=None, sampler=ref_sampler)
            dev = DeviceBatches(ds, dev_sampler, "cpu")
            _set_sampler_epoch(ref, epoch)
            _set_sampler_epoch(dev, epoch)
            a, b = list(ref), list(dev)
            assert len(a) == len(b) == len(dev) and len(a) > 0
            for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
                assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)
                assert xb.dtype == torch.uint8
                ta, tb = dm.transform_batch((xa, ya, ia), True, epoch), dm.transform_batch((xb, yb, ib), True, epoch)
                assert torch.equal(ta[0], tb[0])


def test_on_device_eval_loaders_and_one_copy_per_split():
    dm = _dm(on_device=True, val_split=0.2)
    val, test = dm.val_dataloader()
    assert isinstance(val, DeviceBatches) and isinstance(test, DeviceBatches)
    assert torch.equal(torch.cat([i for _, _, i in test]), torch.arange(len(dm.test_dataset)))
    first, again = dm.train_dataloader(), dm.train_dataloader()
    assert first._split()[0] is again._split()[0]  # the split is copied to the device once


def test_on_device_run_trains_the_same_student(tmp_path, tiny):
    """The real config, task=train for 2 epochs: the on-device path gives the same weights as the DataLoader path."""
    common = tiny + ["task=train", "trainer.max_epochs=2", "trainer.deterministic=true", "data.drop_last=true",
                     "data.train_size=80"]  # 2 steps an epoch, the last 16 samples dropped (a different 16 each epoch)
    a = run(compose_cfg(common, tmp_path, name="loader"))
    b = run(compose_cfg(common + ["data.on_device=true"], tmp_path, name="device"))
    assert b["data"]["on_device"] is True and a["data"]["on_device"] is False
    wa = torch.load(tmp_path / "loader" / "student.pt", weights_only=True)
    wb = torch.load(tmp_path / "device" / "student.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["history"] == b["history"]
