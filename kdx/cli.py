"""Command line: ``python -m kdx [overrides]`` / ``kdx [overrides]`` (Hydra)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path


import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from kdx.config import register_resolvers  # noqa: E402

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("kdx")

register_resolvers()


def _known_errors() -> tuple[type[BaseException], ...]:
    from kdx.callbacks import LoggerStartError
    from kdx.config import ConfigError
    from kdx.io import CheckpointError
    from kdx.module import NonFiniteLossError

    return (ConfigError, CheckpointError, NonFiniteLossError, LoggerStartError, FileNotFoundError)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from kdx.sweep import check_launch, export_submitit_ranks

    export_submitit_ranks()  # before Lightning is imported: submitit's local tasks become DDP ranks
    from kdx.runner import run

    try:
        check_launch(cfg, HydraConfig.get() if HydraConfig.initialized() else None)
        results = run(cfg)
    except _known_errors() as e:
        log.error("%s: %s", type(e).__name__, e)
        raise SystemExit(1) from None
    return results.get("val_acc1_best")  # what a Hydra sweeper (e.g. Optuna) optimises


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    sys.exit(main())
