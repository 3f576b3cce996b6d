"""``python -m kdx.teachers list|show|remove``: the teacher store, listed, inspected and pruned.

    python -m kdx.teachers list                          # every stored teacher: dataset, arch, accuracy, budget
    python -m kdx.teachers show cifar100 resnet32x4      # one teacher's sidecar (teacher.json), checked by sha256
    python -m kdx.teachers remove cifar100 resnet32x4    # delete it (the next run that needs it trains it again)

``--root`` is the store (default: ``$KDX_TEACHERS``, else ``~/.kdx/teachers``: ``paths.teachers``'s default).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

from kdx.errors import CheckpointError
from kdx.paths import default_teachers_dir
from kdx.teachers.store import TeacherStore


def _row(key: str, arch: str, meta: dict[str, Any]) -> str:
    acc = meta.get("test_acc1")
    budget = meta.get("budget") or {}
    epochs = budget.get("epochs_done", meta.get("epochs"))
    return (f"{key:<28} {arch:<22} {acc if acc is None else f'{acc:6.2f}':>7} {str(epochs):>7} "
            f"{'yes' if budget.get('complete') else 'no':>9}  {meta.get('created', '')}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdx.teachers", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=default_teachers_dir(), help="the teacher store (paths.teachers)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every stored teacher")
    for name, text in (("show", "one teacher's sidecar"), ("remove", "delete one teacher")):
        q = sub.add_parser(name, help=text)
        q.add_argument("dataset", help="the dataset key (as listed: cifar100, cifar10-subset10000 ...)")
        q.add_argument("arch", help="the architecture (as listed)")
    a = p.parse_args(argv)
    store = TeacherStore(a.root)
    try:
        if a.command == "list":
            entries = store.entries()
            if not entries:
                print(f"No teachers in {store.root}.")
                return 0
            print(f"Teachers in {store.root}:")
            print(f"{'dataset':<28} {'arch':<22} {'top-1 %':>7} {'epochs':>7} {'complete':>9}  created")
            for key, arch, meta in entries:
                print(_row(key, arch, meta))
        elif a.command == "show":
            found = store.lookup(a.dataset, a.arch)
            if found is None:
                raise CheckpointError(f"No stored teacher '{a.dataset} {a.arch}' in {store.root}; "
                                      "`python -m kdx.teachers list` lists them.")
            weights, meta = found
            print(json.dumps({"weights": str(weights), **{k: v for k, v in meta.items() if k != "config"}}, indent=2,
                             default=str))
        else:
            print(f"Removed {store.remove(a.dataset, a.arch)}")
    except CheckpointError as e:
        print(f"kdx.teachers: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
