"""Any timm model as `timm/<name>`: creation with a clear offline error, and default feature taps.

`create_timm_model("resnet10t", num_classes=100, pretrained=False, **rest)` calls
`timm.create_model(name, num_classes=..., pretrained=..., **rest)`. When pretrained weights cannot
be fetched (no network, HF_HUB_OFFLINE=1, nothing in the HF cache) a `ConfigError` names `model.pretrained` and
says how to proceed. Without network it says so in seconds: the hub's host is probed first (a 3 s connect) and,
when unreachable, the hub is switched to its offline mode (the local cache only) instead of retrying for ~45 s.

Input size and channels follow the data: kdx passes the data's image shape (`data_shape`, filled by the composition
root), and a model with a fixed input size (timm's `fixed_input_size`: ViTs, Swin ...) gets `img_size` = the data's
H×W (a DeiT on 32×32 CIFAR has a 2×2 patch grid) unless `img_size` is given; `in_chans` = the data's channels unless
given (timm adapts a pretrained stem). `input_size` (null | auto | int) makes the network run at another resolution:
its input is resized to it first (a forward pre-hook; the data's normalisation is kept), e.g. a pretrained network
fine-tuned at its own 224×224 on 32×32 data; `auto` is the model's pretrained input size. A shape the network cannot
take stops at creation (one forward of zeros), naming the settings.

`pretrained_file` loads pretrained weights from a local file (offline; timm's `pretrained_cfg_overlay` file, e.g. a
torchvision `.pth` for `timm/resnet50.tv_in1k`): a classifier with another class count than `num_classes` is dropped
and re-initialised, as timm does for hub weights.

Default taps: Vision Transformers (a `patch_embed` and `blocks`) → `blocks.0` … `blocks.N-1`;
other models → the module names listed in timm's `feature_info`.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from kdx.errors import ConfigError
from kdx.models.input_view import InputView, resolve_size

log = logging.getLogger(__name__)


def _download_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]  # LocalEntryNotFoundError, URLError, ConnectionError...
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:  # pragma: no cover - very old huggingface_hub
        pass
    return tuple(errors)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host accepts a connection within ``timeout`` seconds (no request is sent)."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _go_offline() -> None:
    """Hub look-ups from here on use the local cache only (``HF_HUB_OFFLINE``), instead of retrying for ~45 s."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # read at call time; the variable alone is read when the hub is imported
    except ImportError:  # pragma: no cover
        pass


def create_timm_model(name: str, num_classes: int, pretrained: bool = False, pretrained_file: Optional[str] = None,
                      data_shape: Optional[Sequence[int]] = None, input_size: Any = None,
                      input_interpolation: str = "bilinear", **rest) -> nn.Module:
    import timm
    from omegaconf import Container, OmegaConf

    # timm takes plain lists and dicts (e.g. model.depths=[2,2,6,2] arrives as a ListConfig)
    rest = {k: OmegaConf.to_container(v) if isinstance(v, Container) else v for k, v in rest.items()}
    cfg = timm.models.get_pretrained_cfg(name)
    user_img_size = rest.get("img_size")
    size = resolve_size(input_size, None if cfg is None else cfg.to_dict(), "model.input_size")
    if size is None and data_shape is not None:
        size = (int(data_shape[-2]), int(data_shape[-1]))
    if size is not None and cfg is not None and cfg.fixed_input_size:
        rest.setdefault("img_size", size)  # a ViT's patch grid follows the images it is given
    if data_shape is not None:
        rest.setdefault("in_chans", int(data_shape[0]))
    if pretrained_file:
        rest["pretrained_cfg_overlay"] = {**(rest.get("pretrained_cfg_overlay") or {}),
                                          **_file_overlay(pretrained_file, cfg)}
        pretrained = True
    model = _create(timm, name, num_classes, bool(pretrained), rest, hub=bool(pretrained) and not pretrained_file)
    if input_size is not None:
        mode = (cfg.interpolation if cfg is not None else "bilinear") if input_interpolation == "auto" \
            else input_interpolation
        view = InputView(None, None, size, interpolation=mode)
        model.register_forward_pre_hook(lambda m, args: (view(args[0]), *args[1:]))
    model.tap_sets = timm_tap_sets(model)
    if data_shape is not None:
        _check_takes(model, name, tuple(int(s) for s in data_shape), input_size, user_img_size)
    return model


