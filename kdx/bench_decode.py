"""ImageNet-style data throughput: ``python -m kdx.bench_decode`` prints img/s of each decoding path.

For each ``--decode`` (``cpu``: PIL in ``--workers`` loader workers; ``gpu``: the workers read bytes, nvJPEG decodes
and the crops run on the GPU) it times ``--steps`` training batches of ``--batch`` images after ``--warmup`` ones,
through the datamodule of ``data=imagenet`` (:class:`kdx.data.imagefolder.ImageFolderDataModule`, RandomResizedCrop
224 + flip, normalised, on the device). ``--kd`` also times the same batches through a full KD step, torchvision's
ResNet34 teacher (forward, no grad) and ResNet18 student (forward, backward, SGD step), bf16 autocast on a GPU.

``--root`` is an ImageNet-layout folder (``train/<wnid>/*.JPEG``, ``val/...``); without it a folder of
``--images`` random-textured JPEGs of ImageNet's typical 500×375 is generated in a temporary folder. Nothing here
asserts a speed: the numbers go in a table (and one JSON line per row).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from kdx.data.imagefolder import ImageFolderDataModule, default_num_workers


def make_folder(root: Path, images: int, classes: int = 10, size: tuple[int, int] = (375, 500)) -> Path:
    """``images`` JPEGs (quality 90, smooth noise) in ``classes`` class folders under train/ and val/."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", images), ("val", max(classes, images // 10))):
        for i in range(n):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize(size[::-1], Image.BILINEAR).save(folder / f"{i}.JPEG", quality=90)
    return root


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_path(root: Path, decode: str, batch: int, workers: int, warmup: int, steps: int, device: torch.device,
              kd: bool) -> dict[str, Any]:
    dm = ImageFolderDataModule(root=str(root), name="imagenet", image_size=224, batch_size=batch,
                               num_workers=workers, decode=decode, drop_last=True)
    dm.setup()
    step = _kd_step(device) if kd else None
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    it, done, t0 = iter(loader), 0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        try:
            x, y, idx = next(it)
        except StopIteration:
            raise SystemExit(f"--root has too few images for {warmup + steps} batches of {batch}") from None
        x, y, idx = dm.transform_batch((x.to(device), y.to(device), idx.to(device)), train=True, epoch=0)
        if step is not None:
            step(x, y)
        done += len(y) if i >= warmup else 0
    _sync(device)
    secs = time.perf_counter() - t0
    return {"decode": decode, "workers": workers, "batch": batch, "kd_step": kd, "device": str(device),
            "img_per_s": round(done / secs, 1), "ms_per_batch": round(1000 * secs / steps, 1)}


def _kd_step(device: torch.device):
    import torchvision

    teacher = torchvision.models.resnet34().to(device).eval().requires_grad_(False)
    student = torchvision.models.resnet18().to(device).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast:
            with torch.no_grad():
                t = teacher(x).float()
            s = student(x).float()
            loss = torch.nn.functional.cross_entropy(s, y) + torch.nn.functional.kl_div(
                s.log_softmax(1), t.log_softmax(1), reduction="batchmean", log_target=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdx.bench_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="an ImageNet-layout folder (default: a generated one)")
    p.add_argument("--images", type=int, default=768, help="images of the generated folder")
    p.add_argument("--decode", default="cpu,gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", default=None, help="comma list of loader worker counts (default: the machine's)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--kd", action="store_true", help="also time a ResNet34 → ResNet18 KD step per batch")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = [int(w) for w in a.workers.split(",")] if a.workers else [default_num_workers(1)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.root) if a.root else make_folder(Path(tmp) / "imagenet", a.images)
        rows = []
        for decode in a.decode.split(","):
            for w in workers:
                for kd in ([False, True] if a.kd else [False]):
                    rows.append(time_path(root, decode, a.batch, w, a.warmup, a.steps, device, kd))
                    print(json.dumps({"bench": "decode", **rows[-1]}), flush=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\n{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{cpus} CPUs'})")
    print("| decode | workers | batch | KD step | img/s | ms/batch |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['decode']} | {r['workers']} | {r['batch']} | {'yes' if r['kd_step'] else 'no'} | "
              f"{r['img_per_s']} | {r['ms_per_batch']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
