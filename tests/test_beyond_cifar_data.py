"""Beyond CIFAR: Tiny-ImageNet, STL-10 and ImageNet datamodules on tiny generated copies of their real layouts,
data.decode=gpu's selection and its device pipeline (run on the CPU), the loader sizing, MobileNetV1, and every
new recipe composing and validating."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from conftest import compose_cfg
from kdx.config import validate
from kdx.data import device_decode as dd
from kdx.data.augment import hash_uniform32, normalize
from kdx.data.imagefolder import ImageFolderDataModule, default_num_workers
from kdx.data.stl10 import STL10DataModule
from kdx.data.tiny_imagenet import TinyImageNetDataModule
from kdx.errors import ConfigError

WNIDS = ("n01443537", "n01629819", "n01641577")
WORDS = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander",
         "n01641577": "bullfrog, Rana catesbeiana"}


def _image(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    base = rng.uniform(40, 215, (1, 1, 3))
    yy, xx = np.mgrid[0:h, 0:w]
    wave = 30 * np.sin(xx[..., None] / 7.0 + rng.uniform(0, 6, 3)) + 30 * np.cos(yy[..., None] / 9.0)
    return Image.fromarray(np.clip(base + wave, 0, 255).astype(np.uint8))


def make_tiny_imagenet(root: Path, per_class: int = 4, val_per_class: int = 2, size: int = 16) -> Path:
    """The archive's layout: wnids.txt, words.txt, train/<wnid>/images/<wnid>_<i>.JPEG, val/images +
    val/val_annotations.txt; one greyscale training image, as the real archive has."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(reversed(WNIDS)) + "\n")  # unsorted on disk, as the archive
    (root / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in WORDS.items()) + "n00001740\tentity\n")
    for w in WNIDS:
        folder = root / "train" / w / "images"
        folder.mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(per_class):
            img = _image(rng, size, size)
            (img.convert("L") if (w, i) == (WNIDS[1], 0) else img).save(folder / f"{w}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for k in range(val_per_class * len(WNIDS)):
        name = f"val_{k}.JPEG"
        _image(rng, size, size).save(root / "val" / "images" / name)
        lines.append(f"{name}\t{WNIDS[(k * 2) % len(WNIDS)]}\t0\t0\t{size - 1}\t{size - 1}")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_imagenet_raw_layout(tmp_path):
    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    dm = TinyImageNetDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), batch_size=4, seed=3)
    assert dm.num_classes == 3 and dm.image_shape == (3, 16, 16)  # from wnids.txt and one header, before decoding
    assert dm.class_names == ["goldfish", "European fire salamander", "bullfrog"]  # sorted wnids, first synonym
    dm.setup()
    assert dm.train_size == 12 and len(dm.test_dataset) == 6
    assert dm.train_dataset.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert dm.test_dataset.labels.tolist() == [0, 2, 1, 0, 2, 1]  # val_0..val_5 by file name, from the annotations
    first = np.asarray(Image.open(root / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_0.JPEG").convert("RGB"))
    assert torch.equal(dm.train_dataset.x[0], torch.from_numpy(first.transpose(2, 0, 1).copy()))
    grey = dm.train_dataset.x[4]  # the greyscale file, replicated to RGB
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    batch = next(iter(dm.train_dataloader()))
    x, y, idx = dm.transform_batch(batch, train=False)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x, normalize(batch[0], (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)))
    aug = [dm.transform_batch(batch, train=True, epoch=e)[0] for e in (0, 0, 1)]
    assert torch.equal(aug[0], aug[1]) and not torch.equal(aug[0], aug[2]) and aug[0].shape == x.shape
    again = TinyImageNetDataModule(root=str(root), cache_dir=str(tmp_path / "cache"))
    again.setup()  # the second run maps the decoded cache
    assert again.source.startswith("tiny-imagenet-cache:") and torch.equal(again.train_dataset.x, dm.train_dataset.x)


def test_tiny_imagenet_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Tiny-ImageNet.*data\.root=.*tiny-imagenet-200\.zip"):
        TinyImageNetDataModule(root=str(tmp_path / "nope")).setup()
    root = make_tiny_imagenet(tmp_path / "t", per_class=1, val_per_class=1)
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val_annotations.txt"):
        TinyImageNetDataModule(root=str(root), cache_dir=str(tmp_path / "cache")).setup()


def make_stl10(root: Path, n_train: int = 6, n_test: int = 4) -> tuple[np.ndarray, ...]:
    """stl10_binary/ as torchvision leaves it: each image's 3×96×96 bytes column-major, labels 1..10."""
    rng = np.random.default_rng(1)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8)
        x.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        y.tofile(folder / f"{split}_y.bin")
        out += [x, y]
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return tuple(out)


