"""Sweeps to paper-style results tables: ``python -m kdx.report <folder> [<folder> ...]``.

Reads every run's ``results.json`` under the folders and writes, next to the sweep (the first folder, or
``--out DIR``): ``results.md`` (the table, printed too), ``results.csv`` (tidy, one row per dataset, pair
and method), ``acc_by_method.png`` (each seed and mean ± std per method) and ``val_curves.png``
(validation top-1 per epoch, mean over seeds with a ± std band); with data-free runs, ``synthesis_cost.png``
(validation top-1 against cumulative synthesis wall-clock and synthesis steps, one line per method).

The protocol, so that every number says what it is:

- A row is a dataset and a teacher → student pair (``results.json``'s ``teacher`` and ``student``). Its
  ``baseline`` column holds the ``method=none`` runs of the same dataset and student; its ``teacher``
  column the teacher's own test top-1, once per distinct teacher checkpoint.
- A cell is the mean ± sample std of top-1 test accuracy over seeds, with n; n=1 shows the value alone.
  ``best`` is ``test_acc1_best`` (test accuracy at the best validation epoch), ``last`` is
  ``test_acc1_last``; ``--metric`` picks one or both (both: one table each).
- ``paper`` is the number the run's resolved config reports under ``paper.<method>`` (``paper.student``
  for the baseline, ``paper.teacher`` for the teacher), matched on the exact method label; Δ = ours − paper.
  Runs of one cell that carry different paper numbers are shown as a disagreement, never resolved.
- A job folder (``.hydra/`` or ``results.json``) whose run did not complete is listed under the table with
  what is missing, never averaged in.
- A seed that ran more than once in one cell counts once: the latest-started run is averaged, the cell is
  marked †, and the runs (and the config keys in which they differ) are listed under the table.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

from hydra.experimental.callback import Callback

log = logging.getLogger("kdx")

Metric = Literal["best", "last", "both"]
METRIC_KEYS: dict[str, str] = {"best": "test_acc1_best", "last": "test_acc1_last"}
METRIC_TITLES: dict[str, str] = {
    "best": "Best epoch (`test_acc1_best`: test top-1 at the best validation epoch)",
    "last": "Last epoch (`test_acc1_last`: test top-1 after the final epoch)",
}
STUDENT_TASKS = ("distill", "train")  # other records (ReffAKD stage A) are artifacts built inside a job
OUTPUT_FILES = ("results.md", "results.csv", "acc_by_method.png", "val_curves.png")


class NoResults(ValueError):
    """A folder given to the report that does not exist or holds no completed run."""


# ---------------------------------------------------------------------------------------------- collecting
@dataclass(frozen=True)
class Run:
    """One completed student run: its job folder and its ``results.json``."""

    folder: Path
    data: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.data["method"])

    def acc(self, metric: str) -> Optional[float]:
        value = self.data.get(METRIC_KEYS[metric])
        return None if value is None else float(value)

    def paper(self, key: str) -> Optional[float]:
        node = (self.data.get("config") or {}).get("paper") or {}
        value = node.get(key) if isinstance(node, dict) else None
        return None if value is None else float(value)


@dataclass(frozen=True)
class Unfinished:
    """A job folder whose run failed or has not finished: listed, never averaged in."""

    folder: Path
    reason: str


def _job_folders(folder: Path) -> list[Path]:
    """Job folders under ``folder``, skipping teachers trained inside a job (``<job>/teacher/``)."""
    found = {p.parent for p in folder.rglob(".hydra")} | {p.parent for p in folder.rglob("results.json")}
    return sorted(j for j in found if "teacher" not in j.relative_to(folder).parts)


def _progress(job: Path) -> str:
    """How far an unfinished job got, from its newest Lightning checkpoint (kdx stores the epoch history)."""
    ckpts = sorted((job / "checkpoints").glob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime))
    if not ckpts:
        return "no checkpoint saved"
    total = ""
    try:
        import yaml

        cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text()) or {}
        max_epochs = (cfg.get("trainer") or {}).get("max_epochs")
        total = f"/{int(max_epochs)}" if max_epochs is not None else ""
    except (OSError, ValueError, TypeError, AttributeError, ImportError):
        pass
    try:
        import torch

        state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
        history = (state.get("kdx") or {}).get("history") or []
        epoch = history[-1]["epoch"] if history else int(state["epoch"]) + 1
        return f"last epoch reached {epoch}{total} ({ckpts[-1].relative_to(job)})"
    except Exception as e:  # an unreadable checkpoint is itself worth saying
        return f"checkpoint {ckpts[-1].relative_to(job)} unreadable ({type(e).__name__})"


def scan(folders: Iterable[str | Path]) -> tuple[list[Run], list[Unfinished]]:
    """Completed student runs and unfinished job folders under ``folders`` (searched recursively)."""
    runs: list[Run] = []
    unfinished: list[Unfinished] = []
    for folder in map(Path, folders):
        for job in _job_folders(folder):
            res = job / "results.json"
            data: Optional[dict[str, Any]] = None
            problem = ""
            if not res.is_file():
                problem = "no results.json"
            else:
                try:
                    data = json.loads(res.read_text())
                except (OSError, ValueError) as e:
                    problem = f"results.json unreadable ({type(e).__name__})"
            if data is not None:
                if data.get("task") not in STUDENT_TASKS:
                    continue
                lacking = [k for k in ("method", "dataset", "student") if data.get(k) is None]
                if data.get("status") in ("failed", "interrupted"):
                    problem = (f"{data['status']}: {data.get('error')}; epochs done {data.get('epochs_done')} of "
                               f"{data.get('epochs')}; resume: {data.get('resume_command')}")
                    unfinished.append(Unfinished(job, problem))
                    continue
                if data.get("status") != "complete":
                    problem = f"status {data.get('status')!r} in results.json"
                elif lacking or all(data.get(k) is None for k in METRIC_KEYS.values()):
                    problem = "results.json lacks " + ", ".join(lacking or ["test accuracy"])
            if problem:
                unfinished.append(Unfinished(job, f"{problem}; {_progress(job)}"))
            else:
                runs.append(Run(job, data))  # type: ignore[arg-type]
    return runs, unfinished


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Duplicate:
    """A seed that ran more than once in one cell: which run was averaged, and how the runs differ."""

    where: str
    seed: Any
    folders: tuple[Path, ...]
    kept: Path
    differ: tuple[str, ...]


@dataclass
class Cell:
    """One column of one row: the runs averaged (one per seed), their accuracies and paper numbers."""

    label: str
    runs: list[Run] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=lambda: {"best": [], "last": []})
    papers: list[float] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)

    @property
    def seeds(self) -> list[Any]:
        return [r.data.get("seed") for r in self.runs]

    @property
    def epochs(self) -> list[Any]:
        """The training budgets of the averaged runs: more than one means the cell mixes budgets."""
        return sorted({r.data.get("epochs") for r in self.runs}, key=str)

    @property
    def paper(self) -> Optional[float]:
        """The paper number, only when all runs that carry one agree."""
        return self.papers[0] if len(self.papers) == 1 else None

    def stats(self, metric: str) -> tuple[Optional[float], Optional[float], int]:
        """(mean, sample std or None for n < 2, n)."""
        v = self.values[metric]
        if not v:
            return None, None, 0
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else None), len(v)

    def diff(self, metric: str) -> Optional[float]:
        mean = self.stats(metric)[0]
        return None if mean is None or self.paper is None else mean - self.paper


@dataclass
class Row:
    dataset: str
    teacher: Optional[str]
    student: str
    cells: dict[str, Cell] = field(default_factory=dict)  # "teacher", "baseline" and one per method label

    @property
    def pair(self) -> str:
        """As ``results.json`` spells it: ``<teacher>-<student>``, or the student alone for a baseline."""
        return f"{self.teacher}-{self.student}" if self.teacher else self.student

    @property
    def title(self) -> str:
        return f"{self.teacher} → {self.student}" if self.teacher else f"{self.student} (no teacher)"


@dataclass
class Report:
    rows: list[Row]
    methods: list[str]
    unfinished: list[Unfinished]
    sources: list[Path]

    @property
    def duplicates(self) -> list[Duplicate]:
        seen: dict[tuple, Duplicate] = {}
        for row in self.rows:
            for cell in row.cells.values():
                for d in cell.duplicates:
                    seen.setdefault((d.where, str(d.seed), d.folders), d)
        return list(seen.values())

    def protocols(self) -> dict[str, int]:
        """How the best epoch was selected, over all averaged runs (a held-out split or the test split)."""
        counts: dict[str, int] = {}
        runs = {id(r): r for row in self.rows for c in row.cells.values() for r in c.runs}
        for r in runs.values():
            key = str(r.data.get("best_selected_on") or "not recorded")
            counts[key] = counts.get(key, 0) + 1
        return counts


def _config_differences(runs: list[Run], limit: int = 4) -> tuple[str, ...]:
    """Config keys in which duplicate runs differ (paths and output folders left out): a sweep over a
    hyper-parameter at a fixed seed shows up here, a plain rerun shows nothing."""
    from kdx.io import flatten  # here: kdx.io imports torch, which a report does not otherwise need

    flats = [flatten(r.data.get("config") or {}) for r in runs]
    keys = sorted(set().union(*flats))
    skip = ("paths.", "hydra.", "logger.", "ckpt_path")
    diff = [k for k in keys if not k.startswith(skip) and "output_dir" not in k and "save_dir" not in k
            and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
    shown = tuple(f"{k} ({' vs '.join(str(f.get(k)) for f in flats)})" for k in diff[:limit])
    return shown + ((f"… {len(diff) - limit} more",) if len(diff) > limit else ())


def _fill(cell: Cell, runs: list[Run], where: str) -> None:
    """Put ``runs`` into ``cell``: one run per seed (the latest started), the rest recorded as duplicates."""
    by_seed: dict[str, list[Run]] = {}
    for r in runs:
        by_seed.setdefault(json.dumps(r.data.get("seed")), []).append(r)
    for group in by_seed.values():
        group.sort(key=lambda r: (str(r.data.get("started") or ""), str(r.folder)))
        kept = group[-1]
        cell.runs.append(kept)
        if len(group) > 1:
            cell.duplicates.append(Duplicate(where, kept.data.get("seed"), tuple(r.folder for r in group),
                                             kept.folder, _config_differences(group)))
    cell.runs.sort(key=lambda r: (str(r.data.get("seed")), str(r.folder)))
    for metric in METRIC_KEYS:
        cell.values[metric] = [a for a in (r.acc(metric) for r in cell.runs) if a is not None]


def _papers(runs: Iterable[Run], key: str) -> list[float]:
    return sorted({p for p in (r.paper(key) for r in runs) if p is not None})


def _teacher_cell(runs: list[Run]) -> Cell:
    """The teacher's measured top-1, once per distinct teacher checkpoint (every run of a pair logs it)."""
    cell = Cell("teacher", papers=_papers(runs, "teacher"))
    accs: dict[str, float] = {}
    for r in runs:
        acc = r.data.get("teacher_acc1")
        if acc is None:
            continue
        info = r.data.get("teacher_info") or {}
        ident = str(info.get("sha256") or info.get("ckpt") or info.get("artifact") or acc)
        accs.setdefault(ident, float(acc))
    cell.values = {m: list(accs.values()) for m in METRIC_KEYS}
    return cell


