"""Speed benchmark: kdx's full training path against a bare PyTorch loop, in one process.

``python -m kdx.bench`` (``make bench``) times the same training step two ways for each case:

- **kdx**: the real Hydra config composed in-process (``data=synthetic``, the pair's models,
  ``distill=<method>``), built by :func:`kdx.build.build` (LightningModule, Trainer,
  checkpoint and LR callbacks, CSV logger; progress bar off) and run with ``trainer.fit`` for
  ``warmup + steps`` steps; the timed window is the last ``steps`` steps (data fetch, on-device
  augmentation, forward, loss, backward, optimiser step, logging).
- **bare**: a plain loop written here, on the *same* objects the kdx job built (student,
  teacher network, strategy with its trainable parts and feature hooks) and the same step function
  (:func:`kdx.regimes.step.distill_step`), one fixed uint8 batch on
  the device given the same crop/flip + normalisation each step as kdx's path, the same precision (``torch.autocast`` for bf16) and memory format, and
  ``torch.optim.SGD`` with the config's settings. No Lightning, no logging, no data loader.

The bare loop runs before and after the kdx run; the ratio is kdx over the mean of the two.
Each case prints a table row and one JSON line (``{"bench": ...}``). ``--data`` adds the data
case: the kdx data path alone (loader + on-device augmentation + normalisation) on the real
CIFAR-10 copy in ``../shared/data``.

Precisions: ``fp32`` (``trainer.precision=32``) and ``fast`` (``perf=fast``: bf16 autocast +
channels-last). The "fast vs fp32" column divides the kdx fast path by the fp32 bare loop of the
same case. Nothing here asserts a speed: the numbers go in a table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

PAIRS = {
    "res32x4_res8x4": ("resnet32x4", "resnet8x4"),
    "wrn40_2_wrn16_2": ("wrn_40_2", "wrn_16_2"),
}
METHODS = ["none", "kd", "dkd", "topkd", "afd", "rtk", "reffakd"]
PRECISIONS = {
    "fp32": ["trainer.precision=32-true"],
    "fast": ["perf=fast"],
}
log = logging.getLogger("kdx.bench")


# ---------------------------------------------------------------------------------------- helpers
class PeakRSS:
    """Peak resident memory during a block, sampled every 5 ms (CPU); CUDA peak allocation on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self) -> "PeakRSS":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = self._rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compose(overrides: list[str], workdir: Path):
    """The config ``python -m kdx <overrides>`` would run, writing under ``workdir``."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from kdx.cli import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(workdir / "run")
        cfg.hydra.runtime.cwd = os.getcwd()
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(workdir / "run")
        cfg.paths.teachers = str(workdir / "teachers")
    return cfg


def _random_teacher(arch: str, num_classes: int, workdir: Path) -> Path:
    """A randomly initialised teacher checkpoint: the speed of a step does not depend on its weights."""
    from kdx.io import atomic_torch_save
    from kdx.models import create_model

    path = workdir / f"teacher_{arch}.pt"
    if not path.is_file():
        torch.manual_seed(0)
        atomic_torch_save(create_model(arch, num_classes=num_classes).state_dict(), path)
    return path


class StepTimer:
    """A Lightning callback: wall time of the last ``steps`` training steps (after ``warmup``)."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        import lightning.pytorch as pl

        timer = self

        class _CB(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if batch_idx == warmup - 1:
                    _sync(device)
                    timer.t0 = time.perf_counter()
                    timer.mem = PeakRSS(device).__enter__()
                elif batch_idx == warmup + steps - 1:
                    _sync(device)
                    timer.seconds = time.perf_counter() - timer.t0
                    timer.mem.__exit__(None)

        self.callback = _CB()
        self.t0 = 0.0
        self.seconds: Optional[float] = None
        self.mem: Optional[PeakRSS] = None


# ---------------------------------------------------------------------------------------- the two paths
def build_job(method: str, pair: str, precision: str, batch: int, total_steps: int, workdir: Path,
              num_classes: int = 100, extra: tuple[str, ...] = ()):
    from kdx.build import build
    from kdx.run import run

    teacher_arch, student_arch = PAIRS[pair]
    overrides = [
        "data=synthetic", f"data.num_classes={num_classes}", f"data.train_size={batch * total_steps}",
        "data.test_size=64", f"data.batch_size={batch}", "data.drop_last=true",
        f"model={student_arch}", f"teacher_arch={teacher_arch}", f"distill={method}",
        "optim=sgd", "scheduler=constant", "trainer.max_epochs=1",
        "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.enable_model_summary=false",
        "logger=csv", "progress_bar=none", "seed=0",
    ] + PRECISIONS[precision]
    if torch.cuda.is_available():
        overrides.append("trainer.accelerator=gpu")
    else:
        overrides.append("trainer.accelerator=cpu")
    if method == "reffakd":  # the soft-label table: a 1-epoch autoencoder on the same synthetic data
        overrides += ["teacher.ae.epochs=1", "teacher.ae.milestones=[1]", "teacher.ae.samples_per_class=2"]
    elif method != "none":
        overrides.append(f"teacher.ckpt={_random_teacher(teacher_arch, num_classes, workdir)}")
    cfg = compose(overrides + list(extra), workdir)
    return cfg, build(cfg, run_job=run)


def bare_loop(job, warmup: int, steps: int) -> tuple[float, float]:
    """Images/s and peak memory of ``steps`` plain-PyTorch steps on the job's own objects."""
    from kdx.distill.base import Batch
    from kdx.regimes.step import distill_step

    module, cfg = job.module, job.cfg
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student, strategy, teacher = module.student.to(device), module.strategy.to(device), module.teacher
    channels_last = bool(cfg.perf.channels_last)
    if teacher is not None:
        teacher.to(device).eval()
    student.train()
    strategy.train()
    dm = job.datamodule
    dm.setup("fit")
    raw = tuple(t.to(device) for t in next(iter(dm.train_dataloader())))  # one uint8 batch, kept on the device
    params = [p for p in list(student.parameters()) + list(strategy.parameters()) if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.SGD(params, lr=float(o.lr), momentum=float(o.get("momentum", 0.0)),
                          weight_decay=float(o.get("weight_decay", 0.0)), nesterov=bool(o.get("nesterov", False)))
    precision = str(cfg.trainer.precision)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if precision.startswith("bf16")
           else contextlib.nullcontext())

    def step() -> None:
        # the same per-step data work as kdx's path: crop/flip + normalise on the device (no loader)
        x, y, idx = dm.transform_batch(raw, train=True, epoch=0)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            loss, _ = distill_step(module.step_parts, Batch(x, y, idx), 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    with PeakRSS(device) as mem:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        seconds = time.perf_counter() - t0
    return steps * raw[0].shape[0] / seconds, mem.peak_mb


def kdx_path(job, warmup: int, steps: int) -> tuple[float, float]:
    """Images/s and peak memory of the timed steps of ``trainer.fit`` on the kdx job."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timer = StepTimer(warmup, steps, device)
    job.trainer.callbacks.append(timer.callback)
    job.trainer.fit(job.module, datamodule=job.datamodule)
    if timer.seconds is None:
        raise RuntimeError(f"the kdx run stopped before {warmup + steps} steps (train_size too small?)")
    batch = int(job.cfg.data.batch_size)
    return steps * batch / timer.seconds, timer.mem.peak_mb


def run_case(method: str, pair: str, precision: str, batch: int, warmup: int, steps: int,
             workdir: Path) -> dict[str, Any]:
    total = warmup + steps
    t_build = time.perf_counter()
    cfg, job = build_job(method, pair, precision, batch, total, workdir)
    t_build = time.perf_counter() - t_build
    bare1, mem_bare = bare_loop(job, warmup, steps)
    kdx_ips, mem_kdx = kdx_path(job, warmup, steps)
    bare2, mem_bare2 = bare_loop(job, warmup, steps)
    bare = statistics.mean([bare1, bare2])
    return {
        "case": f"{method}/{pair}/{precision}", "method": method, "pair": pair, "precision": precision,
        "batch": batch, "steps": steps, "device": _device_name(),
        "kdx_img_s": round(kdx_ips, 2), "bare_img_s": round(bare, 2),
        "bare_img_s_runs": [round(bare1, 2), round(bare2, 2)],
        "ratio_kdx_over_bare": round(kdx_ips / bare, 4),
        "peak_mem_mb_kdx": round(mem_kdx, 1), "peak_mem_mb_bare": round(max(mem_bare, mem_bare2), 1),
        "build_s": round(t_build, 2),
    }


def cache_case(pair: str, precision: str, batch: int, warmup: int, steps: int, workdir: Path,
               views: int = 4) -> dict[str, Any]:
    """KD steps with the live teacher vs with the teacher-logit cache (``teacher_cache=augmented``, warm).

    The cache is filled by a pre-pass when ``fit`` starts, before the first step, so the timed steps read a
    warm cache; the fill (``views`` teacher passes over the split) is reported on its own.
    """
    total = warmup + steps
    rows = {}
    for mode in ("off", "augmented"):
        extra = (f"teacher_cache={mode}", f"paths.cache_dir={workdir / 'cache'}") + \
            ((f"teacher_cache.views={views}",) if mode == "augmented" else ())
        _, job = build_job("kd", pair, precision, batch, total, workdir / mode, extra=extra)
        ips, mem = kdx_path(job, warmup, steps)
        fill_s = job.module.teacher.resources.get("teacher_cache_fill_s")
        rows[mode] = (ips, mem, fill_s)
    (live, mem_live, _), (cached, mem_cached, fill_s) = rows["off"], rows["augmented"]
    return {"case": f"cache/kd/{pair}/{precision}", "method": "cache", "pair": pair, "precision": precision,
            "batch": batch, "steps": steps, "device": _device_name(), "kdx_img_s": round(cached, 2),
            "live_teacher_img_s": round(live, 2), "ratio_cached_over_live": round(cached / live, 4),
            "cache_views": views, "cache_fill_s": fill_s, "cache_fill_images": views * batch * total,
            "peak_mem_mb_kdx": round(mem_cached, 1), "peak_mem_mb_live": round(mem_live, 1)}


def data_case(batch: int, steps: int, workdir: Path) -> dict[str, Any]:
    """The kdx data path alone on the real CIFAR-10 copy: loader + on-device crop/flip + normalise."""
    from kdx.build import instantiate_data

    cfg = compose(["data=cifar10", f"data.batch_size={batch}"], workdir)
    dm = instantiate_data(cfg.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = dm.train_dataloader()
    n, t0 = 0, None
    with PeakRSS(device) as mem:
        for i, b in enumerate(loader):
            x, y, idx = dm.transform_batch(tuple(t.to(device) for t in b), train=True, epoch=0)
            if i == 1:  # the first batch pays the worker start-up
                _sync(device)
                t0 = time.perf_counter()
            elif i > 1:
                n += x.shape[0]
            if i == steps + 1:
                break
        _sync(device)
        seconds = time.perf_counter() - t0
    return {"case": "data/cifar10", "method": "data", "pair": "-", "precision": "uint8→fp32",
            "batch": batch, "steps": steps, "device": _device_name(), "kdx_img_s": round(n / seconds, 1),
            "num_workers": int(cfg.data.num_workers), "peak_mem_mb_kdx": round(mem.peak_mb, 1),
            "source": dm.describe().get("source")}


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


def table(rows: list[dict[str, Any]]) -> str:
    fp32_bare = {(r["method"], r["pair"]): r["bare_img_s"] for r in rows
                 if r.get("precision") == "fp32" and "bare_img_s" in r}
    head = ["case", "kdx img/s", "bare img/s", "kdx/bare", "fast kdx / fp32 bare", "peak MB kdx/bare"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["method"] == "cache":
            lines.append(f"| {r['case']} (teacher_cache=augmented, {r['cache_views']} views, warm) | "
                         f"{r['kdx_img_s']:.1f} | live teacher {r['live_teacher_img_s']:.1f} | "
                         f"{r['ratio_cached_over_live']:.2f}× (cached/live) | fill {r['cache_fill_s']} s | "
                         f"{r['peak_mem_mb_kdx']:.0f}/{r['peak_mem_mb_live']:.0f} |")
            continue
        if r["method"] == "data":
            lines.append(f"| {r['case']} (loader + augment, {r['num_workers']} workers) | {r['kdx_img_s']} | – | – | – "
                         f"| {r['peak_mem_mb_kdx']} |")
            continue
        base = fp32_bare.get((r["method"], r["pair"]))
        speedup = f"{r['kdx_img_s'] / base:.2f}×" if r["precision"] == "fast" and base else "–"
        lines.append(f"| {r['case']} | {r['kdx_img_s']:.1f} | {r['bare_img_s']:.1f} | "
                     f"{r['ratio_kdx_over_bare']:.3f} | {speedup} | {r['peak_mem_mb_kdx']:.0f}/{r['peak_mem_mb_bare']:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdx.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma list of {list(PAIRS)}")
    p.add_argument("--precisions", default="fp32,fast", help="comma list of fp32,fast")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--data", action="store_true", help="add the data-loading case on the real CIFAR-10 copy")
    p.add_argument("--data-only", action="store_true", help="only the data-loading case")
    p.add_argument("--cache", action="store_true",
                   help="add the teacher-logit cache case (KD on each pair, live teacher vs warm cache)")
    p.add_argument("--cache-only", action="store_true", help="only the cache case")
    p.add_argument("--out", default=None, help="also write the JSON lines to this file")
    a = p.parse_args(argv)
    with _quiet_logs():
        return _main(a, p)


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Lightning's and kdx's INFO lines off while benchmarking; the levels are restored afterwards."""
    import lightning.pytorch  # noqa: F401  (its loggers exist once imported)

    names = [n for n in list(logging.root.manager.loggerDict) if n.startswith(("lightning", "kdx"))]
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def _main(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    bad = [m for m in a.methods.split(",") if m not in METHODS] + [q for q in a.pairs.split(",") if q not in PAIRS] \
        + [q for q in a.precisions.split(",") if q not in PRECISIONS]
    if bad:
        p.error(f"unknown case name(s) {bad}: methods {METHODS}, pairs {list(PAIRS)}, precisions {list(PRECISIONS)}")
    rows: list[dict[str, Any]] = []
    out = open(a.out, "w") if a.out else None

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        line = json.dumps({"bench": row})
        print(line, flush=True)
        if out:
            out.write(line + "\n")

    with tempfile.TemporaryDirectory(prefix="kdx-bench-") as tmp:
        only = a.data_only or a.cache_only
        cases = [] if only else [(m, q, pr) for q in a.pairs.split(",") for m in a.methods.split(",")
                                        for pr in a.precisions.split(",")]
        for m, q, pr in cases:
            emit(run_case(m, q, pr, a.batch, a.warmup, a.steps, Path(tmp) / f"{m}-{q}-{pr}"))
        if a.cache or a.cache_only:
            for q in a.pairs.split(","):
                for pr in a.precisions.split(","):
                    emit(cache_case(q, pr, a.batch, a.warmup, a.steps, Path(tmp) / f"cache-{q}-{pr}"))
        if a.data or a.data_only:
            emit(data_case(a.batch, max(a.steps, 20), Path(tmp) / "data"))
    if out:
        out.close()
    print("\n" + table(rows), flush=True)
    print(f"\n(torch {torch.__version__}, {_device_name()}, peak RSS of the process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
