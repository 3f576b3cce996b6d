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


def _in_sweep() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().get("mode") == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One job. A job that fails has written its record (kdx.run.run); in a sweep the next job then starts (the
    sweep's report lists the failure and the sweep exits with status 1 at its end), a single run exits with 1.
    Ctrl-C and SIGTERM stop the whole sweep."""
    export_submitit_ranks()  # before Lightning starts: submitit's local tasks become DDP ranks
    from kdx.run import run  # Lightning and torch load here, not when a sweep is only being composed

    try:
        check_launch(cfg, HydraConfig.get() if HydraConfig.initialized() else None)
        results = run(cfg)
    except (KdxError, FileNotFoundError) as e:
        log.error("%s: %s", type(e).__name__, e)
        if _in_sweep():
            return None
        raise SystemExit(1) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception:
        log.exception("The job failed with an unexpected error (its record is in its results.json):")
        if _in_sweep():
            return None
        raise SystemExit(1) from None
    if results.get("status") != "complete":  # resume=auto found a failed job and did not retry it
        if not _in_sweep():
            raise SystemExit(1)
        return None
    return results.get("val_acc1_best")  # what a Hydra sweeper (e.g. Optuna) optimises


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    sys.exit(main())