def _file_overlay(path: str, cfg: Any) -> dict[str, Any]:
    """timm's overlay that loads ``path``, with the class count of its classifier (timm keeps a classifier whose
    count equals ``num_classes``, else re-initialises it)."""
    from timm.models import load_state_dict

    file = os.path.expanduser(str(path))
    if not os.path.isfile(file):
        raise ConfigError(f"model.pretrained_file={path}: no such file.")
    overlay: dict[str, Any] = {"file": file}
    heads = cfg.classifier if cfg is not None else None
    head = heads if isinstance(heads, str) else (heads[0] if heads else None)
    weight = load_state_dict(file).get(f"{head}.weight") if head else None
    if weight is not None:
        overlay["num_classes"] = int(weight.shape[0])
    return overlay


def _check_takes(model: nn.Module, name: str, shape: tuple[int, ...], input_size: Any, img_size: Any) -> None:
    """One forward of zeros at the data's shape: a size the network cannot take stops here, naming the settings."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    except Exception as e:  # noqa: BLE001 - timm's assertions and shape errors alike
        given = [f"model.{k}={v}" for k, v in (("img_size", img_size), ("input_size", input_size)) if v is not None]
        error = (str(e).splitlines() or [""])[0].rstrip(".")
        raise ConfigError(
            f"timm/{name} cannot take the data's {'×'.join(map(str, shape))} images"
            + (f" with {', '.join(given)}" if given else "") + f": {type(e).__name__}: {error}. "
            + ("Remove model.img_size (a fixed input size then follows the data), or set" if img_size is not None
               else "Set") + " model.input_size=<a size it takes> (the network resizes its input to it), or choose "
            "another model; for a teacher the same settings are teacher.model.*, or teacher.input.size."
        ) from e
    finally:
        model.train(was)


def _create(timm: Any, name: str, num_classes: int, pretrained: bool, rest: dict[str, Any], hub: bool) -> nn.Module:
    """``timm.create_model``; weights from the hub (``hub``) fail fast offline, naming model.pretrained."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if hub and not offline and not hub_reachable():
        offline = True
        log.warning("model.pretrained=true: the Hugging Face hub is unreachable; looking for the weights of '%s' "
                    "in the local cache only.", name)
        _go_offline()
    try:
        model = timm.create_model(name, num_classes=num_classes, pretrained=bool(pretrained), **rest)
    except _download_errors() as e:
        if not hub:
            raise
        raise ConfigError(
            f"model.pretrained=true: the pretrained weights of timm model '{name}' are "
            + ("not in the local Hugging Face cache and there is no network (or HF_HUB_OFFLINE=1)" if offline else
               f"could not be fetched ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            + f". Train from scratch with model.pretrained=false, or download them once on a machine with network "
            f"access (`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`) into the cache "
            "this run uses (HF_HOME / HF_HUB_CACHE)."
        ) from e
    return model


def timm_tap_sets(model: nn.Module) -> dict[str, list[str]]:
    """Tap sets of a timm model: `blocks` and `feats` from its stages (`feature_info`; a ViT's `blocks.i`),
    `final_map` = the last stage (a CNN), `pooled_feat` = the input of its classifier. There is no
    `preact_feats`: a strategy that reads it stops at start-up (set `model.taps.preact_feats=[...]`)."""
    sets: dict[str, list[str]] = {}
    blocks = getattr(model, "blocks", None)
    if hasattr(model, "patch_embed") and isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        sets["blocks"] = sets["feats"] = [f"blocks.{i}" for i in range(len(blocks))]
    else:
        info = getattr(model, "feature_info", None)
        if info is not None:
            stages = list(info.module_name()) if hasattr(info, "module_name") else [d["module"] for d in info]
            sets["blocks"], sets["feats"], sets["final_map"] = stages, list(stages), stages[-1:]
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    modules = dict(model.named_modules())
    if isinstance(head, str) and head in modules and isinstance(modules[head], nn.Linear):
        sets["pooled_feat"] = [f"{head}:in"]
    return sets
