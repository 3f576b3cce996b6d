"""Config helpers: OmegaConf resolvers, validation of composed configs, resolution.

Hydra's struct mode already rejects a misspelt key given on the command line
(``distill.temprature=2``). :func:`validate` runs right after composition and catches what
struct mode cannot: unknown keys added with ``+key=`` or written in an experiment file,
checked against the signature of each node's ``_target_``, and unknown top-level keys.
"""
from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any, Iterator

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

TOP_LEVEL_KEYS = {
    "data", "model", "teacher", "distill", "optim", "scheduler", "trainer", "logger", "paths",
    "experiment", "seed", "task", "method", "ckpt_path", "checkpoint", "progress_bar", "perf",
    "train", "recipe", "paper", "hydra", "resume", "sweep_name",
}
SPECIAL_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
TASKS = ("distill", "train", "reffakd_ae")


class ConfigError(ValueError):
    pass


def default_data_dir() -> str:
    """``../shared/data`` (from the working folder) when it exists, else ``./data``."""
    shared = Path.cwd().parent / "shared" / "data"
    return str(shared.resolve()) if shared.is_dir() else str((Path.cwd() / "data").resolve())


def method_label(choices: Any) -> str:
    """The run's method label from Hydra's group choices: ``distill``, plus ``+<transform>`` when a teacher
    transform is chosen (``distill=kd distill/teacher_transform=topk_scale`` → ``kd+topk_scale``), plus
    ``@<teacher>`` for a non-network teacher group (``distill=dkd teacher=reffakd`` → ``dkd@reffakd``).
    ``distill=none`` is always ``none`` (the baseline column), whatever teacher an experiment selects."""
    get = (lambda k: choices.get(k)) if hasattr(choices, "get") else (lambda k: None)
    label = str(get("distill"))
    if label == "none":  # plain training uses no teacher and no transform: the baseline, whatever is selected
        return label
    transform = get("distill/teacher_transform")
    if transform not in (None, "null", "none"):
        label += f"+{transform}"
    teacher = get("teacher")
    if teacher not in (None, "net") and str(teacher) != label:
        label += f"@{teacher}"
    return label


def path_safe(name: Any, max_len: int = 180) -> str:
    """One folder name from a job's overrides: ``/`` (a nested group, ``distill/teacher_transform=...``)
    becomes ``.`` instead of a sub-folder; a name too long for the file system keeps its start and a hash."""
    import hashlib

    text = str(name).replace("/", ".")
    if len(text) > max_len:
        text = text[: max_len - 9] + "~" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return text


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("kdx_path_safe"):
        OmegaConf.register_new_resolver("kdx_path_safe", path_safe)
    if not OmegaConf.has_resolver("kdx_data_dir"):
        OmegaConf.register_new_resolver("kdx_data_dir", default_data_dir)
    if not OmegaConf.has_resolver("kdx_method"):
        OmegaConf.register_new_resolver("kdx_method", method_label)
    from kdx import sweep

    if not OmegaConf.has_resolver("kdx_sweep_dir"):
        # cached: computed once where the sweep starts, then copied into each job's config by Hydra
        OmegaConf.register_new_resolver("kdx_sweep_dir", sweep.sweep_dir, use_cache=True)
    if not OmegaConf.has_resolver("kdx_fixed_keys"):
        OmegaConf.register_new_resolver("kdx_fixed_keys", sweep.fixed_keys, use_cache=True)
    for name, fn in (("kdx_job_subdir", sweep.job_subdir), ("kdx_run_dir", sweep.run_dir),
                     ("kdx_launcher_tasks", sweep.launcher_tasks), ("kdx_launcher_gpus", sweep.launcher_gpus)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


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
    from kdx.sweep import check_resume

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


def resolved(cfg: DictConfig) -> DictConfig:
    """A fully resolved copy (interpolations evaluated), in struct mode."""
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    # ${hydra:...} interpolations read the live Hydra config through the resolver, not this node
    out = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(container), resolve=True))
    OmegaConf.set_struct(out, True)
    return out
