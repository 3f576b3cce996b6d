"""GPU check: ``python -m kdx.gpu_check`` (``make gpu-check``), about 10 minutes on one CUDA GPU.

It prints, in this order:

1. the device (name, memory, compute capability, torch and CUDA versions);
2. a throughput table for KD, DKD, TopKD and AFD on resnet32x4 → resnet8x4 (100 classes) at batch 64 (the
   papers') and at a large batch, for fp32, ``perf=fast`` (bf16 + channels-last) and ``perf=fast
   perf.compile=true``, each with ``data.on_device`` on and off. Per row: kdx's training throughput (img/s, the real
   Lightning path of :mod:`kdx.bench` on in-memory data of CIFAR's shape), the epoch time it means for CIFAR-100's
   50,000 training images, the same step with no data loading (the model alone, :func:`kdx.bench.bare_loop`), the
   data path alone (loader + transfer + on-device augmentation, no model) and which of the two bounds the epoch;
3. a short real CIFAR-100 run: a resnet32x4 teacher trained for a few epochs, then the resnet8x4 KD student for a
   few epochs (``perf=fast data.on_device=true``), with their test accuracies and times.

Cases run in priority order under a time budget (``--budget-s``): the fp32/fast grid first, then the real run's
reserve is kept, then the compiled cases while time remains; a case left out is listed as skipped. On a machine
without a CUDA GPU it prints why and exits with status 0. Nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

METHODS = ("kd", "dkd", "topkd", "afd")
PAIR = "res32x4_res8x4"
MODES = {"fp32": ("fp32", ()), "fast": ("fast", ()), "compile": ("fast", ("perf.compile=true",))}
CIFAR100_TRAIN = 50_000


def no_gpu_message() -> Optional[str]:
    """Why this machine cannot run the check (None: it can)."""
    if torch.cuda.is_available():
        return None
    built = torch.version.cuda or "no CUDA (a CPU-only build)"
    return (f"kdx gpu-check: no CUDA GPU is visible here (torch {torch.__version__}, built with {built}); nothing "
            "to measure. Run `make gpu-check` on a machine with an NVIDIA GPU and a CUDA build of torch.")


def device_line() -> str:
    p = torch.cuda.get_device_properties(0)
    return (f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
            f"{torch.cuda.device_count()} visible; torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}")


class Clock:
    """The check's time budget."""

    def __init__(self, budget_s: float) -> None:
        self.t0, self.budget_s = time.perf_counter(), float(budget_s)

    @property
    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)


# ------------------------------------------------------------------------------------------------ measurements


def data_rate(batch: int, on_device: bool, steps: int, workdir: Path, accelerator: str = "gpu") -> float:
    """Images/s of the data path alone: the training loader (uint8 split in memory, or on the GPU), the copy to the
    GPU and the on-device crop/flip + normalisation, through a Trainer-attached datamodule as in training."""
    import lightning.pytorch as pl

    from kdx.bench import _sync, compose
    from kdx.build import instantiate_data

    cfg = compose(["data=synthetic", "data.num_classes=100", f"data.train_size={batch * (steps + 2)}",
                   f"data.batch_size={batch}", "data.drop_last=true", f"data.on_device={str(on_device).lower()}"],
                  workdir)
    dm = instantiate_data(cfg.data)
    dm.trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False)
    device = dm.trainer.strategy.root_device
    n, t0 = 0, 0.0
    for i, b in enumerate(dm.train_dataloader()):
        x, _, _ = dm.transform_batch(tuple(t.to(device, non_blocking=True) for t in b[:3]), train=True, epoch=0)
        if i == 1:  # the first batch pays the start-up (the copy of the split with on_device)
            _sync(device)
            t0 = time.perf_counter()
        elif i > 1:
            n += x.shape[0]
    _sync(device)
    return n / (time.perf_counter() - t0)


