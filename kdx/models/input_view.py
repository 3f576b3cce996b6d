"""A network's own view of the batch: another normalisation and input size, built on the device from the batch.

kdx's loaders give one batch, normalised with the data's mean/std at the data's size. A network pretrained
elsewhere (timm, torchvision) expects its own normalisation and resolution. :class:`InputView` turns the batch into
that view on the device: un-normalise with the data's mean/std, resize (``F.interpolate``, antialiased for
bilinear/bicubic as torchvision's ``Resize`` on tensors), normalise with the network's mean/std. No second data
pipeline and no extra host transfer.

:class:`ViewSettings` is the config node (``teacher.input``): ``size`` null (the data's) | ``auto`` (the model's
pretrained input size) | an int; ``mean``/``std`` null (the data's: no renormalisation) | ``auto`` (the model's
pretrained ones) | a list; ``interpolation`` bilinear | bicubic | nearest | auto. ``auto`` reads the model's
pretrained configuration as timm's ``timm.data.resolve_model_data_config`` does (timm models carry it as
``pretrained_cfg``); a network without one must be given the values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdx.errors import ConfigError

MODES = ("bilinear", "bicubic", "nearest")
Size = Union[None, str, int]
Stats = Union[None, str, Sequence[float]]


@dataclass
class ViewSettings:
    """What a network sees (see the module docstring); ``setting`` names the node in errors (``teacher.input``)."""

    size: Size = None
    mean: Stats = None
    std: Stats = None
    interpolation: str = "bilinear"

    @classmethod
    def from_node(cls, node: Optional[Mapping[str, Any]], setting: str) -> "ViewSettings":
        node = dict(node or {})
        unknown = sorted(set(node) - {"size", "mean", "std", "interpolation"})
        if unknown:
            raise ConfigError(f"Unknown key '{setting}.{unknown[0]}'. Valid keys of {setting}: size, mean, std, "
                              "interpolation.")
        return cls(**node)

    @property
    def is_identity(self) -> bool:
        return self.size is None and self.mean is None and self.std is None


def pretrained_data_config(net: nn.Module, setting: str) -> dict[str, Any]:
    """The model's pretrained input size, mean, std and interpolation (timm's ``resolve_model_data_config``)."""
    node = setting.rsplit(".", 1)[0]
    if not isinstance(getattr(net, "pretrained_cfg", None), Mapping):
        raise ConfigError(
            f"{setting}=auto reads the model's pretrained configuration (timm's pretrained_cfg), which "
            f"{type(net).__name__} has none of: give the values (e.g. {node}.size=224, {node}.mean=[0.485,0.456,"
            f"0.406], {node}.std=[0.229,0.224,0.225], {node}.interpolation=bilinear).")
    from timm.data import resolve_model_data_config

    return resolve_model_data_config(net)


class InputView(nn.Module):
    """``x`` normalised with ``data_mean``/``data_std`` → resized to ``size`` (None: kept) → normalised with
    ``mean``/``std`` (None: the data's, kept). Stats are buffers (they follow ``.to(device)``), not saved."""

    def __init__(self, data_mean: Optional[Sequence[float]], data_std: Optional[Sequence[float]],
                 size: Optional[tuple[int, int]], mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, interpolation: str = "bilinear") -> None:
        super().__init__()
        if interpolation not in MODES:
            raise ValueError(f"interpolation={interpolation!r} is not one of {', '.join(MODES)}")
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.interpolation = interpolation
        self.renormalise = mean is not None
        for name, v in (("data_mean", data_mean), ("data_std", data_std), ("mean", mean), ("std", std)):
            t = torch.tensor([float(a) for a in v]).view(1, -1, 1, 1) if v is not None else torch.zeros(0)
            self.register_buffer(name, t, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.renormalise:
            x = x * self.data_std.to(x.dtype) + self.data_mean.to(x.dtype)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode=self.interpolation,
                              align_corners=None if self.interpolation == "nearest" else False,
                              antialias=self.interpolation != "nearest")
        if self.renormalise:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def describe(self) -> dict[str, Any]:
        """For results files: the view's size, interpolation and (when renormalising) mean/std."""
        out: dict[str, Any] = {"size": list(self.size) if self.size else None, "interpolation": self.interpolation}
        if self.renormalise:
            out.update(mean=self.mean.flatten().tolist(), std=self.std.flatten().tolist())
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.describe().items())


def resolve_size(size: Size, net_config: Optional[dict[str, Any]], setting: str) -> Optional[tuple[int, int]]:
    """``size`` as (H, W): None stays None, ``auto`` from ``net_config['input_size']``, an int is square."""
    if size is None:
        return None
    if size == "auto":
        if net_config is None:
            raise ConfigError(f"{setting}=auto needs the model's pretrained configuration; give an int.")
        return int(net_config["input_size"][-2]), int(net_config["input_size"][-1])
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"{setting}={size!r}: give null (the data's size), auto (the model's pretrained input size) "
                          "or a positive int.")
    return int(size), int(size)


def resolve_view(settings: ViewSettings, net: nn.Module, data_mean: Sequence[float], data_std: Sequence[float],
                 setting: str) -> Optional[InputView]:
    """The :class:`InputView` of ``settings`` for ``net`` on data normalised with ``data_mean``/``data_std``; None
    when it changes nothing. ``setting`` (``teacher.input``) names the keys in errors."""
    if settings.is_identity:
        return None
    auto = [k for k in ("size", "mean", "std", "interpolation") if getattr(settings, k) == "auto"]
    cfg = pretrained_data_config(net, f"{setting}.{auto[0]}") if auto else None
    size = resolve_size(settings.size, cfg, f"{setting}.size")
    if (settings.mean is None) != (settings.std is None):
        raise ConfigError(f"{setting}.mean and {setting}.std go together: set both (auto or lists) or neither.")
    stats = []
    for key, value in (("mean", settings.mean), ("std", settings.std)):
        v = cfg[key] if value == "auto" else value
        if v is not None:
            if isinstance(v, str) or len(v) != len(data_mean):
                raise ConfigError(f"{setting}.{key}={value!r}: give auto or {len(data_mean)} numbers (one per channel "
                                  f"of the data's images).")
            if key == "std" and min(float(a) for a in v) <= 0:
                raise ConfigError(f"{setting}.std={list(v)}: every std must be positive.")
        stats.append(v)
    mode = cfg["interpolation"] if settings.interpolation == "auto" else settings.interpolation
    if mode not in MODES:
        raise ConfigError(f"{setting}.interpolation={settings.interpolation!r} (→ {mode!r}): give one of "
                          f"{', '.join(MODES)} or auto.")
    return InputView(data_mean, data_std, size, stats[0], stats[1], mode)


__all__ = ["InputView", "ViewSettings", "pretrained_data_config", "resolve_size", "resolve_view"]
