"""Skip and resume (``resume=auto``): a job with complete results is skipped, an interrupted one continues
from ``checkpoints/last.ckpt``; a fingerprint of the job's config, stored beside its results, makes sure a
folder is only ever reused by the config that made it. Called at the start of every run (:mod:`kdx.run`).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from kdx.config import resolved
from kdx.dist import is_rank_zero
from kdx.errors import ConfigError
from kdx.io import atomic_write_json, flatten
from kdx.sweep.folders import check_resume, excluded

log = logging.getLogger("kdx")

FINGERPRINT_FILE = "config_fingerprint.json"
# Keys that may differ between two runs of the same experiment: where things are, how progress is shown,
# where it is logged, and how the run was started. Everything else must match for a folder to be reused.
FINGERPRINT_EXCLUDE = (
    "paths", "ckpt_path", "resume", "retry_failed", "sweep_name", "callbacks.progress_bar", "logger", "hydra",
    "trainer.enable_progress_bar", "data.root", "data.npz_path", "data.cache_dir",
)


def fingerprint_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config without the keys in :data:`FINGERPRINT_EXCLUDE`, as a flat ``{dotted key: value}``."""
    if isinstance(cfg, DictConfig):
        container = OmegaConf.to_container(resolved(cfg), resolve=True)
    else:
        container = dict(cfg)
    flat = {k: v for k, v in sorted(flatten(container).items()) if not excluded(k, FINGERPRINT_EXCLUDE)}
    return json.loads(json.dumps(flat, default=str))  # as it reads back from the file (lists, str for odd types)


def fingerprint_digest(flat: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 12) -> list[str]:
    missing = object()
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            show = lambda v: "(absent)" if v is missing else json.dumps(v, default=str)  # noqa: E731
            diffs.append(f"{key}: {show(a)} → {show(b)}")
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
    return diffs


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _stored_fingerprint(out: Path) -> Optional[dict[str, Any]]:
    """The folder's fingerprint file, or one computed from the config recorded in its results.json."""
    stored = _read_json(out / FINGERPRINT_FILE)
    if stored and "config" in stored:
        return stored["config"]
    results = _read_json(out / "results.json")
    if results and isinstance(results.get("config"), dict):
        return fingerprint_config(results["config"])
    return None


ATTEMPT_FILES = ("results.json", "csv", "tensorboard", "wandb")


def keep_earlier_attempt(out: Path) -> Optional[Path]:
    """Move an earlier attempt's record and logs (results.json, even unreadable; csv/, tensorboard/, wandb/) into
    ``attempts/<k>/`` so that a new attempt in the same folder destroys nothing (a logger would delete them)."""
    present = [name for name in ATTEMPT_FILES if (out / name).exists()]
    if not present:
        return None
    k = 1
    while (out / "attempts" / str(k)).exists():
        k += 1
    dest = out / "attempts" / str(k)
    dest.mkdir(parents=True)
    for name in present:
        (out / name).rename(dest / name)
    note = "unreadable results.json, " if "results.json" in present and _read_json(dest / "results.json") is None else ""
    log.warning("Kept the earlier attempt's %s%s in %s (resume=auto does not overwrite them).", note,
                ", ".join(present), dest)
    return dest


def prepare_job(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """The resume/skip step before anything is built.

    Always: check ``resume=``, write the config fingerprint into the job folder (rank 0), after checking that
    a folder which already holds a run (resume=auto) was made by the same config. With ``resume=auto``:
    complete ``results.json`` → return it (the caller skips the job); a ``failed`` record → return it too unless
    ``retry_failed=true`` (a failure that repeats does not block every re-run); else the earlier attempt's record
    and logs move to ``attempts/<k>/`` and, with ``checkpoints/last.ckpt`` and no ``ckpt_path``, ``cfg.ckpt_path``
    is set to it (the results record it as ``resumed_from``). With ``resume=never`` into a folder that holds an
    earlier attempt (``hydra.run.dir=`` or a failed run's resume command) its record and logs move aside too.
    """
    mode = check_resume(cfg.get("resume", "never"))
    out = Path(str(cfg.paths.output_dir))
    flat = fingerprint_config(cfg)
    last = out / "checkpoints" / "last.ckpt"
    results_path = out / "results.json"
    if mode == "auto" and (results_path.is_file() or last.is_file() or (out / FINGERPRINT_FILE).is_file()):
        old = _stored_fingerprint(out)
        if old is None:
            raise ConfigError(
                f"resume=auto: the job folder {out} holds a run (checkpoints or results) but no record of its config "
                f"({FINGERPRINT_FILE} or the config in results.json), so kdx cannot tell whether it is this experiment. "
                "Name another folder with sweep_name=<new name> (or hydra.run.dir=...), or delete the folder to start "
                "it again."
            )
        if fingerprint_digest(old) != fingerprint_digest(flat):
            diffs = "\n  ".join(_differences(old, flat))
            raise ConfigError(
                f"resume=auto: the job folder {out} holds a run of a different config, so it is neither reused nor "
                f"overwritten. Differences (folder → this run):\n  {diffs}\n"
                "Give this experiment its own folder with sweep_name=<new name>, or delete the folder to run it again "
                "with the new config (resume=never writes to a new timestamped folder instead)."
            )
        results = _read_json(results_path)
        status = (results or {}).get("status")
        if status == "complete":
            log.info("skipping: complete results in %s (resume=auto)", results_path)
            return results
        if status == "failed" and not cfg.get("retry_failed"):
            log.info("skipping: the job failed before (%s, %s); retry_failed=true runs it again (resume=auto)",
                     results.get("error"), results_path)
            return results
        if is_rank_zero():
            keep_earlier_attempt(out)
        if last.is_file() and not cfg.get("ckpt_path"):
            log.info("resuming from %s (resume=auto)", last)
            with read_write(cfg), open_dict(cfg):
                cfg.ckpt_path = str(last)
    elif is_rank_zero():  # resume=never into a folder that holds a run (hydra.run.dir=..., a resume command)
        keep_earlier_attempt(out)
    if is_rank_zero():
        record = {"sha256": fingerprint_digest(flat), "created": _dt.datetime.now().isoformat(timespec="seconds"),
                  "excluded": list(FINGERPRINT_EXCLUDE), "config": flat}
        if mode == "never" or _read_json(out / FINGERPRINT_FILE) is None:
            atomic_write_json(out / FINGERPRINT_FILE, record)
    return None

