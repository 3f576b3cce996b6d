"""The frozen numbers: every strategy's loss terms on fixed inputs equal the committed fixture.

The fixture was written before the architecture refactor (issue 12); a refactor must leave it unchanged.
A method issue that adds a method adds its cases (``python tests/frozen_numbers.py --write``).
"""
from __future__ import annotations

import json

from hydra.utils import instantiate

from conftest import compose_cfg
from frozen_numbers import FIXTURE, compare, compute


def strategy_for(method: str, extra: list[str]):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_cfg([f"distill={method}", "data=synthetic", "data.num_classes=10", *extra], Path(tmp))
    return instantiate(cfg.distill)


def test_every_strategy_matches_the_frozen_numbers():
    want = json.loads(FIXTURE.read_text())
    got = compute(strategy_for)
    assert not compare(got, want), "\n".join(compare(got, want))
    assert len(want) >= 30
