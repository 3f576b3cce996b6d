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
    model.default_taps = timm_default_taps(model)
    return model


def timm_default_taps(model: nn.Module) -> list[str]:
    blocks = getattr(model, "blocks", None)
    if hasattr(model, "patch_embed") and isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return [f"blocks.{i}" for i in range(len(blocks))]
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ValueError(f"{type(model).__name__} has no `feature_info`; pass the tap module names explicitly")
    if hasattr(info, "module_name"):  # timm FeatureInfo object (features_only models)
        return list(info.module_name())
    return [d["module"] for d in info]
