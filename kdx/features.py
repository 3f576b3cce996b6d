"""Feature taps: intermediate outputs of named modules, taken with forward hooks, grouped in tap sets.

No model's ``forward`` changes. A :class:`FeatureTaps` registers one forward hook per tap on the
named modules of a network, once; a hook stores its module's output only inside
``with taps.capture() as feats:``, so evaluation forwards (and any forward outside a capture)
keep nothing, and a capture starts empty, so nothing carries over from one step to the next.
After the block, ``feats`` holds the features in tap order (``{name: B×C×H×W tensor}``).

A tap is a module name, a key of ``dict(model.named_modules())`` (its output, taken with a forward
hook; ``"name:out"`` says the same), or ``"name:in"``: the module's input (the first positional
argument, taken with a forward pre-hook), for points that are no module's output, e.g. a pre-ReLU
sum (the input of that ReLU) or a pooled feature (the input of the classifier). Features are
stored under the tap as written.

Tap sets: a strategy declares which sets it reads from each network (``Strategy.student_taps`` /
``teacher_taps``), and a model declares where its sets are (``model.tap_sets``):

- ``blocks``: every residual block (AFD, RTK): the CIFAR ResNets' block outputs, the WRNs' BN-ReLU of every
  block input plus the final BN-ReLU, ``feature_info`` modules for timm CNNs, ``blocks.i`` for timm ViTs;
- ``feats``, ``preact_feats``, ``pooled_feat``: the points mdistiller's models return (the stem and each
  stage after ReLU, the same before the last ReLU, the pooled feature before the classifier);
- ``final_map``: the map the model pools globally before its classifier.

``model.taps={<set>: [...]}`` in the config replaces a set's points (:func:`model_tap_sets`). A set a model
does not have stops the run at start-up, naming the strategy and the setting. Token outputs of a ViT (``B×N×C``) are returned
as maps ``B×C×H×W`` (prefix tokens - class, distillation, register - dropped; the grid from
``patch_embed.grid_size``). A module whose output is a tuple gives its first element.

Hooks are plain Python on submodules: they work inside DDP (which wraps the LightningModule,
not the hooked submodules) and with ``torch.compile`` when registered before compiling.
Nothing is registered for strategies that ask for no features (``Strategy.needs_features``).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from kdx.errors import ConfigError

__all__ = [
    "FeatureTaps", "TapSets", "attach_feature_taps", "capture", "check_config_taps", "check_taps", "feature_shapes",
    "model_tap_sets", "parse_tap",
]


def model_tap_sets(model: nn.Module) -> dict[str, list[str]]:
    """The tap sets of ``model``: what it declares (``tap_sets``), with the config's ``model.taps`` replacing
    sets it names. A user model may declare ``tap_sets`` or get them all from ``model.taps``."""
    declared = dict(getattr(model, "tap_sets", None) or {})
    overrides = getattr(model, "taps", None) or {}
    return {**{k: list(v) for k, v in declared.items()}, **{k: list(v) for k, v in overrides.items()}}


def parse_tap(tap: str) -> tuple[str, bool]:
    """``"name"``, ``"name:out"`` → ``(name, False)``: the module's output; ``"name:in"`` → ``(name, True)``."""
    name, sep, where = tap.rpartition(":")
    if sep and where in ("in", "out"):
        return name, where == "in"
    return tap, False


def check_taps(model: nn.Module, names: Sequence[str], setting: str = "model.taps") -> None:
    """Raise :class:`ConfigError` naming ``setting`` when a tap is not a module of ``model``."""
    if isinstance(names, str) or not len(names):
        raise ConfigError(f"{setting} must be a non-empty list of module names, got {names!r}.")
    modules = dict(model.named_modules())
    unknown = [n for n in names if parse_tap(n)[0] not in modules]
    points = [parse_tap(n) for n in names]  # "x" and "x:out" are the same tap
    dup = sorted({n for n, p in zip(names, points) if points.count(p) > 1})
    if unknown or dup:
        valid = [n for n in modules if n]
        what = f"no module named {', '.join(map(repr, unknown))}" if unknown else f"duplicate tap(s) {dup}"
        raise ConfigError(
            f"{setting}: {type(model).__name__} has {what}. Set {setting}=[...] to names from this list "
            f"(\"name:in\" for a module's input). Valid names ({len(valid)}): {', '.join(valid)}."
        )


def _token_grid(model: nn.Module) -> Optional[tuple[int, tuple[int, int]]]:
    """(number of prefix tokens, (H, W) patch grid) for a timm ViT, else None."""
    pe = getattr(model, "patch_embed", None)
    grid = getattr(pe, "grid_size", None)
    if pe is None or grid is None:
        return None
    return int(getattr(model, "num_prefix_tokens", 1)), (int(grid[0]), int(grid[1]))