def _table_teacher(r: Run) -> bool:
    """A run whose teacher is a soft-label table (ReffAKD), not a network: it has no teacher → student pair."""
    info = r.data.get("teacher_info") or {}
    return r.data.get("teacher_network") is False or "table_sha256" in info


def build(runs: list[Run], unfinished: list[Unfinished], sources: Iterable[Path] = ()) -> Report:
    """Rows per (dataset, teacher, student). Baselines, and runs whose teacher is a label table (ReffAKD:
    no teacher network), join every row of their dataset and student; alone, they get their own row."""
    distilled: dict[tuple[str, str, str], dict[str, list[Run]]] = {}
    baselines: dict[tuple[str, str], list[Run]] = {}
    tables: dict[tuple[str, str], dict[str, list[Run]]] = {}
    for r in runs:
        ds, st = str(r.data["dataset"]), str(r.data["student"])
        if r.method == "none":
            baselines.setdefault((ds, st), []).append(r)
        elif _table_teacher(r):
            tables.setdefault((ds, st), {}).setdefault(r.method, []).append(r)
        else:
            teacher = str(r.data.get("teacher") or "?")
            distilled.setdefault((ds, teacher, st), {}).setdefault(r.method, []).append(r)
    for (ds, st), by_method in tables.items():  # no network-teacher row to join: a row of their own
        if not any(k[0] == ds and k[2] == st for k in distilled):
            for method, rs in by_method.items():
                teacher = str(rs[0].data.get("teacher") or "?")
                distilled.setdefault((ds, teacher, st), {})[method] = rs
            tables[(ds, st)] = {}
    keys: list[tuple[str, Optional[str], str]] = list(distilled)
    keys += [(ds, None, st) for ds, st in baselines if not any(k[0] == ds and k[2] == st for k in distilled)]
    rows = []
    for ds, teacher, st in sorted(keys, key=lambda k: (k[0], k[1] is None, k[1] or "", k[2])):
        row = Row(ds, teacher, st)
        by_method = distilled.get((ds, teacher or "", st), {}) if teacher else {}
        row_runs = [r for rs in by_method.values() for r in rs if not _table_teacher(r)]
        if row_runs:
            row.cells["teacher"] = _teacher_cell(row_runs)
        if (ds, st) in baselines:
            base = baselines[(ds, st)]
            cell = row.cells["baseline"] = Cell("baseline", papers=_papers(base + row_runs, "student"))
            _fill(cell, base, f"{ds} {st} baseline")
        joined = dict(tables.get((ds, st), {})) if teacher else {}
        for method, rs in sorted({**joined, **by_method}.items()):
            cell = row.cells[method] = Cell(method, papers=_papers(rs, method))
            _fill(cell, rs, f"{ds} {row.title} {method}")
        rows.append(row)
    methods = sorted({m for row in rows for m in row.cells if m not in ("teacher", "baseline")})
    return Report(rows, methods, unfinished, list(sources))


