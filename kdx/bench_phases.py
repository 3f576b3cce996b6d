"""Where a kdx training step's time goes: ``python -m kdx.bench_phases`` (one case, one process).

The case is built as :mod:`kdx.bench` builds it (the real config, Lightning's Trainer with kdx's callbacks and
logger). kdx's step is cut at the points Lightning exposes (its callback hooks on_train_batch_start,
on_before_zero_grad, on_before_backward, on_after_backward, on_before_optimizer_step, on_train_batch_end) and at
kdx's own (the data transform, ``training_step``, ``record_step``); the bare loop of :func:`kdx.bench.bare_loop`
on the same objects is cut into data, forward, backward and optimiser. Each phase's median over the steps (after
``--warmup``) is printed next to the bare loop's, with the sum of the medians; the gaps that are not kdx's own
code (between ``on_train_batch_end`` and the next step's data transform, before ``training_step``, between it and
the backward pass) are Lightning's loop. Times are medians of single steps, so other load on the machine moves
them less than the window totals of :mod:`kdx.bench`; nothing here is asserted by a test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from kdx import bench

clock: Callable[[], float] = time.perf_counter
#: kdx's marks in the order a step reaches them: (mark, the phase that ends there)
KDX_PHASES = {
    "transform_start": "Lightning: previous batch end → data transform (hooks, logging, fetch, batch_to_device)",
    "transform_end": "data transform (crop/flip, normalise, views)",
    "batch_start": "Lightning: transform → on_train_batch_start",
    "step_start": "Lightning: on_train_batch_start → training_step (closure, hooks)",
    "record_start": "forward + loss (distill_step)",
    "record_end": "kdx: record_step (loss window)",
    "step_end": "training_step return",
    "before_zero_grad": "Lightning: training_step → on_before_zero_grad",
    "before_backward": "Lightning: on_before_zero_grad → on_before_backward (zero_grad included)",
    "after_backward": "backward",
    "before_optimizer_step": "Lightning: on_after_backward → on_before_optimizer_step",
    "batch_end": "optimiser step → on_train_batch_end",
}


class Marks:
    """Timestamps of named points, one list per step (a step starts at ``first``)."""

    def __init__(self, first: str, device: torch.device) -> None:
        self.first, self.device = first, device
        self.steps: list[list[tuple[str, float]]] = []

    def __call__(self, name: str) -> None:
        bench._sync(self.device)
        if name == self.first or not self.steps:
            self.steps.append([])
        self.steps[-1].append((name, clock()))

    def phases(self, skip: int) -> dict[str, float]:
        """Median over the steps after ``skip`` of each phase's ms in a step (the gap before each mark, summed when a
        step reaches a mark twice)."""
        steps = self.steps[skip:]
        gaps: dict[str, list[float]] = {}
        for prev, cur in zip(steps, steps[1:] + [None]):
            per_step: dict[str, float] = {}  # a mark reached twice in a step (optim=dot: two backward passes): summed
            for (_, ta), (b, tb) in zip(prev, prev[1:]):
                per_step[b] = per_step.get(b, 0.0) + tb - ta
            if cur is not None and cur and prev and cur[0][0] == self.first:
                per_step[self.first] = cur[0][1] - prev[-1][1]
            for k, v in per_step.items():
                gaps.setdefault(k, []).append(v)
        return {k: 1000 * statistics.median(v) for k, v in gaps.items() if v}


def measure(method: str, pair: str, precision: str, batch: int, steps: int, warmup: int,
            workdir: Path) -> dict[str, Any]:
    import lightning.pytorch as pl

    _, job = bench.build_job(method, pair, precision, batch, warmup + steps, workdir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bare_marks = Marks("start", device)
    timed = bench.bare_loop(job, mark=bare_marks)
    for _ in range(warmup + steps):
        bare_marks("start")
        timed(1)
    kdx_marks = Marks("transform_start", device)
    module, dm = job.module, job.datamodule

    def wrap(obj: Any, name: str, before: str, after: str) -> None:
        real = getattr(obj, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            kdx_marks(before)
            out = real(*args, **kwargs)
            kdx_marks(after)
            return out
        setattr(obj, name, wrapped)  # on the instance: Lightning looks the hook up by name

    wrap(dm, "on_after_batch_transfer", "transform_start", "transform_end")
    wrap(module, "training_step", "step_start", "step_end")
    wrap(module, "record_step", "record_start", "record_end")

    class Hooks(pl.Callback):
        def on_train_batch_start(self, *a: Any) -> None: kdx_marks("batch_start")
        def on_before_zero_grad(self, *a: Any) -> None: kdx_marks("before_zero_grad")
        def on_before_backward(self, *a: Any) -> None: kdx_marks("before_backward")
        def on_after_backward(self, *a: Any) -> None: kdx_marks("after_backward")
        def on_before_optimizer_step(self, *a: Any) -> None: kdx_marks("before_optimizer_step")
        def on_train_batch_end(self, *a: Any) -> None: kdx_marks("batch_end")

    job.trainer.callbacks.insert(0, Hooks())  # first: the other callbacks' batch-end work falls in the next gap
    job.trainer.fit(module, datamodule=dm)
    found, bare = kdx_marks.phases(warmup), bare_marks.phases(warmup)
    kdx = {k: found[k] for k in [*KDX_PHASES, *found] if k in found}  # in the order a step reaches them
    return {"case": f"{method}/{pair}/{precision}", "batch": batch, "steps": steps, "device": bench._device_name(),
            "kdx_ms": {KDX_PHASES.get(k, k): round(v, 4) for k, v in kdx.items()},
            "bare_ms": {k: round(v, 4) for k, v in bare.items() if k != "start"},
            "kdx_sum_ms": round(sum(kdx.values()), 4),
            "bare_sum_ms": round(sum(v for k, v in bare.items() if k != "start"), 4)}


def floor(steps: int, warmup: int, repeats: int = 5) -> dict[str, Any]:
    """Lightning's own cost per step, without kdx: a one-layer model on fixed 8×16 batches, ``Trainer.fit`` (no
    logger, checkpoint, progress bar or summary; automatic and manual optimisation) against the same step in a
    plain loop; median ms per step of each, medians over ``repeats`` runs."""
    import lightning.pytorch as pl
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    data = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(8)]

    class Batches(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return warmup + steps

        def __getitem__(self, i: int):
            return data[i % len(data)]

    class Tiny(pl.LightningModule):
        def __init__(self, manual: bool) -> None:
            super().__init__()
            self.net, self.automatic_optimization, self.t = nn.Linear(16, 4), not manual, []

        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self.net(batch[0]), batch[1])
            if self.automatic_optimization:
                return loss
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

        def on_train_batch_end(self, *a: Any) -> None:
            self.t.append(clock())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def per_step(times: list[float]) -> float:
        return 1000 * statistics.median(b - a for a, b in zip(times[warmup:], times[warmup + 1:]))

    def lightning(manual: bool) -> float:
        module = Tiny(manual)
        pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", devices=1).fit(
            module, torch.utils.data.DataLoader(Batches(), batch_size=None))
        return per_step(module.t)

    def bare() -> float:
        net = nn.Linear(16, 4)
        opt, times = torch.optim.SGD(net.parameters(), lr=0.01), []
        for i in range(warmup + steps):
            x, y = data[i % len(data)]
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(clock())
        return per_step(times)

    runs: dict[str, list[float]] = {"bare loop": [], "Lightning, automatic optimisation": [],
                                    "Lightning, manual optimisation": []}
    for _ in range(repeats):
        runs["bare loop"].append(bare())
        runs["Lightning, automatic optimisation"].append(lightning(False))
        runs["Lightning, manual optimisation"].append(lightning(True))
    return {"case": "floor: one linear layer, batch 8", "steps": steps, "repeats": repeats,
            "device": "cpu", "ms_step": {k: round(statistics.median(v), 4) for k, v in runs.items()}}


def table(row: dict[str, Any]) -> str:
    if "ms_step" in row:  # --floor
        bare = row["ms_step"]["bare loop"]
        lines = [f"{row['case']}, {row['steps']} steps × {row['repeats']} runs: median ms per step", "",
                 "| loop | ms/step | over the bare loop |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {v - bare:+.3f} |" for k, v in row["ms_step"].items()]
        return "\n".join(lines)
    lines = [f"{row['case']}, batch {row['batch']}, {row['steps']} steps, {row['device']}: median ms per step", "",
             "| kdx phase | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in row["kdx_ms"].items()]
    lines += [f"| **sum** | {row['kdx_sum_ms']:.3f} |", "", "| bare phase | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in row["bare_ms"].items()]
    lines += [f"| **sum** | {row['bare_sum_ms']:.3f} |", "",
              f"Difference of the sums: {row['kdx_sum_ms'] - row['bare_sum_ms']:+.3f} ms per step."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdx.bench_phases", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="kd", help=f"one of {bench.METHODS}")
    p.add_argument("--pair", default="resnet8:resnet8", help="a named pair or teacher:student")
    p.add_argument("--precision", default="fp32", choices=list(bench.PRECISIONS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=300, help="measured steps of each path (default 300)")
    p.add_argument("--warmup", type=int, default=20, help="steps left out first (default 20)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--floor", action="store_true",
                   help="Lightning's own per-step cost on a one-layer model instead (no kdx), against a plain loop")
    a = p.parse_args(argv)
    if a.method not in bench.METHODS:
        p.error(f"--method {a.method!r}: choose from {bench.METHODS}")
    try:
        bench.parse_pair(a.pair)
    except ValueError as e:
        p.error(str(e))
    if a.steps < 2 or a.warmup < 0 or a.batch < 1:
        p.error("--steps must be >= 2, --warmup >= 0 and --batch >= 1")
    torch.set_num_threads(max(1, a.threads))
    with bench._quiet_logs(), warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="kdx-phases-") as tmp:
        warnings.simplefilter("ignore")  # Lightning's advice on a run with no validation
        row = (floor(a.steps, a.warmup) if a.floor
               else measure(a.method, a.pair, a.precision, a.batch, a.steps, a.warmup, Path(tmp)))
    print(json.dumps({"phases": row}))
    print(table(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
