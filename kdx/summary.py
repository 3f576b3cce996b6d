"""A results table from ``results.json`` files: ``python -m kdx.summary <folder> [<folder> ...]``.

Rows are (dataset, student); columns are the teacher, then one per method (``none`` is the
student baseline), each cell the mean ± std of the top-1 test accuracy over seeds with n.
Runs that did not finish are listed under the table, never averaged in. A Hydra callback
(:class:`SweepSummary`) prints and writes the table when a multirun ends.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from hydra.experimental.callback import Callback

from kdx.io import atomic_write_bytes


def collect(folders: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Completed results, and the job folders that have none (failed or unfinished)."""
    done, missing = [], []
    for folder in folders:
        folder = Path(folder)
        job_dirs = sorted({p.parent for p in folder.rglob(".hydra")} | {p.parent for p in folder.rglob("results.json")})
        for job in job_dirs:
            if "teacher" in job.relative_to(folder).parts:  # a teacher trained inside a job
                continue
            res = job / "results.json"
            data = json.loads(res.read_text()) if res.is_file() else None
            if data is not None and data.get("task") not in ("distill", "train"):
                continue  # an artifact built inside a job (ReffAKD stage A), not a student run
            if data and data.get("status") == "complete":
                done.append(data)
            else:
                missing.append(str(job))
    return done, missing


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def table(results: list[dict[str, Any]], metric: str = "test_acc1_best") -> str:
    rows: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    teachers: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    methods: list[str] = []
    for r in results:
        key = (r["dataset"], r["student"])
        if r.get(metric) is not None:
            rows[key][r["method"]].append(float(r[metric]))
        if r["method"] not in methods:
            methods.append(r["method"])
        if r.get("teacher") and r.get("teacher_acc1") is not None:
            teachers[key][r["teacher"]] = float(r["teacher_acc1"])
    methods.sort(key=lambda m: (m != "none", m))
    header = ["dataset", "student", "teacher (acc1)"] + [("baseline (none)" if m == "none" else m) for m in methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted(rows):
        t = ", ".join(f"{a} ({v:.2f})" for a, v in teachers[key].items()) or "–"
        lines.append("| " + " | ".join([key[0], key[1], t] + [_cell(rows[key].get(m, [])) for m in methods]) + " |")
    return "\n".join(lines)


def render(folders: list[str | Path], metric: str = "test_acc1_best") -> str:
    results, missing = collect(folders)
    text = f"Top-1 test accuracy (%), {metric}, mean ± std over seeds\n\n" + table(results, metric) + "\n"
    if missing:
        text += "\nNot finished / failed (not averaged in):\n" + "\n".join(f"- {m}" for m in missing) + "\n"
    return text


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, write ``summary.md`` in the sweep folder and print it."""

    def __init__(self, metric: str = "test_acc1_best") -> None:
        self.metric = metric

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        text = render([sweep_dir], self.metric)
        atomic_write_bytes(sweep_dir / "summary.md", text.encode())
        print("\n" + text + f"\n(table written to {sweep_dir / 'summary.md'})", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        raise SystemExit(2)
    metric = "test_acc1_best"
    if args[0].startswith("--metric="):
        metric, args = args[0].split("=", 1)[1], args[1:]
    print(render(args, metric))


if __name__ == "__main__":
    main()