def tokens_to_map(x: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """``B×N×C`` tokens → ``B×C×H×W`` (the first ``num_prefix`` tokens dropped)."""
    b, n, c = x.shape
    h, w = grid
    if n - num_prefix != h * w:
        raise ValueError(f"{n} tokens with {num_prefix} prefix tokens do not fill the {h}×{w} patch grid")
    return x[:, num_prefix:].transpose(1, 2).reshape(b, c, h, w)


class FeatureTaps:
    """Forward hooks (pre-hooks for ``"name:in"``) on the taps ``names`` of ``model``; features are kept only
    inside :meth:`capture`.

    ``setting`` names the config key of the tap list in errors (``model.taps`` or
    ``teacher.model.taps``).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], setting: str = "model.taps") -> None:
        names = list(names)
        check_taps(model, names, setting)
        self.names: list[str] = list(names)
        self.setting = setting
        self._store: Optional[dict[str, Tensor]] = None  # a dict only while capturing
        tokens = _token_grid(model)
        self._to_map: Callable[[Tensor], Tensor] = (
            (lambda t: tokens_to_map(t, *tokens) if t.ndim == 3 else t) if tokens else (lambda t: t)
        )
        modules = dict(model.named_modules())
        self._handles = []
        for tap in self.names:
            name, is_input = parse_tap(tap)
            register = modules[name].register_forward_pre_hook if is_input else modules[name].register_forward_hook
            self._handles.append(register(self._hook(tap, is_input)))

    def _hook(self, name: str, is_input: bool = False):
        def hook(module: nn.Module, args, output=None) -> None:
            store = self._store
            if store is None:
                return
            if is_input:
                if not args:
                    raise RuntimeError(
                        f"Feature tap '{name}' takes the module's input, but the module was called without "
                        f"positional arguments ({self.setting})."
                    )
                output = args[0]
            if isinstance(output, (tuple, list)):
                output = output[0]
            if name in store:
                raise RuntimeError(
                    f"Feature tap '{name}' ran twice in one forward (a module used more than once). "
                    f"Tap a module that runs once per forward ({self.setting})."
                )
            store[name] = self._to_map(output)

        return hook

    @property
    def capturing(self) -> bool:
        return self._store is not None

    @contextmanager
    def capture(self) -> Iterator[dict[str, Tensor]]:
        """Collect the taps of the forward(s) run inside the block; ``feats`` is filled in tap order."""
        if self._store is not None:
            raise RuntimeError("FeatureTaps.capture() is not re-entrant")
        feats: dict[str, Tensor] = {}
        self._store = feats
        try:
            yield feats
        finally:
            self._store = None  # nothing is kept by the taps after the block
        missing = [n for n in self.names if n not in feats]
        if missing:
            raise RuntimeError(
                f"Feature tap(s) {missing} did not run in the forward pass; tap modules that the forward "
                f"uses ({self.setting})."
            )
        ordered = {n: feats[n] for n in self.names}
        feats.clear()
        feats.update(ordered)

    def remove(self) -> None:
        """Unregister the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"FeatureTaps({len(self.names)} taps, {self.setting})"


class TapSets:
    """The tap sets ``{set: [tap, ...]}`` a strategy reads from one network, hooked once (the union of their taps).

    ``with tap_sets.capture() as feats:`` → after the block, ``feats[set]`` is the list of that set's features, in
    the set's order. ``setting`` names the config key in errors (``model.taps``, ``teacher.model.taps``).
    """

    def __init__(self, model: nn.Module, sets: dict[str, Sequence[str]], setting: str = "model.taps") -> None:
        self.sets = {k: [_canonical(t) for t in v] for k, v in sets.items()}
        for name, taps in self.sets.items():
            check_taps(model, taps, f"{setting}.{name}")
        self.taps = FeatureTaps(model, list(dict.fromkeys(t for v in self.sets.values() for t in v)), setting)

    @contextmanager
    def capture(self) -> Iterator[dict[str, list[Tensor]]]:
        out: dict[str, list[Tensor]] = {}
        with self.taps.capture() as flat:
            yield out
        out.update({k: [flat[t] for t in v] for k, v in self.sets.items()})

    @property
    def capturing(self) -> bool:
        return self.taps.capturing

    def remove(self) -> None:
        self.taps.remove()

    def __repr__(self) -> str:
        return f"TapSets({', '.join(f'{k}: {len(v)}' for k, v in self.sets.items())})"


def _canonical(tap: str) -> str:
    name, is_input = parse_tap(tap)
    return f"{name}:in" if is_input else name


def capture(taps: Optional[FeatureTaps | TapSets]):
    """``taps.capture()``, or a no-op context yielding ``{}`` when there are no taps."""
    return taps.capture() if taps is not None else nullcontext({})


@torch.no_grad()
def feature_shapes(
    model: nn.Module, taps: FeatureTaps | TapSets, input_shape: Sequence[int], batch: int = 2
) -> list[torch.Size] | dict[str, list[torch.Size]]:
    """Shapes (``B×C×H×W``, or ``B×C`` for a pooled feature; B = ``batch``) of the taps, from one forward of
    zeros in eval mode: a list for :class:`FeatureTaps`, ``{set: [shape, ...]}`` for :class:`TapSets`.

    The model's mode is restored afterwards; BN running statistics are not touched (eval mode).
    """
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(batch, *input_shape, device=device)
    model.eval()
    try:
        with taps.capture() as feats:
            model(x)
    finally:
        model.train(was_training)
    if isinstance(taps, TapSets):
        return {k: [f.shape for f in v] for k, v in feats.items()}
    return [feats[n].shape for n in taps.names]


def _required(model: nn.Module, sets: Sequence[str], who: str, setting: str) -> dict[str, list[str]]:
    """The sets ``sets`` of ``model`` (ConfigError naming the strategy and the setting when one is missing)."""
    available = model_tap_sets(model)
    missing = [s for s in sets if s not in available]
    if missing:
        raise ConfigError(
            f"{who} reads the tap set(s) {missing} of {setting.rsplit('.', 1)[0]} ({type(model).__name__}), which "
            f"declares only {sorted(available) or 'none'}. Give the points with {setting}={{{missing[0]}: [module "
            "names]}} (\"name:in\" for a module's input), or choose another model or method."
        )
    return {s: available[s] for s in sets}


def attach_feature_taps(strategy, student: nn.Module, teacher, input_shape: Sequence[int]):
    """Hook the student's and the teacher's taps and build the strategy's shape-dependent modules.

    Returns ``(student_taps, teacher_taps)`` (:class:`TapSets`, None for a network the strategy does not tap).
    Called by :func:`kdx.build.build` at start-up for a strategy with ``needs_features`` (after seeding, before
    the optimiser exists): unknown tap names and missing sets stop the run here, naming ``model.taps`` /
    ``teacher.model.taps``. ``build_feature_modules`` gets ``{set: [shape, ...]}`` of each network (the teacher's
    from its own view of the input, ``Teacher.adapt_input``).
    """
    who = type(strategy).__name__
    student_taps = teacher_taps = None
    if strategy.student_taps:
        student_taps = TapSets(student, _required(student, strategy.student_taps, who, "model.taps"), "model.taps")
    if strategy.teacher_taps:
        teacher_net = teacher.network if teacher is not None else None
        if teacher_net is None:
            raise ConfigError(
                f"{who} needs the teacher's intermediate features, but the teacher ({type(teacher).__name__}) has no "
                "network to tap. Use a network teacher (teacher=net)."
            )
        sets = _required(teacher_net, strategy.teacher_taps, who, "teacher.model.taps")
        teacher_taps = TapSets(teacher_net, sets, "teacher.model.taps")
    teacher_shape = tuple(teacher.adapt_input(torch.zeros(1, *input_shape)).shape[1:]) if teacher_taps else ()
    strategy.build_feature_modules(
        feature_shapes(teacher.network, teacher_taps, teacher_shape) if teacher_taps else {},
        feature_shapes(student, student_taps, input_shape) if student_taps else {},
    )
    return student_taps, teacher_taps


def check_config_taps(strategy: Any, nodes: Sequence[tuple[str, Any, Sequence[str]]], num_classes: int) -> None:
    """Check the tap sets ``strategy`` reads on throwaway builds of the architectures: ``nodes`` are
    ``(setting, model config node, sets)`` (``model``, ``teacher.model``).

    Runs at start-up before a teacher is looked up (or trained), so a misspelt tap or a missing set stops the
    run at once rather than after a teacher has been trained; the strategy's own :meth:`Strategy.check_networks`
    sees the same builds.
    """
    from hydra.utils import instantiate

    built: dict[str, nn.Module] = {}
    for setting, node, sets in nodes:
        if not sets:
            continue
        # names only: no weights, and no input-shape check (timm's data_shape: null, the model's default size)
        extra = {k: v for k, v in (("pretrained", False), ("pretrained_file", None), ("data_shape", None)) if k in node}
        model = built[setting] = instantiate(node, num_classes=num_classes, **extra)
        for name, taps in _required(model, sets, type(strategy).__name__, f"{setting}.taps").items():
            check_taps(model, [_canonical(t) for t in taps], f"{setting}.taps.{name}")
    strategy.check_networks(built.get("model"), built.get("teacher.model"))
