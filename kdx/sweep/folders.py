"""Folder names of runs and sweeps (Hydra resolvers; ``conf/hydra/default.yaml`` says where each is used).

``resume=auto`` makes every job's folder a function of the command line, not of the clock, so re-running a
killed sweep finds its jobs again (:mod:`kdx.sweep.resume` then skips or resumes them). This module is
imported when the config is composed: no torch here.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Optional

from kdx.errors import ConfigError

RESUME_MODES = ("never", "auto")
DEFAULT_NAME = "default"  # the folder of a run (or sweep) without any override


def check_resume(value: Any) -> str:
    if value not in RESUME_MODES:
        raise ConfigError(f"resume={value!r} is not one of {', '.join(RESUME_MODES)} "
                          "(never: a new timestamped folder per run; auto: a folder named by the overrides, "
                          "complete jobs skipped, interrupted ones resumed).")
    return str(value)


def _override_key(text: str) -> str:
    key = text.split("=", 1)[0].strip()
    return key.lstrip("+~")


def excluded(key: str, exclude: Iterable[str]) -> bool:
    return any(key == e or key.startswith(e + ".") or key.startswith(e + "/") for e in exclude)


def name_from_overrides(overrides: Iterable[str], exclude: Iterable[str] = ()) -> str:
    """A readable folder name from command-line overrides: sorted by key (the order of the overrides
    does not change the jobs), joined with ``__``, with excluded keys (paths, logger, resume, ...) left out.

    ``distill=none,kd seed=0,1`` → ``distill=none,kd__seed=0,1``; no override → ``default``.
    """
    exclude = list(exclude)
    kept = sorted((str(o) for o in overrides if not excluded(_override_key(str(o)), exclude)), key=_override_key)
    return path_safe("__".join(kept)) if kept else DEFAULT_NAME


def sweep_dir(resume: str, sweep_name: Optional[str], overrides: Any, exclude: Any, stamp: str, *_: Any) -> str:
    """``hydra.sweep.dir``. resume=never: ``multirun/<stamp>``; resume=auto: ``multirun/<sweep_name>``, or
    ``multirun/<the command line's overrides>`` when no ``sweep_name`` is set.

    Registered with ``use_cache``: the value is computed once, in the process that starts the sweep, from the
    command line's overrides (``hydra.overrides.task``: ``distill=none,kd``). Hydra copies that cache into every
    job's config (``load_sweep_config``), where ``hydra.overrides.task`` holds only the job's own overrides;
    without the cache each job would name a different sweep folder. Further arguments are only evaluated (to
    fill the cache of :func:`fixed_keys` in that same process).
    """
    if check_resume(resume) == "never":
        return f"multirun/{stamp}"
    if sweep_name:
        return f"multirun/{sweep_name}"
    exclude = list(exclude or []) + ["resume", "sweep_name"]
    return f"multirun/{name_from_overrides(list(overrides or []), exclude)}"


def fixed_keys(overrides: Any) -> list[str]:
    """The keys the command line sets to one value (not swept): ``distill=kd seed=0,1`` → ``["distill"]``.

    Registered with ``use_cache`` and evaluated inside ``hydra.sweep.dir``: computed where the sweep starts
    and copied into each job's config, like the sweep name (a job only sees its own overrides).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides or []])
    return [_override_key(o.get_key_element()) for o in parsed if not o.is_sweep_override()]


def job_subdir(resume: str, num: Any, override_dirname: str, overrides: Any = (), fixed: Any = (),
               exclude: Any = ()) -> str:
    """``hydra.sweep.subdir``. resume=never: ``<job number>_<override_dirname>``. resume=auto: the job's
    swept overrides only (``distill=kd,seed=1``; the fixed ones already name the sweep folder), sorted, without
    the job number, which depends on the order of the sweep; all of override_dirname when nothing is swept."""
    if check_resume(resume) == "never":
        return f"{num}_{path_safe(override_dirname)}"
    skip = set(fixed or []) | set(exclude or []) | {"resume", "sweep_name"}
    swept = sorted((str(o) for o in overrides or [] if not excluded(_override_key(str(o)), skip)), key=_override_key)
    if swept:
        return path_safe(",".join(swept))
    return path_safe(override_dirname) if override_dirname else DEFAULT_NAME


def run_dir(resume: str, sweep_name: Optional[str], override_dirname: str, stamped: str) -> str:
    """``hydra.run.dir``: ``outputs/<stamped>`` (resume=never), else ``outputs/[<sweep_name>/]<overrides>``."""
    if check_resume(resume) == "never":
        return f"outputs/{stamped}"
    name = path_safe(override_dirname) if override_dirname else DEFAULT_NAME
    return f"outputs/{sweep_name}/{name}" if sweep_name else f"outputs/{name}"


def path_safe(name: Any, max_len: int = 180) -> str:
    """One folder name from a job's overrides: ``/`` (a nested group, ``distill/teacher_transform=...``)
    becomes ``.`` instead of a sub-folder; a name too long for the file system keeps its start and a hash."""
    text = str(name).replace("/", ".")
    if len(text) > max_len:
        text = text[: max_len - 9] + "~" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return text
