"""The data-free comparison in one command: ``python -m kdx.bench_datafree`` (NAYER against DeepInversion, CMI, Fast
and DAFL on one teacher, one budget and one clock).

For each method, one resumable Hydra multirun over the seeds (``resume=auto``, ``sweep_name=<name>-<method>``:
re-running the command skips finished jobs and resumes cut ones), all on the experiment of the budget
(``experiment=datafree_bench/cifar100``: CIFAR-100 copy, a resnet20 teacher trained once and stored, resnet8 student,
20 epochs of 50 student steps of batch 128) with the method's synthesis budget below. Then one report
(:mod:`kdx.report`: the accuracy table, the curves, ``synthesis_cost.png``) in ``multirun/<name>/``, with a cost
section: per method the synthesis wall-clock, steps and images, the accuracy every method has reached at the same
synthesis time (the shortest total synthesis time among the methods), and the synthesis time each needs to reach
a common accuracy (the lowest best accuracy of any run, which every run reaches, and 90 % of NAYER's best), with the ratio to NAYER.

The CPU budget (``--budget cpu``): every official per-batch synthesis step count divided by 10 (NAYER 40 → 4 per
loop, DeepInversion 1000 → 100, CMI 200 → 20; Fast keeps its official 2; DAFL keeps its official 5 student steps
per generator step: 10 rounds of 1 + 5), synthesis batch 128 (official 256, NAYER 400), generators at ngf 32 (64),
epoch-counted schedules scaled from the official epochs to 20 (NAYER warm-up 20/120 → 3 and g_life 10/120 → 2;
Fast warm-up 20/220 → 2 and its reset at call 120 + warm-up → 11 + warm-up); everything else the official defaults
(``conf/distill/<method>.yaml``). ``--budget tiny``: synthetic data, seconds per run, to see the pipeline work.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

from kdx.report import Run, load, markdown, scan, write

METHODS = ("nayer", "deepinv", "cmi", "fast", "dafl")
BUDGETS: dict[str, dict] = {
    "cpu": {
        "experiment": "datafree_bench/cifar100",
        "methods": {
            "nayer": ["module.warmup=3", "distill.g_steps=4", "distill.g_life=2", "distill.synthesis_batch_size=128",
                      "distill.ngf=32"],
            "deepinv": ["distill.g_steps=100", "distill.synthesis_batch_size=128"],
            "cmi": ["distill.g_steps=20", "distill.synthesis_batch_size=128", "distill.ngf=32"],
            "fast": ["module.warmup=2", "distill.synthesis_batch_size=128", "distill.ngf=32", "distill.reset_l0_at=11"],
            "dafl": ["distill.rounds=10", "distill.synthesis_batch_size=128", "distill.ngf=32"],
        },
    },
    "tiny": {
        "experiment": "datafree_bench/tiny",
        "methods": {
            "nayer": ["module.warmup=1", "distill.g_steps=2", "distill.gwp_loops=2", "distill.g_loops=1",
                      "distill.synthesis_batch_size=24", "distill.ngf=8", "distill.le_emb_size=16",
                      "distill.lte.table=cifar10", "distill.lte.check_names=false"],
            "deepinv": ["distill.g_steps=3", "distill.synthesis_batch_size=12"],
            "cmi": ["distill.g_steps=2", "distill.synthesis_batch_size=12", "distill.ngf=8", "distill.nz=16",
                    "distill.head_dim=8"],
            "fast": ["module.warmup=1", "distill.synthesis_batch_size=12", "distill.ngf=8", "distill.nz=16"],
            "dafl": ["distill.rounds=2", "distill.synthesis_batch_size=12", "distill.ngf=8", "distill.nz=16"],
        },
    },
}


def commands(budget: str, methods: list[str], seeds: str, name: str, extra: list[str]) -> list[tuple[str, list[str]]]:
    """``(method, argv)`` of each method's multirun."""
    spec = BUDGETS[budget]
    fixed = ["resume=auto", "logger=csv", "progress_bar=none"]
    return [(m, [sys.executable, "-m", "kdx", "-m", f"experiment={spec['experiment']}", f"distill={m}", f"seed={seeds}",
                 f"sweep_name={name}-{m}", *fixed, *spec["methods"][m], *extra]) for m in methods]


# ---------------------------------------------------------------------------------------------- the cost tables
def _rows(run: Run) -> list[dict]:
    return [h for h in run.data.get("history") or [] if h.get("synthesis_s_total") is not None]


def acc_at_time(run: Run, seconds: float) -> Optional[float]:
    """Val top-1 of the last epoch whose cumulative synthesis time is at most ``seconds`` (None: none is)."""
    reached = [h for h in _rows(run) if h["synthesis_s_total"] <= seconds + 1e-9]
    return float(reached[-1]["val_acc1"]) if reached else None


def time_to_acc(run: Run, acc: float) -> Optional[float]:
    """Cumulative synthesis seconds at the first epoch with val top-1 ≥ ``acc`` (None: never)."""
    for h in _rows(run):
        if float(h["val_acc1"]) >= acc:
            return float(h["synthesis_s_total"])
    return None