def speed_case(method: str, batch: int, mode: str, on_device: bool, warmup: int, steps: int,
               workdir: Path) -> dict[str, Any]:
    """kdx's training throughput and the model-only throughput of one case (kdx.bench's two paths)."""
    from kdx.bench import bare_loop, build_job, kdx_path

    precision, extra = MODES[mode]
    extra = (*extra, f"data.on_device={str(on_device).lower()}")
    t = time.perf_counter()
    _, job = build_job(method, PAIR, precision, batch, warmup + steps, workdir, num_classes=100, extra=extra)
    kdx_ips, mem = kdx_path(job, warmup, steps)
    bare_ips, _ = bare_loop(job, warmup, steps)
    return {"method": method, "batch": batch, "mode": mode, "on_device": on_device, "kdx_img_s": kdx_ips,
            "model_img_s": bare_ips, "epoch_s": CIFAR100_TRAIN / kdx_ips, "peak_mb": mem,
            "case_s": time.perf_counter() - t}


def bound(row: dict[str, Any], data_ips: Optional[float]) -> str:
    """What limits the epoch: the slower of the data path alone and the model alone (and how close kdx gets)."""
    if data_ips is None:
        return "?"
    which = "data path" if data_ips < row["model_img_s"] else "model"
    return f"{which} ({row['kdx_img_s'] / min(data_ips, row['model_img_s']):.2f} of it)"


def table(rows: list[dict[str, Any]], data: dict[tuple[int, bool], float]) -> str:
    head = ["method", "batch", "mode", "on_device", "kdx img/s", "epoch s (50k)", "model-only img/s",
            "data-only img/s", "bounded by (kdx / that bound)", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['method']} | {r['batch']} | {r['mode']} | {r['on_device']} | skipped: {r['skipped']} "
                         "| | | | | |")
            continue
        d = data.get((r["batch"], r["on_device"]))
        lines.append(f"| {r['method']} | {r['batch']} | {r['mode']} | {'on' if r['on_device'] else 'off'} | "
                     f"{r['kdx_img_s']:.0f} | {r['epoch_s']:.1f} | {r['model_img_s']:.0f} | "
                     f"{'–' if d is None else f'{d:.0f}'} | {bound(r, d)} | {r['peak_mb']:.0f} |")
    return "\n".join(lines)


def real_run_overrides(data_dir: Optional[str], teacher_epochs: int, epochs: int, batch: int,
                       workdir: Path) -> list[str]:
    """The real run's command line: resnet32x4 teacher trained here → resnet8x4 KD student, on real CIFAR-100."""
    return [
        "data=cifar100", f"data.batch_size={batch}", "data.on_device=true", "model=resnet8x4",
        "teacher_arch=resnet32x4", "distill=kd", "perf=fast", "scheduler=cosine", f"trainer.max_epochs={epochs}",
        f"teacher.train.max_epochs={teacher_epochs}", "trainer.accelerator=gpu", "trainer.devices=1",
        "logger=csv", "progress_bar=none", "register_teacher=false", f"paths.cache_dir={workdir / 'cache'}",
    ] + ([f"paths.data_dir={data_dir}"] if data_dir else [])


def real_run(data_dir: Optional[str], teacher_epochs: int, epochs: int, batch: int, workdir: Path) -> dict[str, Any]:
    """resnet32x4 teacher (trained here, ``teacher_epochs``) → resnet8x4 KD student (``epochs``) on real CIFAR-100."""
    from kdx.bench import compose
    from kdx.run import run

    t = time.perf_counter()
    res = run(compose(real_run_overrides(data_dir, teacher_epochs, epochs, batch, workdir), workdir))
    return {"teacher_acc1": res.get("teacher_acc1"), "test_acc1_last": res.get("test_acc1_last"),
            "test_acc1_best": res.get("test_acc1_best"), "epochs": epochs, "teacher_epochs": teacher_epochs,
            "batch": batch, "wall_s": time.perf_counter() - t, "source": (res.get("data") or {}).get("source")}


def cifar100_present(data_dir: Optional[str]) -> Optional[str]:
    """Where CIFAR-100 would be read from, or None when neither the array copy nor torchvision's files exist."""
    from kdx.paths import default_data_root

    root = Path(data_dir or default_data_root())
    for p in (root / "cifar100" / "cifar100.npz", root / "cifar-100-python" / "train"):
        if p.exists():
            return str(p)
    return None


# ------------------------------------------------------------------------------------------------ the check


