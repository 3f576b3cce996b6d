"""Any timm model as `timm/<name>`: creation with a clear offline error, and default feature taps.

`create_timm_model("resnet10t", num_classes=100, pretrained=False, **rest)` calls
`timm.create_model(name, num_classes=..., pretrained=..., **rest)`. When pretrained weights cannot
be fetched (no network, HF_HUB_OFFLINE=1, nothing in the HF cache) a `RuntimeError` says so and
how to proceed.

Default taps: Vision Transformers (a `patch_embed` and `blocks`) → `blocks.0` … `blocks.N-1`;
other models → the module names listed in timm's `feature_info`.
"""
from __future__ import annotations

import torch.nn as nn


def _download_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]  # LocalEntryNotFoundError, URLError, ConnectionError...
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:  # pragma: no cover - very old huggingface_hub
        pass
    return tuple(errors)


def create_timm_model(name: str, num_classes: int, pretrained: bool = False, **rest) -> nn.Module:
    import timm

    try:
        model = timm.create_model(name, num_classes=num_classes, pretrained=bool(pretrained), **rest)
    except _download_errors() as e:
        if not pretrained:
            raise
        raise RuntimeError(
            f"Could not fetch the pretrained weights for timm model '{name}' ({type(e).__name__}: {e}). "
            "The likely reason is that there is no network access or HF_HUB_OFFLINE=1 is set and the "
            "weights are not in the local Hugging Face cache. To proceed, either train from scratch "
            f"with `model.pretrained=false`, or pre-download the weights on a machine with network "
            f"access (e.g. `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`) "
            "into the HF cache (HF_HOME / HF_HUB_CACHE) that this run uses."
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
