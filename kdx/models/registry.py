"""Model registry: `create_model`, `user_model`, `model_name`, `list_models`, `default_taps`.

Every model returns logits from `forward` and declares where its feature tap sets are (`tap_sets`, see
`kdx.features`) and its classifier (`get_classifier()`, timm's interface).

Zoo names are exact (case-sensitive); `timm/<name>` builds any timm model.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Mapping, Optional, Sequence

import torch.nn as nn

from . import cifar_resnet, mobilenetv1, mobilenetv2, resnet_cifar_stem, shufflenet, vgg, wrn
from kdx.errors import ConfigError

from .timm_models import create_timm_model

TIMM_PREFIX = "timm/"

_ZOO: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": partial(cifar_resnet.resnet, d) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": partial(cifar_resnet.resnet_x4, 8),
    "resnet32x4": partial(cifar_resnet.resnet_x4, 32),
    **{f"wrn_{d}_{k}": partial(wrn.wrn, d, k) for d in (16, 40) for k in (1, 2)},
    **{name: partial(vgg.vgg, name) for name in vgg.CFGS},
    "mobile_half": mobilenetv2.mobile_half,
    "MobileNetV2": mobilenetv2.mobile_half,
    "MobileNetV1": mobilenetv1.mobilenet_v1,
    "ShuffleV1": shufflenet.shuffle_v1,
    "ShuffleV2": shufflenet.shuffle_v2,
    "ResNet18": resnet_cifar_stem.resnet18,
    "ResNet34": resnet_cifar_stem.resnet34,
    "ResNet50": resnet_cifar_stem.resnet50,
    "resnet18": resnet_cifar_stem.resnet18,
    "resnet34": resnet_cifar_stem.resnet34,
    "resnet50": resnet_cifar_stem.resnet50,
}


def list_models() -> list[str]:
    """All zoo names (aliases included), sorted; any `timm/<name>` is accepted as well."""
    return sorted(_ZOO)


def create_model(name: str, num_classes: int, taps: Optional[Mapping[str, Sequence[str]]] = None,
                 **kw) -> nn.Module:
    """Build zoo model `name` (or `timm/<timm name>`) with a `num_classes`-way classifier.

    `taps` (config `model.taps`): tap sets that replace the model's own, `{set: [module name, ...]}` (e.g.
    `{blocks: [layer2.0, layer3.0]}`); None keeps the model's. The names are checked when a strategy reads the
    set (see `kdx.features`).

    Zoo models take no other options apart from `pretrained=False` (they have no pretrained
    weights; teachers are loaded from checkpoints). For `timm/...`: `pretrained`, `pretrained_file`, `data_shape`
    (the data's C×H×W, which the input size and channels follow), `input_size` and `input_interpolation` are
    kdx's (see `kdx.models.timm_models`); any other keyword goes to `timm.create_model` (e.g. `img_size`, `depth`).
    """
    return _with_taps(_create(name, num_classes, **kw), taps)


def user_model(net: Mapping, num_classes: int, name: Optional[str] = None,
               taps: Optional[Mapping[str, Sequence[str]]] = None,
               num_classes_arg: Optional[str] = "num_classes") -> nn.Module:
    """``model=user``: any ``nn.Module`` class or factory, ``model.net._target_=pkg.module.Class`` with its own
    arguments under ``model.net``; kdx's settings (``name``: the label; ``taps``: its tap sets) are not passed to
    it. The number of classes is passed as the keyword ``num_classes_arg`` (null: not passed; the network must
    then already have the data's number of outputs). Its ``forward(x)`` returns logits; it may declare
    ``tap_sets`` (:mod:`kdx.features`) or get them all from ``model.taps``."""
    from hydra.utils import instantiate

    target = (net or {}).get("_target_") if isinstance(net, Mapping) else None
    if not target or target == "???":
        raise ConfigError("model=user needs the network: model.net._target_=<module.Class> (its arguments under "
                          "model.net), e.g. model.net._target_=torchvision.models.resnet18.")
    kwargs = {} if num_classes_arg is None else {str(num_classes_arg): int(num_classes)}
    try:
        model = instantiate(net, **kwargs)
    except Exception as e:  # Hydra wraps the constructor's TypeError: say which setting fits the network
        raise ConfigError(
            f"model.net._target_={target} could not be built with {kwargs or 'no class count'}: {e}. If the network "
            "names its class count differently set model.num_classes_arg=<its argument> (null: not passed)."
        ) from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.net._target_={target} gave a {type(model).__name__}, not a torch.nn.Module.")
    return _with_taps(model, taps)


def _with_taps(model: nn.Module, taps: Optional[Mapping[str, Sequence[str]]]) -> nn.Module:
    if taps is not None:
        if not isinstance(taps, Mapping):
            raise ConfigError(
                f"model.taps={list(taps) if not isinstance(taps, str) else taps!r}: give tap sets by name, e.g. "
                f"model.taps={{blocks: [{', '.join(map(str, taps if not isinstance(taps, str) else [taps]))}]}} "
                "(blocks: AFD/RTK; feats, preact_feats, pooled_feat, final_map: the mdistiller family)."
            )
        model.taps = {str(k): [v] if isinstance(v, str) else [str(t) for t in v] for k, v in taps.items()}
    return model


def _create(name: str, num_classes: int, **kw) -> nn.Module:
    if name.startswith(TIMM_PREFIX):
        return create_timm_model(name[len(TIMM_PREFIX) :], num_classes=num_classes, **kw)
    if name not in _ZOO:
        raise ValueError(
            f"Unknown model '{name}'. Valid names: {', '.join(list_models())}, or 'timm/<any timm model>'. "
            "Set it with `model=<name>` (a config in conf/model/) or `model.name=<name>`."
        )
    if kw.pop("pretrained", False):
        raise ValueError(
            f"Zoo model '{name}' has no pretrained weights; set `model.pretrained=false` "
            "(load a trained teacher from its checkpoint instead), or use a `timm/<name>` model."
        )
    return _ZOO[name](num_classes=num_classes, **kw)


def default_taps(model: nn.Module) -> list[str]:
    """The model's own `blocks` tap set (every residual block: AFD/RTK), as keys of `dict(model.named_modules())`."""
    return list(model.tap_sets["blocks"])
