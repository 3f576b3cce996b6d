"""Tests of the data layer (kdx.data): sampling, augmentation, loaders, datasets."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from kdx.data import (
    ArrayFileDataModule,
    CIFAR10DataModule,
    CIFAR100DataModule,
    EpochBatchSampler,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
    apply_crop_flip,
    crop_flip_params,
    default_data_root,
    load_array_file,
    normalize,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR10_NPZ = SHARED / "cifar10_jpeg" / "cifar10_jpeg.npz"


# ----------------------------------------------------------------------------- sampler


def _epoch_indices(sampler: EpochBatchSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return [i for batch in sampler for i in batch]


def test_sampler_deterministic_and_covering():
    a = EpochBatchSampler(103, 10, seed=7, shuffle=True, drop_last=False)
    b = EpochBatchSampler(103, 10, seed=7, shuffle=True, drop_last=False)
    e0, e1 = _epoch_indices(a, 0), _epoch_indices(a, 1)
    assert e0 == _epoch_indices(b, 0) and e1 == _epoch_indices(b, 1)
    assert e0 != e1
    assert sorted(e0) == list(range(103)) and sorted(e1) == list(range(103))
    assert _epoch_indices(a, 0) == e0  # going back to an epoch reproduces it (resume)
    assert _epoch_indices(EpochBatchSampler(103, 10, seed=8), 0) != e0
    assert len(a) == 11 and [len(b) for b in a][-1] == 3
    assert len(EpochBatchSampler(103, 10, seed=7, drop_last=True)) == 10
    assert all(len(b) == 10 for b in EpochBatchSampler(103, 10, seed=7, drop_last=True))
    assert _epoch_indices(EpochBatchSampler(5, 2, shuffle=False), 3) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n,world", [(12, 3), (10, 3), (101, 4), (3, 4)])
def test_sampler_ddp_shards(n, world):
    # evaluation: unpadded, disjoint, covering, lengths per rank
    shards = [_epoch_indices(EpochBatchSampler(n, 4, shuffle=False, rank=r, world_size=world), 0) for r in range(world)]
    assert sorted(sum(shards, [])) == list(range(n))
    for r, s in enumerate(shards):
        sampler = EpochBatchSampler(n, 4, shuffle=False, rank=r, world_size=world)
        assert len(s) == sampler.num_samples and len(sampler) == -(-len(s) // 4)
    # training: padded to a multiple of world_size, equal lengths, all indices covered
    train = [EpochBatchSampler(n, 4, seed=1, shuffle=True, rank=r, world_size=world) for r in range(world)]
    shards = [_epoch_indices(s, 2) for s in train]
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in shards)
    assert all(len(s) == -(-per_rank // 4) for s in train)
    assert set(sum(shards, [])) == set(range(n))
    if n % world == 0:
        assert sorted(sum(shards, [])) == list(range(n))  # disjoint
    full = EpochBatchSampler(n, 4, seed=1, shuffle=True)
    full.set_epoch(2)
    assert sum(shards, []) != [] and shards[0] == full.indices()[0::world].tolist()[: per_rank]


# ----------------------------------------------------------------------------- augmentation


def test_crop_flip_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    x[:, :, :, 0] = 255  # make flips visible at the border
    idx = torch.arange(1000, 1064)
    for pad in (4, 2):
        dx, dy, flip = crop_flip_params(3, 5, idx, pad)
        out = apply_crop_flip(x, dx, dy, flip, pad)
        for i in range(len(x)):
            ref = TF.pad(x[i], [pad], fill=0)
            ref = TF.crop(ref, int(dy[i]), int(dx[i]), 32, 32)
            if flip[i]:
                ref = TF.hflip(ref)
            assert torch.equal(out[i], ref), i
    # non-square images, pad 0 is identity up to the flip
    y = torch.randint(0, 256, (8, 1, 5, 7), dtype=torch.uint8, generator=g)
    dx, dy, flip = crop_flip_params(0, 0, torch.arange(8), 0)
    assert torch.equal(apply_crop_flip(y, dx, dy, flip, 0), torch.where(flip.view(-1, 1, 1, 1), y.flip(3), y))


def test_crop_flip_params_distribution():
    idx = torch.arange(90_000)
    dx, dy, flip = crop_flip_params(0, 0, idx, 4)
    dx2, dy2, flip2 = crop_flip_params(0, 0, idx, 4)
    assert torch.equal(dx, dx2) and torch.equal(dy, dy2) and torch.equal(flip, flip2)
    assert dx.dtype == torch.int64 and flip.dtype == torch.bool
    for v in (dx, dy):
        assert v.min() == 0 and v.max() == 8
        counts = torch.bincount(v, minlength=9).double()
        assert (counts / counts.mean() - 1).abs().max() < 0.05  # uniform on [0, 8]
    assert abs(flip.double().mean().item() - 0.5) < 0.01
    assert abs(torch.corrcoef(torch.stack([dx.double(), dy.double()]))[0, 1]) < 0.02
    ex, ey, ef = crop_flip_params(0, 1, idx, 4)
    assert (ex == dx).double().mean() < 0.2 and (ef == flip).double().mean() < 0.6
    sx, _, _ = crop_flip_params(1, 0, idx, 4)
    assert (sx == dx).double().mean() < 0.2
    # a subset of indices gets the same parameters as in the full batch (per-sample function)
    sub = torch.tensor([5, 77, 89_999])
    assert torch.equal(crop_flip_params(0, 0, sub, 4)[0], dx[sub])


def test_normalize_matches_torchvision():
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    ref = torch.stack([T.Normalize(mean, std)(T.ToTensor()(Image.fromarray(a))) for a in imgs])
    out = normalize(torch.from_numpy(imgs).permute(0, 3, 1, 2), mean, std)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


# ----------------------------------------------------------------------------- npz loader


def _jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_jpeg_npz(path: Path, n_train=12, n_test=6, size=8, classes=3) -> dict:
    rng = np.random.default_rng(1)
    out, expect = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        imgs = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        blobs = [_jpeg_bytes(a) for a in imgs]
        out[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), np.uint8)
        out[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        out[f"{split}_labels"] = (np.arange(n) % classes).astype(np.uint8)
        expect[split] = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    out["class_names"] = np.array([f"c{k}" for k in range(classes)])
    np.savez(path, **out)
    return expect


def test_npz_jpeg_layout_and_cache(tmp_path):
    path = tmp_path / "tiny.npz"
    expect = _write_jpeg_npz(path)
    cache = tmp_path / "cache"
    first = load_array_file(str(path), cache_dir=str(cache))
    assert first.source.startswith("npz-jpeg:")
    assert first.train_x.shape == (12, 3, 8, 8) and first.train_x.dtype == np.uint8
    assert np.array_equal(first.train_x, expect["train"].transpose(0, 3, 1, 2))
    assert np.array_equal(first.test_x, expect["test"].transpose(0, 3, 1, 2))
    assert first.class_names == ["c0", "c1", "c2"] and first.train_y.dtype == np.int64
    assert len(list(cache.glob("*/meta.json"))) == 1 and not list(cache.glob("*/*.tmp"))

    second = load_array_file(str(path), cache_dir=str(cache))
    assert second.source.startswith("npz-jpeg-cache:") and isinstance(second.train_x, np.memmap)
    for k in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(first, k), getattr(second, k))

    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed file gets a new cache entry
    assert load_array_file(str(path), cache_dir=str(cache)).source.startswith("npz-jpeg:")
    assert len(list(cache.glob("*/meta.json"))) == 2

    dm = ArrayFileDataModule(path=str(path), name="tiny", cache_dir=str(cache), batch_size=4)
    assert dm.num_classes == 3 and dm.image_shape == (3, 8, 8)  # from the header, before setup
    dm.setup()
    assert dm.source.startswith("npz-jpeg-cache:") and dm.train_size == 12
    assert len(dm.mean) == 3 and all(0 < s for s in dm.std)


def test_npz_raw_layout(tmp_path):
    rng = np.random.default_rng(2)
    x_tr = rng.integers(0, 256, size=(20, 6, 5, 3), dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(10, 6, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", train_x=x_tr, train_labels=np.arange(20) % 4, test_x=x_te,
             test_labels=np.arange(10) % 4)
    a = load_array_file(str(tmp_path / "rgb.npz"))
    assert np.array_equal(a.train_x, x_tr.transpose(0, 3, 1, 2)) and a.class_names is None
    g = x_tr[..., 0]
    np.savez_compressed(tmp_path / "grey.npz", train_x=g, train_fine_labels=np.arange(20) % 5, test_x=g[:10],
                        test_fine_labels=np.arange(10) % 5, fine_label_names=np.array(list("abcde")))
    dm = ArrayFileDataModule(path="grey.npz", root=str(tmp_path), name="grey", batch_size=8)
    assert dm.num_classes == 5 and dm.image_shape == (1, 6, 5) and dm.class_names == list("abcde")
    dm.setup()
    assert np.array_equal(dm.train_dataset.x.numpy(), g[:, None])
    ref = g / 255.0
    assert dm.mean[0] == pytest.approx(ref.mean(), abs=1e-4) and dm.std[0] == pytest.approx(ref.std(), abs=1e-4)
    x, y, idx = next(iter(dm.test_dataloader()))
    x, y, idx = dm.on_after_batch_transfer((x, y, idx), 0)
    assert x.shape == (10, 1, 6, 5) and x.dtype == torch.float32 and torch.equal(idx, torch.arange(10))


@pytest.mark.skipif(not CIFAR10_NPZ.is_file(), reason=f"{CIFAR10_NPZ} not present")
def test_real_cifar10_npz():
    # First ever call decodes 60k JPEGs (~5 s here) into ~/.cache/kdx/arrays; later calls memory-map the cache.
    dm = CIFAR10DataModule(root=str(SHARED), subset=500, test_subset=200, batch_size=50)
    assert dm.num_classes == 10 and dm.image_shape == (3, 32, 32)
    dm.setup()
    assert dm.source.startswith("npz-jpeg") and dm.class_names[0] == "airplane"
    assert dm.train_size == 500 and len(dm.test_dataset) == 200
    assert np.bincount(dm.train_dataset.labels).tolist() == [50] * 10
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (50, 3, 32, 32) and y.dtype == idx.dtype == torch.int64
    xf = dm.transform_batch((x, y, idx), train=False)[0]
    assert abs(xf.mean().item()) < 0.3 and 0.7 < xf.std().item() < 1.3
    d = dm.describe()
    json.dumps(d)
    assert d["sizes"]["full_train"] == 50000 and d["subset"] == 500
    # explicit npz_path, source='npz'
    dm2 = CIFAR10DataModule(root="/nonexistent", source="npz", npz_path=str(CIFAR10_NPZ), test_subset=100)
    dm2.setup()
    assert len(dm2.test_dataset) == 100


# ----------------------------------------------------------------------------- real torchvision data / errors


@pytest.mark.skipif(not (SHARED / "FashionMNIST" / "raw").is_dir(), reason=f"{SHARED}/FashionMNIST/raw not present")
def test_fashion_mnist():
    dm = FashionMNISTDataModule(root=str(SHARED), download=False, subset=0.02, test_subset=100, batch_size=32)
    assert dm.num_classes == 10 and dm.image_shape == (3, 32, 32)
    dm.setup()
    assert dm.train_size == 1200 and len(dm.test_dataset) == 100
    assert np.bincount(dm.train_dataset.labels).tolist() == [120] * 10
    x = dm.train_dataset.x
    assert x.shape[1:] == (3, 32, 32)
    assert x[:, :, :2].sum() == 0 and x[:, :, :, -2:].sum() == 0  # zero border
    assert torch.equal(x[:, 0], x[:, 2])  # grey replicated
    assert dm.mean == (0.2860,) * 3 and dm.std == (0.3530,) * 3


def test_cifar100_offline_error(tmp_path):
    dm = CIFAR100DataModule(root=str(tmp_path), download=False)
    assert dm.num_classes == 100 and dm.image_shape == (3, 32, 32) and dm.class_names[0] == "apple"
    t = time.time()
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    assert time.time() - t < 10
    msg = str(err.value)
    assert "data.root" in msg and str(tmp_path) in msg and "data.npz_path" in msg and "download" in msg
    with pytest.raises(FileNotFoundError, match="data.npz_path"):
        CIFAR100DataModule(root=str(tmp_path), source="npz", npz_path=str(tmp_path / "missing.npz")).setup()
    with pytest.raises(ValueError):
        CIFAR100DataModule(root=str(tmp_path), source="bogus")
    with pytest.raises(TypeError):
        CIFAR100DataModule(root=str(tmp_path), batchsize=3)  # typos are not swallowed


def test_fashion_mnist_offline_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        FashionMNISTDataModule(root=str(tmp_path), download=False).setup()


def test_cifar_auto_prefers_torchvision_files(tmp_path, monkeypatch):
    class FakeCIFAR10:  # stands in for torchvision's files being present under root
        classes = ["c"] * 10

        def __init__(self, root, train=True, download=False):
            n = 20 if train else 10
            self.data = np.full((n, 32, 32, 3), 7 if train else 9, np.uint8)
            self.data[:, 0, 0] = [1, 2, 3]
            self.targets = list(np.arange(n) % 10)

    dm = CIFAR10DataModule(root=str(tmp_path), npz_path=str(CIFAR10_NPZ), download=False)
    monkeypatch.setattr(dm, "tv_class", FakeCIFAR10)
    dm.setup()
    assert dm.source.startswith("torchvision:") and dm.train_size == 20 and len(dm.test_dataset) == 10
    assert dm.train_dataset.x.shape == (20, 3, 32, 32) and dm.train_dataset.x[0, :, 0, 0].tolist() == [1, 2, 3]


# ----------------------------------------------------------------------------- splits


def _synthetic(**kw) -> SyntheticDataModule:
    args = dict(num_classes=10, train_size=1000, test_size=200, image_size=8)
    args.update(kw)
    dm = SyntheticDataModule(**args)
    dm.setup()
    return dm


def test_val_split_and_subset():
    dm = _synthetic(val_split=0.2, seed=0)
    tr, va = dm.train_dataset, dm.val_dataset
    assert len(tr) == 800 and len(va) == 200 and dm.train_size == 800
    assert np.bincount(va.labels).tolist() == [20] * 10 and np.bincount(tr.labels).tolist() == [80] * 10
    s_tr, s_va = set(tr.source_index.tolist()), set(va.source_index.tolist())
    assert not s_tr & s_va and s_tr | s_va == set(range(1000))
    # the held-out split is independent of the run seed but follows split_seed
    assert torch.equal(_synthetic(val_split=0.2, seed=123).val_dataset.source_index, va.source_index)
    assert not torch.equal(_synthetic(val_split=0.2, split_seed=1).val_dataset.source_index, va.source_index)
    # samples are the original ones
    full = _synthetic()
    assert torch.equal(va.x, full.train_dataset.x[va.source_index])
    # counts, subset then held-out
    dm = _synthetic(subset=300, val_split=50, test_subset=0.5)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (250, 50, 100)
    assert np.bincount(dm.val_dataset.labels).tolist() == [5] * 10
    assert np.bincount(dm.test_dataset.labels).tolist() == [10] * 10
    assert not set(dm.train_dataset.source_index.tolist()) & set(dm.val_dataset.source_index.tolist())
    # uneven quotas still sum exactly and stay within one of proportional
    dm = _synthetic(subset=0.333)
    counts = np.bincount(dm.train_dataset.labels)
    assert counts.sum() == 333 and counts.max() - counts.min() <= 1
    # loaders: val_dataloader is [held_out, test] only with a held-out split
    assert isinstance(_synthetic(val_split=0.1).val_dataloader(), list)
    assert not isinstance(full.val_dataloader(), list)
    with pytest.raises(ValueError):
        _synthetic(val_split=1.0)


def test_batches_and_transform():
    dm = _synthetic(batch_size=32, image_size=32, seed=3)
    assert dm.eval_batch_size == 64
    loader = dm.train_dataloader()
    assert len(loader) == 32
    batches = list(loader)
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(1000))
    x, y, idx = batches[0]
    assert torch.equal(x, dm.train_dataset.x[idx]) and torch.equal(y, dm.train_dataset.y[idx])
    out0, _, _ = dm.transform_batch((x, y, idx), train=True, epoch=0)
    again, _, _ = dm.transform_batch((x, y, idx), train=True, epoch=0)
    out1, _, _ = dm.transform_batch((x, y, idx), train=True, epoch=1)
    plain, _, _ = dm.transform_batch((x, y, idx), train=False)
    assert torch.equal(out0, again) and not torch.equal(out0, out1) and not torch.equal(out0, plain)
    assert torch.equal(plain, normalize(x, dm.mean, dm.std))
    dm.augment = False
    assert torch.equal(dm.transform_batch((x, y, idx), train=True, epoch=0)[0], plain)
    # without a trainer, the hook only normalises
    assert torch.equal(dm.on_after_batch_transfer((x, y, idx), 0)[0], plain)
    json.dumps(dm.describe())


# ----------------------------------------------------------------------------- Lightning


def _fit_and_record(tmp_path: Path, tag: str, max_epochs: int = 2, ckpt_path: str | None = None,
                    callbacks: list | None = None, **dm_kw):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3 * 32 * 32, 4)
            self.train_seen, self.val_seen = [], []

        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            self.train_seen.append((self.current_epoch, x.clone(), y.clone(), idx.clone()))
            return F.cross_entropy(self.lin(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            self.val_seen.append((self.current_epoch, dataloader_idx, batch[0].clone(), batch[2].clone()))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = SyntheticDataModule(num_classes=4, train_size=48, test_size=16, batch_size=16, seed=11, **dm_kw)
    model = Probe()
    trainer = L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=bool(callbacks),
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        num_sanity_val_steps=0, default_root_dir=str(tmp_path / tag),
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return dm, model


def test_lightning_fit_batches(tmp_path):
    dm, model = _fit_and_record(tmp_path, "a", val_split=0.25)
    _, model2 = _fit_and_record(tmp_path, "b", val_split=0.25)
    seen = model.train_seen
    assert len(seen) == 2 * 3 and {e for e, *_ in seen} == {0, 1}  # 36 train samples / 16 -> 3 batches
    for epoch, x, y, idx in seen:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and x.shape[0] in (16, 4)
        raw = dm.train_dataset.x[idx]
        expected = dm.transform_batch((raw, y, idx), train=True, epoch=epoch)[0]
        assert torch.equal(x, expected)
    # identical runs see identical batches
    assert len(model2.train_seen) == len(seen)
    for a, b in zip(seen, model2.train_seen):
        assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])

    # epoch 0 and epoch 1 augment the same samples differently (and order differs)
    def by_sample(epoch):
        rows = [(i, x[k]) for e, x, _, idx in seen if e == epoch for k, i in enumerate(idx.tolist())]
        return torch.stack([x for _, x in sorted(rows, key=lambda r: r[0])])

    assert not torch.equal(by_sample(0), by_sample(1))
    assert not torch.equal(torch.cat([s[3] for s in seen if s[0] == 0]), torch.cat([s[3] for s in seen if s[0] == 1]))
    # validation: two loaders (held-out, test), normalised but not augmented
    assert {d for _, d, _, _ in model.val_seen} == {0, 1}
    for _, d, x, idx in model.val_seen:
        ds = dm.val_dataset if d == 0 else dm.test_dataset
        assert torch.equal(x, normalize(ds.x[idx], dm.mean, dm.std))


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_lightning_resume_and_workers(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _, full = _fit_and_record(tmp_path, "full", max_epochs=3, callbacks=[ckpt])
    _, resumed = _fit_and_record(tmp_path, "resumed", max_epochs=3, ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    tail = [s for s in full.train_seen if s[0] >= 1]
    assert len(tail) == len(resumed.train_seen) == 6
    for a, b in zip(tail, resumed.train_seen):
        assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])
    _, workers = _fit_and_record(tmp_path, "workers", max_epochs=3, num_workers=2)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(full.train_seen, workers.train_seen))


# ----------------------------------------------------------------------------- image folders, paths


def _tiny_imagenet(root: Path, classes=("n01", "n02"), per_class=4, size=16):
    rng = np.random.default_rng(0)
    lines = []
    for c in classes:
        d = root / "train" / c / "images"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{c}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    for k, c in enumerate(classes * 2):
        name = f"val_{k}.JPEG"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "val" / "images" / name)
        lines.append(f"{name}\t{c}\t0\t0\t{size}\t{size}")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tsalamander\n")


def test_imagefolder_tiny_layout(tmp_path):
    _tiny_imagenet(tmp_path)
    dm = ImageFolderDataModule(root=str(tmp_path), name="tiny", image_size=16, batch_size=4, num_workers=0, seed=1)
    assert dm.num_classes == 2 and dm.class_names == ["goldfish", "salamander"] and dm.pad == 2
    dm.setup()
    assert dm.train_size == 8 and len(dm.test_dataset) == 4
    assert dm.test_dataset.labels.tolist() == [0, 1, 0, 1]
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    e0 = list(loader)
    e0_again = list(loader)
    loader.sampler.set_epoch(1)
    e1 = list(loader)
    x, y, idx = e0[0]
    assert x.dtype == torch.float32 and x.shape == (4, 3, 16, 16) and y.dtype == torch.int64
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e0, e0_again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(e0, e1))
    assert dm.on_after_batch_transfer((x, y, idx), 0)[0] is x  # float batches are left alone
    tx, ty, tidx = next(iter(dm.test_dataloader()))
    assert tx.shape == (4, 3, 16, 16) and ty.tolist() == [0, 1, 0, 1]
    with pytest.raises(FileNotFoundError, match="data.root"):
        ImageFolderDataModule(root=str(tmp_path / "nope")).setup()


def test_default_data_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_data_root() == str(tmp_path / "data")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    assert default_data_root() == str(tmp_path / "shared" / "data")
