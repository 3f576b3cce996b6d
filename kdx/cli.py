"""Command line: ``python -m kdx [overrides]`` / ``kdx [overrides]`` (Hydra)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kdx.errors import KdxError
from kdx.resolvers import register_resolvers
from kdx.sweep.launch import check_launch, export_submitit_ranks


def config_dir() -> str:
    """kdx's configs: ``kdx/conf`` in an installed package (the wheel ships them there), else the checkout's
    ``conf/`` beside the package (an editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"kdx's configs are missing: neither {here / 'conf'} nor {here.parent / 'conf'} exists")


CONFIG_DIR = config_dir()
log = logging.getLogger("kdx")

register_resolvers()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    export_submitit_ranks()  # before Lightning starts: submitit's local tasks become DDP ranks
    from kdx.run import run  # Lightning and torch load here, not when a sweep is only being composed

    try:
        check_launch(cfg, HydraConfig.get() if HydraConfig.initialized() else None)
        results = run(cfg)
    except (KdxError, FileNotFoundError) as e:
        log.error("%s: %s", type(e).__name__, e)
        raise SystemExit(1) from None
    return results.get("val_acc1_best")  # what a Hydra sweeper (e.g. Optuna) optimises


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    sys.exit(main())
