"""Any timm model as `timm/<name>`: creation with a clear offline error, and default feature taps.

`create_timm_model("resnet10t", num_classes=100, pretrained=False, **rest)` calls
`timm.create_model(name, num_classes=..., pretrained=..., **rest)`. When pretrained weights cannot
be fetched (no network, HF_HUB_OFFLINE=1, nothing in the HF cache) a `ConfigError` names `model.pretrained` and
says how to proceed. Without network it says so in seconds: the hub's host is probed first (a 3 s connect) and,
when unreachable, the hub is switched to its offline mode (the local cache only) instead of retrying for ~45 s.

Default taps: Vision Transformers (a `patch_embed` and `blocks`) → `blocks.0` … `blocks.N-1`;
other models → the module names listed in timm's `feature_info`.
"""
from __future__ import annotations

import logging
import os
import socket

import torch.nn as nn

from kdx.errors import ConfigError

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


def create_timm_model(name: str, num_classes: int, pretrained: bool = False, **rest) -> nn.Module:
    import timm

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if pretrained and not offline and not hub_reachable():
        offline = True
        log.warning("model.pretrained=true: the Hugging Face hub is unreachable; looking for the weights of '%s' "
                    "in the local cache only.", name)
        _go_offline()
    try:
        model = timm.create_model(name, num_classes=num_classes, pretrained=bool(pretrained), **rest)
    except _download_errors() as e:
        if not pretrained:
            raise
        raise ConfigError(
            f"model.pretrained=true: the pretrained weights of timm model '{name}' are "
            + ("not in the local Hugging Face cache and there is no network (or HF_HUB_OFFLINE=1)" if offline else
               f"could not be fetched ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            + f". Train from scratch with model.pretrained=false, or download them once on a machine with network "
            f"access (`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`) into the cache "
            "this run uses (HF_HOME / HF_HUB_CACHE)."
        ) from e
    model.tap_sets = timm_tap_sets(model)
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
