"""The old name of :mod:`kdx.report`, kept so that existing callers and configs keep working.

``conf/hydra/default.yaml`` names ``kdx.summary.SweepSummary`` as the sweep-end callback; it is now
:class:`kdx.report.SweepReport` (results.md, results.csv and plots in the sweep folder). ``collect``
returns what it did; ``table`` and ``render`` still return a markdown table and the printed text, now in
kdx.report's layout (pair rows, paper numbers, a results.json without test accuracy listed as failed). ``python -m kdx.summary <folder>...`` still only prints; ``python -m kdx.report`` also writes.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from kdx.report import NoResults, Run, build, collect, load, markdown, markdown_table, normalise_metric
from kdx.report import SweepReport as SweepSummary

__all__ = ["SweepSummary", "collect", "table", "render", "main"]


def table(results: list[dict[str, Any]], metric: str = "test_acc1_best") -> str:
    """The markdown table of completed ``results`` (dicts as in results.json) for one metric."""
    m = normalise_metric(metric)
    report = build([Run(Path(str(r.get("output_dir") or "?")), r) for r in results], [])
    return "\n\n".join(markdown_table(report, x) for x in (["best", "last"] if m == "both" else [m]))


def render(folders: list[str | Path], metric: str = "test_acc1_best") -> str:
    """The table of ``folders`` with the unfinished runs under it, as printed at the end of a sweep."""
    return markdown(load(folders), normalise_metric(metric))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        raise SystemExit(2)
    metric = "test_acc1_best"
    if args[0].startswith("--metric="):
        metric, args = args[0].split("=", 1)[1], args[1:]
    try:
        print(render(args, metric))
    except NoResults as e:
        print(f"kdx.summary: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
