"""Speed benchmark: kdx's full training path against a bare PyTorch loop, in one process.

``python -m kdx.bench`` (``make bench``) times the same training step two ways for each case:

- **kdx**: the real Hydra config composed in-process (``data=synthetic``, the pair's models,
  ``distill=<method>``), built by :func:`kdx.build.build` (LightningModule, Trainer,
  checkpoint and LR callbacks, CSV logger; progress bar off) and run with ``trainer.fit``: data fetch,
  on-device augmentation, forward, loss, backward, optimiser step, logging, callbacks.
- **bare**: a plain loop written here, on the *same* objects the kdx job built (student, teacher network,
  strategy with its trainable parts and feature hooks) and the same step function
  (:func:`kdx.regimes.step.distill_step`), one fixed uint8 batch on the device given the same crop/flip +
  normalisation (and extra views) each step as kdx's path, the same precision (``torch.autocast`` for bf16) and
  memory format, and the config's optimiser (``optim=dot`` steps the distillation and task gradients apart, as
  kdx does). No Lightning, no logging, no data loader.

The two are **interleaved** inside one ``trainer.fit``: after ``warmup`` kdx steps (and ``warmup`` bare steps),
``repeats`` rounds of (``steps`` bare steps, then ``steps`` kdx steps), the bare loop running from a callback
between kdx's windows. Each round gives one kdx and one bare time per step; the case reports the median over the
rounds and their min–max: the **overhead** (kdx − bare, ms per step) and the ratio kdx/bare (img/s). Each case
prints a table row and one JSON line (``{"bench": ...}``). ``--data`` adds the data case: the kdx data path alone
(loader + on-device augmentation + normalisation) on the real CIFAR-10 copy in ``../shared/data``.

Cases: ``--methods`` (every method with a ``conf/distill/*.yaml`` but the data-free ones and ``deit``, plus
``kd+topk_scale``, ``kd+ls`` and ``kd+dot``), ``--pairs`` (a named pair or any ``teacher:student``, e.g.
``resnet8:resnet8``), ``--precisions``: ``fp32`` (``trainer.precision=32-true``) and ``fast`` (``perf=fast``:
bf16 autocast + channels-last). The "fast vs fp32" column divides the kdx fast path by the fp32 bare loop of the
same case. On a shared machine, ``--threads 1 --clock thread`` times the main thread's CPU time, which other
processes' load moves far less than elapsed time. Nothing here asserts a speed: the numbers go in a table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

PAIRS = {
    "res32x4_res8x4": ("resnet32x4", "resnet8x4"),
    "wrn40_2_wrn16_2": ("wrn_40_2", "wrn_16_2"),
}
#: a method name → its overrides (default: ``distill=<name>``); combinations are named as kdx names them
COMBOS = {
    "kd+topk_scale": ["distill=kd", "distill/teacher_transform=topk_scale"],
    "kd+ls": ["distill=kd", "distill/logit_transform=ls"],
    "kd+dot": ["distill=kd", "optim=dot"],
}
METHODS = ["none", "kd", "kd_crd", "dkd", "topkd", "kd+topk_scale", "kd+ls", "kd+dot", "dist", "nkd", "ttm", "wttm",
           "sdd_kd", "sdd_dkd", "sdd_nkd", "ctkd", "ctkd_dkd", "mlkd", "mlkd_weak", "reffakd",
           "afd", "rtk", "nst", "at", "sp", "pkt", "rkd", "kdsvd", "fitnet", "vid", "crd", "reviewkd", "ofd"]
#: settings a method needs on the benchmark's small synthetic split (its step's cost is unchanged)
BENCH_SETTINGS = {
    "reffakd": ["teacher.ae.epochs=1", "teacher.ae.milestones=[1]", "teacher.ae.samples_per_class=2"],
    "crd": ["distill.replace_short_pools=true"],  # K=16384 negatives from a split of a few hundred images
}
MIN_TRAIN_SIZE = {"reffakd": 500}  # its autoencoder table picks 2 images of each of the 100 classes
PRECISIONS = {
    "fp32": ["trainer.precision=32-true"],
    "fast": ["perf=fast"],
}
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
clock: Callable[[], float] = time.perf_counter  # the benchmark's timer (--clock; a test replaces it with a fake one)
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


class Interleaved:
    """A Lightning callback that times kdx's steps in ``repeats`` windows of ``steps`` steps (after ``warmup``),
    running ``bare(n)`` (the bare loop, seconds for ``n`` steps) before each window when one is given.

    A window runs from the end of one ``on_train_batch_end`` to the end of the ``steps``-th next one, so it holds
    everything kdx does per step (loader, transfer, hooks, step, logging, callbacks)."""

    def __init__(self, warmup: int, steps: int, repeats: int, device: torch.device,
                 bare: Optional[Callable[[int], float]] = None) -> None:
        import lightning.pytorch as pl

        self.warmup, self.steps, self.repeats, self.device, self.bare = warmup, steps, repeats, device, bare
        self.kdx_s: list[float] = []
        self.bare_s: list[float] = []
        self.peak_mb_kdx = self.peak_mb_bare = 0.0
        self._t0 = 0.0
        self._mem: Optional[PeakRSS] = None
        timer = self

        class _CB(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                timer.batch_end(batch_idx)

        self.callback = _CB()

    def batch_end(self, batch_idx: int) -> None:
        done = batch_idx + 1 - self.warmup  # kdx steps since the warm-up
        if done < 0 or done % self.steps:
            return
        _sync(self.device)
        if done:
            self.kdx_s.append(clock() - self._t0)
            self._mem.__exit__(None)
            self.peak_mb_kdx = max(self.peak_mb_kdx, self._mem.peak_mb)
        if len(self.kdx_s) == self.repeats:
            return
        if self.bare is not None:
            with torch.enable_grad(), PeakRSS(self.device) as mem:
                if not done:
                    self.bare(self.warmup)
                self.bare_s.append(self.bare(self.steps))
            self.peak_mb_bare = max(self.peak_mb_bare, mem.peak_mb)
        self._mem = PeakRSS(self.device).__enter__()
        _sync(self.device)
        self._t0 = clock()


def summarise(kdx_s: list[float], bare_s: list[float], steps: int, batch: int) -> dict[str, Any]:
    """Per-step times, the overhead kdx − bare (ms per step) and the ratio kdx/bare (img/s) of each interleaved
    round: their medians and min–max over the rounds."""
    kdx_ms = [1000 * s / steps for s in kdx_s]
    bare_ms = [1000 * s / steps for s in bare_s]
    over = [k - b for k, b in zip(kdx_ms, bare_ms)]
    ratio = [b / k for k, b in zip(kdx_ms, bare_ms)]
    med = statistics.median
    return {
        "repeats": len(kdx_ms), "kdx_ms_step": round(med(kdx_ms), 3), "bare_ms_step": round(med(bare_ms), 3),
        "kdx_img_s": round(1000 * batch / med(kdx_ms), 2), "bare_img_s": round(1000 * batch / med(bare_ms), 2),
        "bare_img_s_runs": [round(1000 * batch / b, 2) for b in bare_ms],
        "kdx_img_s_runs": [round(1000 * batch / k, 2) for k in kdx_ms],
        "overhead_ms_step": round(med(over), 3), "overhead_ms_step_min": round(min(over), 3),
        "overhead_ms_step_max": round(max(over), 3),
        "ratio_kdx_over_bare": round(med(ratio), 4), "ratio_min": round(min(ratio), 4),
        "ratio_max": round(max(ratio), 4),
    }


# ---------------------------------------------------------------------------------------- the two paths
def parse_pair(name: str) -> tuple[str, str]:
    """``(teacher, student)`` of a named pair (:data:`PAIRS`) or of ``teacher:student`` (``model`` configs)."""
    from kdx.cli import CONFIG_DIR

    if name in PAIRS:
        return PAIRS[name]
    teacher, sep, student = name.partition(":")
    known = {p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml")}
    if not sep or teacher not in known or student not in known:
        raise ValueError(f"--pairs: {name!r} is neither a named pair {list(PAIRS)} nor teacher:student of the model "
                         f"configs (conf/model/: {sorted(known)})")
    return teacher, student


def method_overrides(method: str) -> list[str]:
    """The overrides that select ``method`` (:data:`COMBOS` for combinations) and its benchmark settings."""
    return COMBOS.get(method, [f"distill={method}"]) + BENCH_SETTINGS.get(method, [])


def build_job(method: str, pair: str, precision: str, batch: int, total_steps: int, workdir: Path,
              num_classes: int = 100, extra: tuple[str, ...] = ()):
    from kdx.build import build
    from kdx.run import run

    teacher_arch, student_arch = parse_pair(pair)
    overrides = [
        "data=synthetic", f"data.num_classes={num_classes}",
        f"data.train_size={max(batch * total_steps, MIN_TRAIN_SIZE.get(method, 0))}",
        f"trainer.limit_train_batches={total_steps}",
        "data.test_size=64", f"data.batch_size={batch}", "data.drop_last=true",
        f"model={student_arch}", f"teacher_arch={teacher_arch}",
        "optim=sgd", "scheduler=constant", "trainer.max_epochs=1",
        "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.enable_model_summary=false",
        "logger=csv", "progress_bar=none", "seed=0",
    ] + method_overrides(method) + PRECISIONS[precision]
    overrides.append("trainer.accelerator=" + ("gpu" if torch.cuda.is_available() else "cpu"))
    if method not in ("none", "reffakd"):  # ReffAKD's soft-label table: a 1-epoch autoencoder on the same data
        overrides.append(f"teacher.ckpt={_random_teacher(teacher_arch, num_classes, workdir)}")
    cfg = compose(overrides + list(extra), workdir)
    return cfg, build(cfg, run_job=run)


def bare_loop(job, mark: Optional[Callable[[str], None]] = None) -> Callable[[int], float]:
    """``timed(n)``: the seconds of ``n`` plain-PyTorch steps on the job's own objects (sets them up once).
    ``mark(phase)`` (:mod:`kdx.bench_phases`) is called at the end of each phase of a step: data, forward (and
    loss), backward (with zero_grad), optimiser."""
    mark = mark or (lambda phase: None)
    from kdx.distill.base import Batch
    from kdx.regimes import step as step_fn

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
    opt = module.optimizer_factory(module.trainable_parameters())  # the config's optimiser (SGD, DOT, ...)
    split = module.parts.split_losses  # optim=dot: distillation, then task gradients (kdx's order)
    task_names = strategy.task_terms
    precision = str(cfg.trainer.precision)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if precision.startswith("bf16")
           else contextlib.nullcontext())

    def prep(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    def step() -> None:
        # the same per-step data work as kdx's path: crop/flip + normalise (+ extra views) on the device, no loader
        x, y, idx = dm.transform_batch(raw, train=True, epoch=0)
        views = {k: prep(v) for k, v in dm.extra_views(raw, 0).items()} if dm.extra_view_names else {}
        mark("data")
        with amp:
            loss, terms = step_fn.distill_step(module.step_parts, Batch(prep(x), y, idx, views), 1)
        mark("forward")
        opt.zero_grad(set_to_none=True)
        if not split:
            loss.backward()
            mark("backward")
            opt.step()
            mark("optimiser")
            return
        task = [v.float() for k, v in terms.items() if k in task_names]
        distil = [v.float() for k, v in terms.items() if k not in task_names]
        if distil:
            torch.stack(distil).sum().backward(retain_graph=bool(task))
            opt.step_kd()
            opt.zero_grad(set_to_none=True)
        if task:
            torch.stack(task).sum().backward()
        opt.step()
        mark("backward and optimiser (optim=dot)")

    def timed(n: int) -> float:
        _sync(device)
        t0 = clock()
        for _ in range(n):
            step()
        _sync(device)
        return clock() - t0

    return timed


def interleaved(job, warmup: int, steps: int, repeats: int, with_bare: bool = True) -> Interleaved:
    """Fit the kdx job with the bare loop interleaved between its timed windows; the timer holds the times."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bare = bare_loop(job) if with_bare else None
    timer = Interleaved(warmup, steps, repeats, device, bare)
    job.trainer.callbacks.append(timer.callback)
    job.trainer.fit(job.module, datamodule=job.datamodule)
    if len(timer.kdx_s) < repeats:
        raise RuntimeError(f"the kdx run stopped before {warmup + repeats * steps} steps (train_size too small?)")
    return timer