def _mean(values: list[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.mean(vals) if vals and len(vals) == len(values) else None


def _fmt(v: Optional[float], digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def cost_section(runs: list[Run]) -> str:
    """The markdown cost section of the data-free runs (grouped by method; each method's seeds averaged)."""
    by_method: dict[str, list[Run]] = {}
    for r in runs:
        if _rows(r):
            by_method.setdefault(r.method, []).append(r)
    if not by_method:
        return "\n## Synthesis cost\n\nNo data-free run with per-epoch cost fields.\n"
    final = {m: statistics.mean(_rows(r)[-1]["synthesis_s_total"] for r in rs) for m, rs in by_method.items()}
    best = {m: statistics.mean(max(float(h["val_acc1"]) for h in _rows(r)) for r in rs) for m, rs in by_method.items()}
    horizons = [("the shortest total", min(final.values()))]
    floor = min(max(float(h["val_acc1"]) for h in _rows(r)) for rs in by_method.values() for r in rs)
    targets = [("every run's best reaches it", floor)]
    if "nayer" in best:
        horizons.append(("NAYER's total", final["nayer"]))
        targets.append(("90% of NAYER's best", 0.9 * best["nayer"]))
    head = ["method", "n", "final val top-1", "synthesis s", "synthesis steps", "images synthesised", "student s"]
    head += [f"val top-1 at {h:.1f} s of synthesis ({label})" for label, h in horizons]
    head += [f"synthesis s to {t:.1f}% ({label})" for label, t in targets]
    if "nayer" in best:
        head.append("NAYER's synthesis s to this final top-1 (this method's s ÷ NAYER's)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    to_target = {m: [_mean([time_to_acc(r, t) for r in rs]) for _, t in targets] for m, rs in by_method.items()}
    for m in sorted(by_method, key=lambda k: (k != "nayer", k)):
        rs = by_method[m]
        last = [_rows(r)[-1] for r in rs]
        accs = [float(h["val_acc1"]) for h in last]
        acc = f"{statistics.mean(accs):.2f}" + (f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else "")
        mean = {k: statistics.mean(h[k] for h in last) for k in ("synthesis_steps_total", "images_synthesised_total",
                                                                  "student_s_total")}
        cells = [m, str(len(rs)), acc, f"{final[m]:.1f}", f"{mean['synthesis_steps_total']:.0f}",
                 f"{mean['images_synthesised_total']:.0f}", f"{mean['student_s_total']:.1f}"]
        cells += [_fmt(_mean([acc_at_time(r, h) for r in rs]), 2) for _, h in horizons]
        for i, t in enumerate(to_target[m]):
            ref = to_target.get("nayer", [None] * len(targets))[i]
            ratio = f" ({t / ref:.1f}× NAYER)" if t is not None and ref else ""
            cells.append(("not reached" if t is None else f"{t:.1f}") + ratio)
        if "nayer" in best and m == "nayer":
            cells.append("—")
        elif "nayer" in best:  # the claim's reading: as good as method m, at what fraction of its synthesis time
            t_nayer = _mean([time_to_acc(r, statistics.mean(accs)) for r in by_method["nayer"]])
            cells.append("not reached" if t_nayer is None else
                         f"{t_nayer:.1f}" + (f" ({final[m] / t_nayer:.1f}×)" if t_nayer > 0 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return ("\n## Synthesis cost\n\nWall-clock in seconds on this machine, mean over seeds. Accuracy at equal "
            "synthesis time: val top-1 of each run's last epoch whose cumulative synthesis time is within the horizon "
            "(— : its first epoch already took longer). Time to an accuracy: the cumulative synthesis time of the "
            "first epoch reaching it (\"not reached\" if a seed never does). The last column reads NAYER's claim: "
            "the synthesis time NAYER needs to reach each method's final accuracy (mean over seeds), and how many "
            "times longer the method itself synthesised. Curves: synthesis_cost.png.\n\n"
            + "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- entry point
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdx.bench_datafree", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all five)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--name", default=None, help="sweep name prefix (default: bench-datafree[-tiny])")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and the budget only")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: (re)write the report of the sweeps already in multirun/<name>-<method>")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. paths.teachers=...)")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    name = args.name or ("bench-datafree" if args.budget == "cpu" else f"bench-datafree-{args.budget}")
    failed = []
    for method, argv_m in commands(args.budget, methods, args.seeds, name, list(args.overrides)):
        if not args.report_only:
            print("$ " + " ".join(argv_m[1:]), flush=True)
        if args.report_only:
            continue
        if not args.dry_run and subprocess.run(argv_m).returncode != 0:
            failed.append(method)
    if args.dry_run:
        return 0
    folders = [Path("multirun") / f"{name}-{m}" for m in methods if (Path("multirun") / f"{name}-{m}").is_dir()]
    if not folders:
        print("kdx.bench_datafree: no sweep folder was written.", file=sys.stderr)
        return 1
    out = Path("multirun") / name
    report = load(folders)
    written = write(report, out)
    runs, _ = scan(folders)
    text = markdown(report, base=out) + cost_section(runs)
    written["results.md"].write_text(text)
    print(text)
    print("Wrote " + ", ".join(str(p) for p in written.values()))
    if failed:
        print(f"Failed multiruns (re-run the same command to resume): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
