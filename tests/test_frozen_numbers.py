"""The frozen numbers: every strategy's loss terms on fixed inputs equal the committed fixture.

The fixture was written before the architecture refactor (issue 12); a refactor must leave it unchanged.
A method issue that adds a method adds its cases (``python tests/frozen_numbers.py --write``).
"""
from __future__ import annotations

import json

from hydra.utils import instantiate

from frozen_numbers import FIXTURE, compare, compute


def strategy_for(method: str, extra: list[str]):
    """The strategy ``distill=<method>`` builds from the real config (one Hydra initialisation for all cases)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONFIG_DIR

    if not GlobalHydra.instance().is_initialized():
        initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3")
    cfg = compose("config", overrides=[f"distill={method}", "data=synthetic", "data.num_classes=10", *extra])
    return instantiate(cfg.distill)


def test_every_strategy_matches_the_frozen_numbers():
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    want = json.loads(FIXTURE.read_text())
    got = compute(strategy_for)
    assert not compare(got, want), "\n".join(compare(got, want))
    assert len(want) >= 30