def plan(large: int) -> list[tuple[str, int, str, bool]]:
    """Cases in priority order: fp32 and fast (on_device on, then off), then compile (on_device on, then off)."""
    first = [(m, b, mode, od) for od in (True, False) for mode in ("fp32", "fast") for b in (64, large)
             for m in METHODS]
    return first + [(m, b, "compile", od) for od in (True, False) for b in (64, large) for m in METHODS]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdx.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new cases after this many seconds")
    p.add_argument("--large-batch", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--data-dir", default=None,
                   help="the folder holding cifar100/cifar100.npz (default: paths.data_dir)")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--real-reserve-s", type=float, default=150.0,
                   help="time kept for the real run before the compiled cases start")
    p.add_argument("--skip-real", action="store_true")
    a = p.parse_args(argv)
    why = no_gpu_message()
    if why:
        print(why, flush=True)
        return 0
    from kdx.bench import _quiet_logs

    clock = Clock(a.budget_s)
    print(device_line(), flush=True)
    with _quiet_logs(), tempfile.TemporaryDirectory(prefix="kdx-gpu-check-") as tmp:
        return _check(a, clock, Path(tmp))


def _check(a: argparse.Namespace, clock: Clock, tmp: Path) -> int:
    data: dict[tuple[int, bool], float] = {}
    for b in (64, a.large_batch):
        for od in (True, False):
            data[(b, od)] = data_rate(b, od, 20, tmp / f"data-{b}-{od}")
    rows: list[dict[str, Any]] = []
    real_wanted = not a.skip_real and cifar100_present(a.data_dir) is not None
    for i, (m, b, mode, od) in enumerate(plan(a.large_batch)):
        reserve = a.real_reserve_s if (real_wanted and mode == "compile") else 0.0
        est = 60.0 if mode == "compile" else 8.0
        if clock.left - reserve < est:
            rows.append({"method": m, "batch": b, "mode": mode, "on_device": od, "skipped": "time budget"})
            continue
        try:
            rows.append(speed_case(m, b, mode, od, a.warmup, a.steps, tmp / f"case{i}"))
        except Exception as e:  # one failing case (e.g. out of memory) does not hide the others
            rows.append({"method": m, "batch": b, "mode": mode, "on_device": od,
                         "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"})
        torch.cuda.empty_cache()
        r = rows[-1]
        print(f"  {m} b{b} {mode} on_device={od}: " + (f"{r['kdx_img_s']:.0f} img/s" if "kdx_img_s" in r
                                                         else f"skipped ({r['skipped']})"), flush=True)
    print("\nThroughput, resnet32x4 → resnet8x4, 100 classes (epoch = 50,000 training images, no evaluation):\n",
          flush=True)
    print(table(rows, data), flush=True)
    print("\nData path alone (img/s): " + ", ".join(f"batch {b} on_device={'on' if od else 'off'}: {v:.0f}"
                                                   for (b, od), v in data.items()), flush=True)
    if a.skip_real:
        return 0
    where = cifar100_present(a.data_dir)
    if where is None:
        print("\nReal CIFAR-100 run skipped: neither <data>/cifar100/cifar100.npz nor torchvision's files are under "
              f"{a.data_dir or 'paths.data_dir'} (pass --data-dir).", flush=True)
        return 0
    print(f"\nReal CIFAR-100 run ({where}): resnet32x4 teacher {a.teacher_epochs} epochs, then resnet8x4 KD "
          f"{a.epochs} epochs, batch 64, perf=fast, data.on_device=true, cosine LR; {clock.left:.0f} s of the budget "
          "left.", flush=True)
    r = real_run(a.data_dir, a.teacher_epochs, a.epochs, 64, tmp / "real")
    pct = lambda v: "–" if v is None else f"{float(v):.2f} %"  # noqa: E731
    print(f"teacher (resnet32x4, {r['teacher_epochs']} epochs) test top-1 {pct(r['teacher_acc1'])}; student "
          f"(resnet8x4 KD, {r['epochs']} epochs) test top-1 {pct(r['test_acc1_last'])} last, "
          f"{pct(r['test_acc1_best'])} best; {r['wall_s']:.0f} s for both (data: {r['source']}).", flush=True)
    return 0


__all__ = ["bound", "data_rate", "main", "no_gpu_message", "plan", "real_run_overrides", "table"]

if __name__ == "__main__":
    sys.exit(main())