def run_case(method: str, pair: str, precision: str, batch: int, warmup: int, steps: int, repeats: int,
             workdir: Path) -> dict[str, Any]:
    t_build = clock()
    _, job = build_job(method, pair, precision, batch, warmup + repeats * steps, workdir)
    t_build = clock() - t_build
    timer = interleaved(job, warmup, steps, repeats)
    return {
        "case": f"{method}/{pair}/{precision}", "method": method, "pair": pair, "precision": precision,
        "batch": batch, "steps": steps, "warmup": warmup, "device": _device_name(),
        **summarise(timer.kdx_s, timer.bare_s, steps, batch),
        "peak_mem_mb_kdx": round(timer.peak_mb_kdx, 1), "peak_mem_mb_bare": round(timer.peak_mb_bare, 1),
        "build_s": round(t_build, 2),
    }


def cache_case(pair: str, precision: str, batch: int, warmup: int, steps: int, repeats: int, workdir: Path,
               views: int = 4) -> dict[str, Any]:
    """KD steps with the live teacher vs with the teacher-logit cache (``teacher_cache=augmented``, warm).

    The cache is filled by a pre-pass when ``fit`` starts, before the first step, so the timed steps read a
    warm cache; the fill (``views`` teacher passes over the split) is reported on its own.
    """
    total = warmup + repeats * steps
    rows = {}
    for mode in ("off", "augmented"):
        extra = (f"teacher_cache={mode}", f"paths.cache_dir={workdir / 'cache'}") + \
            ((f"teacher_cache.views={views}",) if mode == "augmented" else ())
        _, job = build_job("kd", pair, precision, batch, total, workdir / mode, extra=extra)
        timer = interleaved(job, warmup, steps, repeats, with_bare=False)
        ips, mem = batch * steps / statistics.median(timer.kdx_s), timer.peak_mb_kdx
        fill_s = job.module.teacher.resources.get("teacher_cache_fill_s")
        rows[mode] = (ips, mem, fill_s)
    (live, mem_live, _), (cached, mem_cached, fill_s) = rows["off"], rows["augmented"]
    return {"case": f"cache/kd/{pair}/{precision}", "method": "cache", "pair": pair, "precision": precision,
            "batch": batch, "steps": steps, "repeats": repeats, "device": _device_name(), "kdx_img_s": round(cached, 2),
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
                t0 = clock()
            elif i > 1:
                n += x.shape[0]
            if i == steps + 1:
                break
        _sync(device)
        seconds = clock() - t0
    return {"case": "data/cifar10", "method": "data", "pair": "-", "precision": "uint8→fp32",
            "batch": batch, "steps": steps, "device": _device_name(), "kdx_img_s": round(n / seconds, 1),
            "num_workers": int(cfg.data.num_workers), "peak_mem_mb_kdx": round(mem.peak_mb, 1),
            "source": dm.describe().get("source")}


def _folder(*parts: str) -> str:
    """A case's work folder name (no ``:`` or ``+``: its paths go into Hydra overrides)."""
    return re.sub(r"[^\w.-]", "_", "-".join(parts))


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


def table(rows: list[dict[str, Any]]) -> str:
    fp32_bare = {(r["method"], r["pair"]): r["bare_img_s"] for r in rows
                 if r.get("precision") == "fp32" and "bare_img_s" in r}
    head = ["case", "kdx img/s", "bare img/s", "overhead ms/step (min–max)", "kdx/bare (min–max)",
            "fast kdx / fp32 bare", "peak MB kdx/bare"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["method"] == "cache":
            lines.append(f"| {r['case']} (teacher_cache=augmented, {r['cache_views']} views, warm) | "
                         f"{r['kdx_img_s']:.1f} | live teacher {r['live_teacher_img_s']:.1f} | – | "
                         f"{r['ratio_cached_over_live']:.2f}× (cached/live) | fill {r['cache_fill_s']} s | "
                         f"{r['peak_mem_mb_kdx']:.0f}/{r['peak_mem_mb_live']:.0f} |")
            continue
        if "failed" in r:
            lines.append(f"| {r['case']} | not timed: {r['failed'].split(':')[0]} | – | – | – | – | – |")
            continue
        if r["method"] == "data":
            lines.append(f"| {r['case']} (loader + augment, {r['num_workers']} workers) | {r['kdx_img_s']} "
                         f"| – | – | – | – | {r['peak_mem_mb_kdx']} |")
            continue
        base = fp32_bare.get((r["method"], r["pair"]))
        speedup = f"{r['kdx_img_s'] / base:.2f}×" if r["precision"] == "fast" and base else "–"
        lines.append(f"| {r['case']} | {r['kdx_img_s']:.1f} | {r['bare_img_s']:.1f} | {r['overhead_ms_step']:+.2f} "
                     f"({r['overhead_ms_step_min']:+.2f}…{r['overhead_ms_step_max']:+.2f}) | "
                     f"{r['ratio_kdx_over_bare']:.3f} ({r['ratio_min']:.3f}–{r['ratio_max']:.3f}) | {speedup} | "
                     f"{r['peak_mem_mb_kdx']:.0f}/{r['peak_mem_mb_bare']:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdx.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--pairs", default=",".join(PAIRS),
                   help=f"comma list of named pairs {list(PAIRS)} or teacher:student (e.g. resnet8:resnet8)")
    p.add_argument("--precisions", default="fp32,fast", help="comma list of fp32,fast")
    p.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each path first (default 3)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed window (default 10)")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved bare/kdx windows per case; medians and min–max over them (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own; 1 steadies tiny pairs on a shared machine)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall: elapsed time (default); thread: the main thread's CPU time (needs --threads 1), which "
                        "other processes' load on a shared machine barely moves")
    p.add_argument("--data", action="store_true", help="add the data-loading case on the real CIFAR-10 copy")
    p.add_argument("--data-only", action="store_true", help="only the data-loading case")
    p.add_argument("--cache", action="store_true",
                   help="add the teacher-logit cache case (KD on each pair, live teacher vs warm cache)")
    p.add_argument("--cache-only", action="store_true", help="only the cache case")
    p.add_argument("--out", default=None, help="also write the JSON lines to this file")
    a = p.parse_args(argv)
    global clock
    saved = clock
    try:
        with _quiet_logs():
            return _main(a, p)
    finally:
        clock = saved


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
    from kdx.errors import NonFiniteLossError

    bad = [m for m in a.methods.split(",") if m not in METHODS] + [q for q in a.precisions.split(",")
                                                                   if q not in PRECISIONS]
    if bad:
        p.error(f"unknown case name(s) {bad}: methods {METHODS}, precisions {list(PRECISIONS)}")
    for q in a.pairs.split(","):
        try:
            parse_pair(q)
        except ValueError as e:
            p.error(str(e))
    for name in ("batch", "steps", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    if a.clock == "thread" and a.threads != 1:
        p.error("--clock thread counts the main thread only: use it with --threads 1")
    if a.threads is not None:
        torch.set_num_threads(max(1, a.threads))
    global clock
    clock = CLOCKS[a.clock]
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
            try:
                emit(run_case(m, q, pr, a.batch, a.warmup, a.steps, a.repeats, Path(tmp) / _folder(m, q, pr)))
            except NonFiniteLossError as e:  # e.g. a random teacher's features diverge: that case only, not timed
                emit({"case": f"{m}/{q}/{pr}", "method": m, "pair": q, "precision": pr, "failed": str(e)})
        if a.cache or a.cache_only:
            for q in a.pairs.split(","):
                for pr in a.precisions.split(","):
                    emit(cache_case(q, pr, a.batch, a.warmup, a.steps, a.repeats, Path(tmp) / _folder("cache", q, pr)))
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