def test_stl10_binary_files(tmp_path):
    train_x, train_y, test_x, test_y = make_stl10(tmp_path)
    dm = STL10DataModule(root=str(tmp_path), download=False, batch_size=3, pad=12)
    assert dm.num_classes == 10 and dm.image_shape == (3, 96, 96)
    dm.setup()
    assert dm.class_names[:3] == ["airplane", "bird", "car"]
    assert torch.equal(dm.train_dataset.x, torch.from_numpy(train_x))
    assert torch.equal(dm.test_dataset.x, torch.from_numpy(test_x))
    assert dm.train_dataset.labels.tolist() == (train_y.astype(int) - 1).tolist()
    pixels = train_x.astype(np.float64) / 255  # null mean/std: the training split's own statistics
    assert np.allclose(dm.mean, pixels.mean(axis=(0, 2, 3)), atol=1e-4)
    assert np.allclose(dm.std, pixels.std(axis=(0, 2, 3)), atol=1e-4)
    batch = next(iter(dm.train_dataloader()))
    x, y, idx = dm.transform_batch(batch, train=True, epoch=0)
    assert x.shape == (3, 3, 96, 96) and y.dtype == torch.int64


def test_stl10_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"STL-10.*data\.root=.*download is disabled"):
        STL10DataModule(root=str(tmp_path), download=False).setup()


def make_imagenet(root: Path, per_class: int = 3, sizes=((90, 120), (120, 96), (100, 100))) -> Path:
    """The standard folder layout: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG, LOC_synset_mapping.txt."""
    rng = np.random.default_rng(2)
    for split, n in (("train", per_class), ("val", 2)):
        for w in WNIDS[:2]:
            (root / split / w).mkdir(parents=True)
            for i in range(n):
                h, wd = sizes[i % len(sizes)]
                _image(rng, h, wd).save(root / split / w / f"{w}_{i}.JPEG", quality=95)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {WORDS[w]}\n" for w in WNIDS[:2]))
    return root


def _imagenet_dm(root: Path, **kw) -> ImageFolderDataModule:
    args = dict(root=str(root), name="imagenet", image_size=224, batch_size=4, num_workers=0, seed=5)
    return ImageFolderDataModule(**{**args, **kw})


def test_imagenet_folder_transforms(tmp_path):
    root = make_imagenet(tmp_path / "imagenet")
    dm = _imagenet_dm(root)
    assert dm.class_names == ["goldfish", "European fire salamander"] and dm.num_classes == 2
    dm.setup()
    assert dm.train_size == 6 and len(dm.test_dataset) == 4
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    # evaluation: Resize(256) + CenterCrop(224), exactly torchvision's on the PIL image
    tx, ty, _ = next(iter(dm.test_dataloader()))
    ref = T.Compose([T.Resize(256), T.CenterCrop(224)] + norm)
    for k in range(4):
        assert torch.equal(tx[k], ref(Image.open(dm.test_dataset.samples[k][0]).convert("RGB")))
    # training: RandomResizedCrop(224) + flip, drawn from torch's RNG seeded with hash(seed, epoch, idx)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    x, y, idx = next(iter(loader))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    train_ref = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip()] + norm)
    for k, (i, s) in enumerate(zip(idx.tolist(), hash_uniform32(5, 2, idx, stream=3).tolist())):
        torch.manual_seed(s)
        assert torch.equal(x[k], train_ref(Image.open(dm.train_dataset.samples[i][0]).convert("RGB")))


