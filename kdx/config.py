"""Validation of composed configs, and their resolution.

Hydra's struct mode already rejects a misspelt key given on the command line (``distill.temprature=2``).
:func:`validate` runs right after composition and catches what struct mode cannot: unknown keys added with
``+key=`` or written in an experiment or recipe file, checked against the signature of each node's ``_target_``
(every node that configures an object has one: data, model, teacher and its recipe, teacher_cache, distill,
module, optim, scheduler, trainer, perf, logger, callbacks), and unknown top-level keys. :func:`check_values`
stops impossible values with one line naming the setting.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Iterator

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from kdx.errors import ConfigError
from kdx.sweep.folders import check_resume
from kdx.sweep.launch import check_writable

TOP_LEVEL_KEYS = {
    "data", "model", "teacher", "teacher_cache", "distill", "module", "optim", "scheduler", "trainer", "perf",
    "logger", "callbacks", "paths", "seed", "task", "method", "ckpt_path", "resume", "retry_failed", "sweep_name",
    "register_teacher", "paper", "hydra",
}
SPECIAL_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
TASKS = ("distill", "train", "reffakd_ae")


def _target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node.keys():
            if path == "" and key == "hydra":
                continue
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _target_nodes(child, f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node):
            yield from _target_nodes(child, f"{path}[{i}]")


def accepted_keys(target: Any) -> list[str] | None:
    """The keyword arguments ``target`` accepts, or None when it takes arbitrary ones.

    kdx's own classes may take ``**common`` and pass it on to their base class (the datamodules
    share their loader/split/augmentation arguments this way): their accepted keys are then the
    union along the class hierarchy, up to the first ``__init__`` without ``**kwargs``.
    """
    chain = [c for c in target.__mro__ if "__init__" in c.__dict__] if inspect.isclass(target) else [target]
    names: list[str] = []
    for fn in chain:
        try:
            params = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn).parameters
        except (TypeError, ValueError):
            return None
        names += [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return list(dict.fromkeys(names))
        if not (inspect.isclass(fn) and fn.__module__.startswith("kdx.")):
            return None
    return None


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the setting for unknown keys and bad values."""
    unknown = set(cfg.keys()) - TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(
            f"Unknown top-level config key(s): {', '.join(sorted(unknown))}. Valid keys: "
            f"{', '.join(sorted(TOP_LEVEL_KEYS - {'hydra'}))}."
        )
    if cfg.get("task") not in TASKS:
        raise ConfigError(f"task={cfg.get('task')!r} is not one of {', '.join(TASKS)}.")
    check_resume(cfg.get("resume", "never"))
    for path, node in _target_nodes(cfg):
        target_name = node._get_node("_target_")._value()
        try:
            target = get_object(str(target_name))
        except Exception as e:
            raise ConfigError(f"{path}._target_={target_name!r} cannot be imported: {e}") from None
        params = accepted_keys(target)
        if params is None:  # open-ended (**kwargs passed on to code outside kdx)
            continue
        for key in node.keys():
            if key in SPECIAL_KEYS or key in params:
                continue
            close = difflib.get_close_matches(str(key), list(params), n=1)
            hint = f" Did you mean '{path}.{close[0]}'?" if close else ""
            raise ConfigError(
                f"Unknown key '{path}.{key}' for {target_name}.{hint} Valid keys of {path}: "
                f"{', '.join(params)}."
            )


def check_values(cfg: DictConfig) -> None:
    """Impossible values of a resolved config stop here, each with one line naming the setting."""
    epochs = cfg.trainer.get("max_epochs")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ConfigError(f"trainer.max_epochs={epochs}: kdx trains a finite number of epochs (schedules, the best and "
                          "last epoch and the teacher store assume one); set trainer.max_epochs to a positive integer.")
    for key in ("batch_size", "eval_batch_size"):
        value = cfg.data.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"data.{key}={value}: a batch needs at least one sample; set data.{key} >= 1.")
    if not isinstance(cfg.get("seed"), int):
        raise ConfigError(f"seed={cfg.get('seed')!r}: the seed must be an integer.")
    check_writable(cfg.paths.output_dir, "hydra.run.dir (hydra.sweep.dir for -m)")


def resolved(cfg: DictConfig) -> DictConfig:
    """A fully resolved copy (interpolations evaluated), in struct mode."""
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    # ${hydra:...} interpolations read the live Hydra config through the resolver, not this node
    out = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(container), resolve=True))
    OmegaConf.set_struct(out, True)
    return out