# ---------------------------------------------------------------------------------------------- writing
def format_cell(cell: Optional[Cell], metric: str) -> str:
    """``mean ± std (n=k)`` (the value alone for n=1), † for a duplicated seed, then the paper and Δ."""
    if cell is None:
        return "–"
    mean, std, n = cell.stats(metric)
    if mean is None:
        text = "–"
    elif n == 1:
        text = f"{mean:.2f}"
    else:
        text = f"{mean:.2f} ± {std:.2f} (n={n})"
    if cell.duplicates:
        text += " †"
    if len(cell.epochs) > 1:  # averaged, but never silently: the reader sees the budgets differ
        text += "; mixes epochs " + "/".join(str(e) for e in cell.epochs)
    if len(cell.papers) > 1:
        text += "; paper: runs disagree (" + ", ".join(f"{p:.2f}" for p in cell.papers) + ")"
    elif cell.paper is not None:
        diff = cell.diff(metric)
        text += f"; paper {cell.paper:.2f}" + ("" if diff is None else f" ({diff:+.2f})")
    return text


def markdown_table(report: Report, metric: str) -> str:
    header = ["dataset", "teacher → student", "teacher", "baseline", *report.methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report.rows:
        cells = [format_cell(row.cells.get(c), metric) for c in ("teacher", "baseline", *report.methods)]
        lines.append("| " + " | ".join([row.dataset, row.title, *cells]) + " |")
    return "\n".join(lines)


def _rel(path: Path, base: Optional[Path]) -> str:
    if base is not None:
        try:
            return str(path.resolve().relative_to(base.resolve())) or "."
        except ValueError:
            pass
    return str(path)


def markdown(report: Report, metric: Metric = "both", base: Optional[Path] = None) -> str:
    """The whole ``results.md``: one table per metric, then unfinished runs and duplicated seeds."""
    metrics = ["best", "last"] if metric == "both" else [metric]
    out = [
        "# Results: " + ", ".join(str(s) for s in report.sources),
        "",
        "Top-1 test accuracy (%): mean ± sample std over seeds (n = seeds; n=1 shows the value). "
        "`paper` is the run config's `paper.<method>` (`paper.student` for the baseline, `paper.teacher` for "
        "the teacher); the number in brackets is ours − paper. The teacher column is its own test top-1.",
    ]
    for m in metrics:
        out += ["", f"## {METRIC_TITLES[m]}", "", markdown_table(report, m)]
        if m == "best":
            protocols = report.protocols()
            out += ["", "Best epoch selected on: " + "; ".join(f"{k} ({v} runs)" for k, v in protocols.items())]
    dups = report.duplicates
    if dups:
        out += ["", "## Duplicated seeds (†)", "",
                "A seed that ran more than once counts once: the latest-started run is averaged."]
        for d in dups:
            runs = ", ".join(f"`{_rel(f, base)}`" for f in d.folders)
            differ = "; configs differ in " + ", ".join(d.differ) if d.differ else "; same config"
            out.append(f"- {d.where}, seed {d.seed}: {runs}; averaged `{_rel(d.kept, base)}`{differ}")
    if report.unfinished:
        out += ["", "## Not finished or failed (not averaged in)", ""]
        out += [f"- `{_rel(u.folder, base)}`: {u.reason}" for u in report.unfinished]
    return "\n".join(out) + "\n"


CSV_COLUMNS = ["dataset", "teacher", "student", "pair", "column", "method",
               "best_mean", "best_std", "best_n", "last_mean", "last_std", "last_n",
               "paper", "diff_best", "diff_last", "paper_values", "seeds", "duplicate_seeds"]


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None or math.isnan(x) else round(x, 4)


def csv_text(report: Report) -> str:
    """Tidy rows, one per (dataset, pair, column). The teacher row repeats its accuracy as best and last;
    empty fields are missing values (std for n=1, paper where none is configured or runs disagree)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        for col, cell in row.cells.items():
            rec: dict[str, Any] = {"dataset": row.dataset, "teacher": row.teacher or "", "student": row.student,
                                   "pair": row.pair, "column": col,
                                   "method": {"teacher": "teacher", "baseline": "none"}.get(col, col)}
            for m in METRIC_KEYS:
                mean, std, n = cell.stats(m)
                rec.update({f"{m}_mean": _round(mean), f"{m}_std": _round(std), f"{m}_n": n,
                            f"diff_{m}": _round(cell.diff(m))})
            rec["paper"] = cell.paper
            rec["paper_values"] = ";".join(f"{p:g}" for p in cell.papers)
            rec["seeds"] = ";".join(str(s) for s in cell.seeds)
            rec["duplicate_seeds"] = ";".join(str(d.seed) for d in cell.duplicates)
            writer.writerow(rec)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- plots
def _figure(n: int, width: float = 5.0, height: float = 3.8):
    """A figure with ``n`` axes, drawn without pyplot (no global backend state inside a Hydra process)."""
    from matplotlib.figure import Figure

    ncols = min(3, max(1, n))
    nrows = math.ceil(max(1, n) / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes


def _save(fig, path: Path) -> None:
    from kdx.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _columns(row: Row) -> list[Cell]:
    return [c for k, c in row.cells.items() if k != "teacher"]


def plot_accuracy(report: Report, path: Path, metric: Metric = "both") -> None:
    """Each seed's accuracy as a point, mean ± std as a bar, per method; one panel per pair."""
    from matplotlib.lines import Line2D

    series = [("best", "o", "tab:blue", -0.15), ("last", "s", "tab:orange", 0.15)] if metric == "both" else \
        [(metric, "o", "tab:blue", 0.0)]
    fig, axes = _figure(len(report.rows))
    for ax, row in zip(axes, report.rows):
        cols = _columns(row)
        for i, cell in enumerate(cols):
            for m, marker, color, off in series:
                vals = cell.values[m]
                if not vals:
                    continue
                spread = [off + 0.08 * (j - (len(vals) - 1) / 2) / max(1, len(vals) - 1) for j in range(len(vals))]
                ax.scatter([i + s for s in spread], vals, marker=marker, s=16, color=color, alpha=0.7, zorder=3)
                mean, std, _ = cell.stats(m)
                ax.errorbar([i + off], [mean], yerr=[std or 0.0], fmt="_", color="black", markersize=14,
                            capsize=4, zorder=4)
            if cell.paper is not None:
                ax.scatter([i], [cell.paper], marker="x", s=40, color="tab:red", zorder=5)
        teacher = row.cells.get("teacher")
        if teacher is not None and teacher.values["best"]:
            ax.axhline(statistics.mean(teacher.values["best"]), ls="--", lw=1, color="gray")
        ax.set_xticks(range(len(cols)), [c.label for c in cols], rotation=30, ha="right")
        ax.set_xlim(-0.6, len(cols) - 0.4)
        ax.set_title(f"{row.dataset}: {row.title}", fontsize=9)
        ax.set_ylabel("top-1 test accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    handles = [Line2D([], [], ls="", marker=mk, color=c, label=f"{m} epoch, each seed") for m, mk, c, _ in series]
    handles.append(Line2D([], [], ls="", marker="_", markersize=14, color="black", label="mean ± std"))
    if any(c.paper is not None for row in report.rows for c in _columns(row)):  # a legend entry only for what is drawn
        handles.append(Line2D([], [], ls="", marker="x", color="tab:red", label="paper"))
    if any((row.cells.get("teacher") is not None and row.cells["teacher"].values["best"]) for row in report.rows):
        handles.append(Line2D([], [], ls="--", color="gray", label="teacher"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 2 + min(3, len(axes))), fontsize=8)
    _save(fig, path)


def _curve(runs: list[Run]) -> tuple[list[int], list[float], list[float]]:
    """Epochs, mean and std (0 where fewer than two seeds reached the epoch) of val top-1 over runs."""
    per_epoch: dict[int, list[float]] = {}
    for r in runs:
        for h in r.data.get("history") or []:
            if h.get("epoch") is not None and h.get("val_acc1") is not None:
                per_epoch.setdefault(int(h["epoch"]), []).append(float(h["val_acc1"]))
    epochs = sorted(per_epoch)
    means = [statistics.mean(per_epoch[e]) for e in epochs]
    stds = [statistics.stdev(per_epoch[e]) if len(per_epoch[e]) > 1 else 0.0 for e in epochs]
    return epochs, means, stds


def plot_curves(report: Report, path: Path) -> None:
    """Validation top-1 per epoch (``history`` rows' ``val_acc1``), mean over seeds ± std; one panel per pair."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(report.rows))
    for ax, row in zip(axes, report.rows):
        no_history = []
        for cell in _columns(row):
            epochs, means, stds = _curve(cell.runs)
            if not epochs:
                no_history.append(cell.label)
                continue
            (line,) = ax.plot(epochs, means, marker="o", markersize=2.5, lw=1.2,
                              label=f"{cell.label} (n={len(cell.runs)})")
            if any(stds):
                ax.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                color=line.get_color(), alpha=0.2, lw=0)
        teacher = row.cells.get("teacher")
        if teacher is not None and teacher.values["best"]:
            ax.axhline(statistics.mean(teacher.values["best"]), ls="--", lw=1, color="gray", label="teacher")
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no per-epoch history", ha="center", va="center", transform=ax.transAxes)
        if no_history and ax.lines:
            ax.text(0.01, 0.01, "no history: " + ", ".join(no_history), fontsize=7, transform=ax.transAxes)
        ax.set_title(f"{row.dataset}: {row.title}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
    _save(fig, path)


def _cost_curve(runs: list[Run], x_key: str) -> tuple[list[float], list[float]]:
    """Per epoch reached by every run: the mean over runs of ``x_key`` (a running total) and of val top-1."""
    rows = [{h["epoch"]: h for h in r.data.get("history") or [] if h.get(x_key) is not None} for r in runs]
    epochs = sorted(set.intersection(*(set(r) for r in rows))) if rows else []
    return ([statistics.mean(float(r[e][x_key]) for r in rows) for e in epochs],
            [statistics.mean(float(r[e]["val_acc1"]) for r in rows) for e in epochs])


def plot_synthesis_cost(report: Report, path: Path) -> bool:
    """Data-free runs: val top-1 against cumulative synthesis seconds and synthesis steps (history's
    ``synthesis_s_total``, ``synthesis_steps_total``), mean over seeds, one line per method; False if none."""
    rows = [(row, cells) for row in report.rows
            if (cells := [c for c in _columns(row) if c.runs and _cost_curve(c.runs, "synthesis_s_total")[0]])]
    if not rows:
        return False
    fig, axes = _figure(2 * len(rows))
    for i, (row, cells) in enumerate(rows):
        for ax, key, label in ((axes[2 * i], "synthesis_s_total", "synthesis wall-clock (s)"),
                               (axes[2 * i + 1], "synthesis_steps_total", "synthesis optimiser steps")):
            for cell in cells:
                xs, ys = _cost_curve(cell.runs, key)
                ax.plot(xs, ys, marker="o", markersize=2.5, lw=1.2, label=f"{cell.label} (n={len(cell.runs)})")
            ax.set_xlabel(label)
            ax.set_ylabel("validation top-1 (%)")
            ax.set_title(f"{row.dataset}: {row.title}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------------------------- entry points
def load(folders: Iterable[str | Path]) -> Report:
    """The report of ``folders``; a folder that does not exist or has no completed run raises NoResults."""
    folders = [Path(f) for f in folders]
    runs: list[Run] = []
    unfinished: list[Unfinished] = []
    for folder in folders:
        if not folder.is_dir():
            raise NoResults(f"{folder}: no such folder.")
        r, u = scan([folder])
        if not r:
            listed = "".join(f"\n  {x.folder}: {x.reason}" for x in u)
            raise NoResults(f"{folder}: no completed results.json found under it (give a sweep folder, "
                            "multirun/<date>/<time>, or a run folder)." +
                            (f" Unfinished or failed jobs:{listed}" if listed else ""))
        runs += r
        unfinished += u
    return build(runs, unfinished, folders)


def write(report: Report, out: str | Path, metric: Metric = "both", plots: bool = True) -> dict[str, Path]:
    """Write ``results.md``, ``results.csv`` and (matplotlib permitting) the two PNGs into ``out``."""
    from kdx.io import atomic_write_bytes  # imports torch: not paid by `import kdx.summary` in every Hydra job

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in OUTPUT_FILES}
    atomic_write_bytes(paths["results.md"], markdown(report, metric, base=out).encode())
    atomic_write_bytes(paths["results.csv"], csv_text(report).encode())
    written = {k: paths[k] for k in ("results.md", "results.csv")}
    if plots:
        try:
            plot_accuracy(report, paths["acc_by_method.png"], metric)
            plot_curves(report, paths["val_curves.png"])
            written.update({k: paths[k] for k in ("acc_by_method.png", "val_curves.png")})
            if plot_synthesis_cost(report, out / "synthesis_cost.png"):
                written["synthesis_cost.png"] = out / "synthesis_cost.png"
        except ImportError as e:  # matplotlib is the optional extra kdx[report]
            log.warning("Plots skipped (%s): pip install 'kdx[report]' for matplotlib.", e)
    return written


def normalise_metric(metric: str) -> Metric:
    """``best``/``last``/``both``; the old ``kdx.summary`` spelling (``test_acc1_best``) is accepted too."""
    m = {v: k for k, v in METRIC_KEYS.items()}.get(metric, metric)
    if m not in ("best", "last", "both"):
        raise ValueError(f"metric={metric!r}: use best, last or both.")
    return m  # type: ignore[return-value]


class SweepReport(Callback):
    """Hydra callback: when a multirun ends, write the report into the sweep folder and say where it is."""

    def __init__(self, metric: str = "both", plots: bool = True) -> None:
        self.metric = normalise_metric(metric)
        self.plots = plots

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        try:
            report = load([sweep_dir])
        except NoResults as e:
            print(f"\nNo results table: {e}", flush=True)
            return
        written = write(report, sweep_dir, self.metric, self.plots)
        print("\n" + markdown(report, self.metric, base=sweep_dir), flush=True)
        others = ", ".join(p.name for k, p in written.items() if k != "results.md")
        print(f"Results table: {written['results.md']} (also {others})", flush=True)
        if report.unfinished:  # a sweep with failed jobs went on to its end; its exit status says so
            print(f"{len(report.unfinished)} job(s) did not complete (listed under the table).", flush=True)
            raise SystemExit(1)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdx.report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="sweep or run folders, searched recursively")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the first folder)")
    parser.add_argument("--metric", default="both", choices=["best", "last", "both"],
                        help="test_acc1_best, test_acc1_last, or one table each (default)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    args = parser.parse_args(argv)
    try:
        report = load(args.folders)
    except NoResults as e:
        print(f"kdx.report: {e}", file=sys.stderr)
        return 2
    out = args.out or args.folders[0]
    written = write(report, out, args.metric, plots=not args.no_plots)
    print(markdown(report, args.metric, base=out))
    print("Wrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