def test_imagenet_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"imagenet.*not found.*data\.root=.*train/<class>"):
        _imagenet_dm(tmp_path / "nope").setup()


def test_gpu_decode_needs_a_gpu(tmp_path, monkeypatch):
    root = make_imagenet(tmp_path / "imagenet")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="data.decode=gpu.*data.decode=cpu"):
        _imagenet_dm(root, decode="gpu")
    with pytest.raises(ConfigError, match="data.decode='jpeg'"):
        _imagenet_dm(root, decode="jpeg")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    with pytest.raises(ConfigError, match="data.image_size=64"):
        _imagenet_dm(root, decode="gpu", image_size=64)
    dm = _imagenet_dm(root, decode="gpu")
    dm.setup()
    loader = dm.train_dataloader()
    assert not loader.pin_memory  # the decoder reads the bytes from host memory
    data, y, idx = next(iter(loader))
    assert isinstance(data, dd.EncodedImages) and len(data) == 4 and data.to("cuda") is data
    assert bytes(data.data[0].numpy()) == Path(dm.train_dataset.samples[int(idx[0])][0]).read_bytes()


def test_device_pipeline_matches_the_cpu_pipeline(tmp_path, monkeypatch):
    """The decode=gpu pipeline, run on the CPU (decode_jpeg(device='cpu')): the same crops and flips as the CPU
    pipeline; on the CPU the pixels agree to a level of 255 (here they are equal: libjpeg-turbo both, and
    torchvision's antialiased bilinear on uint8 follows PIL's filter), while another epoch's crops are far off."""
    root = make_imagenet(tmp_path / "imagenet")
    cpu = _imagenet_dm(root)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = _imagenet_dm(root, decode="gpu")
    monkeypatch.undo()
    cpu.setup(), gpu.setup()
    for split, train in (("test", False), ("train", True)):
        lc = getattr(cpu, f"{split}_dataloader")()
        lg = getattr(gpu, f"{split}_dataloader")()
        lc.sampler.set_epoch(1), lg.sampler.set_epoch(1)
        ref, enc = next(iter(lc)), next(iter(lg))
        assert torch.equal(ref[2], enc[2])
        levels = torch.tensor(gpu.std).view(1, 3, 1, 1) * 255
        x = gpu.transform_batch(enc, train=train, epoch=1)[0]
        assert x.shape == ref[0].shape == (4, 3, 224, 224)
        assert ((x - ref[0]).abs() * levels).max() < 1.01, split
        if train:
            assert ((gpu.transform_batch(enc, train=True, epoch=2)[0] - ref[0]).abs() * levels).mean() > 5
    images = dd.decode_batch(enc[0].data, "cpu")
    seeds = hash_uniform32(5, 1, enc[2], stream=3).tolist()
    flips = [p[4] for p in dd.train_params(images, seeds)]
    mirrored = [p[:4] + (not p[4],) for p in dd.train_params(images, seeds)]
    other = dd.train_views(images, mirrored, 224)
    same = dd.train_views(images, dd.train_params(images, seeds), 224)
    assert all(torch.equal(a.flip(-1), b) for a, b in zip(other, same)) and len(flips) == 4


def test_loader_workers_follow_the_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert [default_num_workers(p) for p in (1, 2, 8, 16, 32)] == [15, 7, 1, 0, 0]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(256)))
    assert default_num_workers(1) == 32 and default_num_workers(8) == 31
    root = make_imagenet(tmp_path / "imagenet", per_class=1)
    assert _imagenet_dm(root, num_workers=None).loader_workers() == 32
    assert _imagenet_dm(root, num_workers=3).loader_workers() == 3


def test_mobilenet_v1_matches_mdistiller():
    from kdx.features import TapSets
    from kdx.models import create_model

    m = create_model("MobileNetV1", 1000)
    # megvii-research/mdistiller a08d46f, mdistiller/models/imagenet/mobilenetv1.py::MobileNetV1(): 4,231,976
    # parameters and 164 state-dict entries (counted with that module, torch 2.14.1)
    assert sum(p.numel() for p in m.parameters()) == 4_231_976 and len(m.state_dict()) == 164
    assert list(m.state_dict())[:3] == ["model.0.0.weight", "model.0.1.weight", "model.0.1.bias"]
    taps = TapSets(m, m.tap_sets)
    with torch.no_grad(), taps.capture() as f:
        out = m.eval()(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    assert [tuple(t.shape[1:]) for t in f["feats"]] == [(128, 56, 56), (256, 28, 28), (512, 14, 14), (1024, 7, 7)]
    assert all(torch.equal(a.clamp_min(0), b) for a, b in zip(f["preact_feats"], f["feats"]))
    assert f["pooled_feat"][0].shape == (1, 1024)


# ----------------------------------------------------------------------------------------------- recipes
RECIPES = ["imagenet/dkd/res34_res18", "imagenet/dkd/res50_mv1", "tiny_imagenet/nayer/res34_res18",
           "tiny_imagenet/reffakd/resnet18", "tiny_imagenet/topkd/res18_shuv2", "stl10/topkd/res18_shuv2",
           "fashion_mnist/reffakd/lenet5"]
QUIET = ["trainer.accelerator=cpu", "trainer.enable_model_summary=false", "logger=none", "progress_bar=none"]


@pytest.mark.parametrize("experiment", RECIPES)
def test_recipe_composes_and_validates(tmp_path, experiment):
    cfg = compose_cfg([f"experiment={experiment}"], tmp_path)
    validate(cfg)
    assert "paper" in cfg and cfg.trainer.max_epochs > 0


def test_imagenet_recipes_hold_mdistillers_settings(tmp_path):
    from kdx.config import resolved

    r34 = resolved(compose_cfg(["experiment=imagenet/dkd/res34_res18"], tmp_path))
    assert (r34.model.name, r34.teacher.model.name, r34.data.name, r34.trainer.max_epochs) == \
        ("tv_resnet18", "tv_resnet34", "imagenet", 100)
    assert (r34.distill.beta, r34.distill.temperature, r34.distill.warmup, r34.distill.alpha) == (0.5, 1.0, 1, 1.0)
    assert list(r34.scheduler.milestones) == [30, 60, 90] and r34.optim.weight_decay == 1e-4
    assert r34.optim.lr == pytest.approx(0.2) and r34.data.batch_size == 512 and not r34.teacher.auto_train
    mv1 = resolved(compose_cfg(["experiment=imagenet/dkd/res50_mv1", "distill=kd"], tmp_path))
    assert (mv1.model.name, mv1.distill.temperature, mv1.distill.w_ce, mv1.distill.w_kd) == ("MobileNetV1", 1, 0.5, 0.5)
    assert mv1.paper.dkd == 72.05 and mv1.paper.topkd == 73.51
    # the linear rule: 0.1 per 256 images of the global batch (per-process batch × devices × nodes)
    for extra, lr in ((["data.batch_size=64", "trainer=ddp", "trainer.devices=8"], 0.2),
                      (["data.batch_size=64", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=4"], 0.8),
                      (["data.batch_size=256"], 0.1)):
        cfg = resolved(compose_cfg(["experiment=imagenet/dkd/res34_res18", *extra], tmp_path))
        assert cfg.optim.lr == pytest.approx(lr), extra


def test_imagenet_recipe_end_to_end_on_a_tiny_folder(tmp_path):
    """experiment=imagenet/dkd/res34_res18 on a 2-class JPEG folder: torchvision's ResNet34 weights file as the
    teacher (teacher.ckpt), torchvision's ResNet18 student, DKD with the recipe's settings, one epoch."""
    import torchvision

    from kdx.run import run

    root = make_imagenet(tmp_path / "imagenet")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet34(num_classes=2).state_dict(), tmp_path / "resnet34-test.pth")
    cfg = compose_cfg(["experiment=imagenet/dkd/res34_res18", f"data.root={root}", "data.image_size=40",
                       "data.batch_size=3", "data.num_workers=0", "trainer.max_epochs=1",
                       "trainer.limit_train_batches=1",
                       f"teacher.ckpt={tmp_path / 'resnet34-test.pth'}", *QUIET], tmp_path)
    res = run(cfg)
    assert res["status"] == "complete" and res["student"] == "tv_resnet18" and res["teacher"] == "tv_resnet34"
    assert res["config"]["optim"]["lr"] == pytest.approx(0.1 * 3 / 256)


def test_tiny_imagenet_recipe_end_to_end(tmp_path):
    """experiment=tiny_imagenet/topkd/res18_shuv2 on a 3-class copy of the archive (8-px images): TopKD distils
    ShuffleV2 from a ResNet18 (its weights file as teacher.ckpt) for one epoch."""
    from kdx.models import create_model
    from kdx.run import run

    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200", size=8)
    torch.manual_seed(0)
    torch.save(create_model("ResNet18", 3).state_dict(), tmp_path / "resnet18.pt")
    cfg = compose_cfg(["experiment=tiny_imagenet/topkd/res18_shuv2", f"data.root={root}",
                       f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=6", "trainer.max_epochs=1",
                       "distill.k=2", f"teacher.ckpt={tmp_path / 'resnet18.pt'}", *QUIET], tmp_path)
    res = run(cfg)
    assert res["status"] == "complete" and res["method"] == "topkd" and res["data"]["num_classes"] == 3
    assert (res["student"], res["teacher"]) == ("ShuffleV2", "ResNet18")


def test_fashion_mnist_recipe_is_the_notebooks_lenet5(tmp_path):
    from hydra.utils import instantiate

    from kdx.data.fashion_mnist import to_32

    cfg = compose_cfg(["experiment=fashion_mnist/reffakd/lenet5"], tmp_path)
    net = instantiate(cfg.model, num_classes=10)
    # LeNet5 of ReffAKD's fashion_mnist/tinySLG_distillation.ipynb, counted by hand: conv 1→6 (5×5) 156, BN 12,
    # conv 6→16 2,416, BN 32, fc 400→120 48,120, 120→84 10,164, 84→10 850
    assert sum(p.numel() for p in net.parameters()) == 156 + 12 + 2416 + 32 + 48120 + 10164 + 850
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    assert (cfg.data.channels, cfg.data.resize, cfg.data.pad, cfg.distill.soft_loss) == (1, True, 0, "kldiv_mean")
    x = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    grey = to_32(x, channels=1, resize=True)
    assert grey.shape == (3, 1, 32, 32)
    assert np.array_equal(grey[1, 0], np.asarray(T.Resize((32, 32))(Image.fromarray(x[1]))))  # the notebook's resize
    padded = to_32(x, channels=3, resize=False)
    assert padded.shape == (3, 3, 32, 32) and padded[:, :, :2].max() == 0
    assert np.array_equal(padded[:, 2, 2:30, 2:30], x)


def test_reffakd_kldiv_mean_is_the_notebooks_kldivloss():
    """soft_loss=kldiv_mean, KLDivLoss's mean over B·C, is (softCE − T²·mean_b H(q_b)) / C: the CIFAR form's
    gradient / C."""
    from kdx.distill.losses import reffakd_terms

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(4, 7, generator=g, dtype=torch.float64), dim=1)
    y, T_ = torch.tensor([0, 3, 6, 2]), 3.0
    kl, hard = reffakd_terms(z, y, q, 1.0, T_, soft_loss="kldiv_mean")
    ce, hard_ce = reffakd_terms(z, y, q, 1.0, T_)
    entropy = -(q * q.log()).sum(dim=1).mean()
    assert torch.allclose(kl * 7, ce - T_**2 * entropy) and torch.equal(hard, hard_ce)
    (gk,) = torch.autograd.grad(kl, z)
    (gc,) = torch.autograd.grad(reffakd_terms(z, y, q, 1.0, T_)[0], z)
    assert torch.allclose(gk * 7, gc)
    with pytest.raises(ValueError, match="distill.soft_loss"):
        reffakd_terms(z, y, q, 1.0, T_, soft_loss="kl")
