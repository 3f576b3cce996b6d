"""Model zoo: shapes, exact parameter counts, tap names and shapes, registry errors, timm models."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kdx.errors import ConfigError  # noqa: E402
from kdx.models import create_model, default_taps, list_models  # noqa: E402

# Exact counts (num_classes=100), measured and checked against the published CIFAR-100 zoo
# (CRD / mdistiller); the comment gives the published value in millions.
PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,  # 0.28
    "resnet32": 472_756,  # 0.47
    "resnet44": 667_188,
    "resnet56": 861_620,  # 0.86
    "resnet110": 1_736_564,  # 1.73 published (truncated; the CIFAR-10 head gives 1,730,714)
    "resnet8x4": 1_233_540,  # 1.23
    "resnet32x4": 7_433_860,  # 7.43
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,  # 0.70
    "wrn_40_1": 569_780,  # 0.57
    "wrn_40_2": 2_255_156,  # 2.26
    "vgg8": 3_965_028,  # ~3.96 published (3.97 rounded)
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,  # 9.46
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "mobile_half": 812_836,  # 0.81
    "MobileNetV2": 812_836,
    "MobileNetV1": 3_309_476,  # 4,231,976 at 1000 classes, as mdistiller's ImageNet MobileNetV1
    "ShuffleV1": 949_258,  # 0.95
    "ShuffleV2": 1_355_528,  # 1.36
    "ResNet18": 11_220_132,  # 11.22
    "ResNet34": 21_328_292,
    "ResNet50": 23_705_252,  # 23.71
    "resnet18": 11_220_132,
    "resnet34": 21_328_292,
    "resnet50": 23_705_252,
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_with_taps(model: torch.nn.Module, x: torch.Tensor, taps: list[str]):
    """One forward pass with forward hooks on `taps`: (output, [tap output shape without batch])."""
    modules = dict(model.named_modules())
    out: dict[str, list[tuple[int, ...]]] = {t: [] for t in taps}
    handles = [modules[t].register_forward_hook(lambda m, i, o, t=t: out[t].append(tuple(o.shape[1:]))) for t in taps]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    assert all(len(v) == 1 for v in out.values()), "every tap must fire exactly once per forward"
    return y, [out[t][0] for t in taps]


def tap_shapes(model: torch.nn.Module, x: torch.Tensor, taps: list[str]) -> list[tuple[int, ...]]:
    return run_with_taps(model, x, taps)[1]


def test_zoo_names_are_covered():
    assert list_models() == sorted(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_zoo_model(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=100).eval()
    assert n_params(model) == PARAMS[name]
    taps = default_taps(model)
    assert taps and len(set(taps)) == len(taps)
    assert set(taps) <= set(dict(model.named_modules()))
    y, _ = run_with_taps(model, torch.randn(2, 3, 32, 32), taps)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 100)
    assert torch.isfinite(y).all()


# Parameter names follow CRD/mdistiller, so their published CIFAR-100 checkpoints load unchanged.
REFERENCE_KEYS = {
    "resnet32x4": ["conv1.weight", "layer1.0.downsample.0.weight", "layer3.4.bn2.running_var", "fc.weight"],
    "wrn_40_2": ["block1.layer.0.convShortcut.weight", "block3.layer.5.bn2.weight", "bn1.bias", "fc.bias"],
    "vgg13": ["block0.0.weight", "block0.3.bias", "block4.4.running_mean", "classifier.weight"],
    "mobile_half": ["conv1.0.weight", "blocks.6.0.conv.7.weight", "conv2.1.weight", "classifier.0.weight"],
    "ShuffleV1": ["layer1.0.conv1.weight", "layer3.3.bn3.weight", "linear.weight"],
    "ShuffleV2": ["layer1.0.conv5.weight", "layer1.0.bn4.weight", "layer3.3.conv3.weight", "conv2.weight", "linear.bias"],
    "ResNet50": ["layer1.0.shortcut.0.weight", "layer4.2.bn3.weight", "linear.weight"],
}


@pytest.mark.parametrize("name", sorted(REFERENCE_KEYS))
def test_parameter_names_match_reference(name):
    keys = set(create_model(name, num_classes=100).state_dict())
    assert set(REFERENCE_KEYS[name]) <= keys


def test_num_classes_and_train_mode_backward():
    model = create_model("resnet8", num_classes=10)
    y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def _stages(c: list[int], n: int, hw=(32, 16, 8)) -> list[tuple[int, int, int]]:
    return [(ch, s, s) for ch, s in zip(c, hw) for _ in range(n)]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet56", _stages([16, 32, 64], 9)),
        ("resnet8x4", _stages([64, 128, 256], 1)),
        ("wrn_40_2", _stages([32, 64, 128], 6)),
        ("wrn_16_2", _stages([32, 64, 128], 2)),
        ("vgg13", [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]),
        ("mobile_half", [(8, 16, 16), (12, 16, 16), (16, 8, 8), (32, 4, 4), (48, 4, 4), (80, 2, 2), (160, 2, 2)]),
        ("ResNet18", [(64, 32, 32)] * 2 + [(128, 16, 16)] * 2 + [(256, 8, 8)] * 2 + [(512, 4, 4)] * 2),
    ],
)
def test_tap_shapes(name, expected):
    model = create_model(name, num_classes=100).eval()
    taps = default_taps(model)
    assert tap_shapes(model, torch.randn(2, 3, 32, 32), taps) == expected


def test_wrn_taps_are_relu1_and_final_relu():
    taps = default_taps(create_model("wrn_40_2", num_classes=100))
    assert len(taps) == 18
    assert taps[0] == "block1.layer.1.relu1" and taps[5] == "block2.layer.0.relu1" and taps[-1] == "relu"
    assert "block1.layer.0.relu1" not in taps


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        create_model("resnet57", num_classes=100)
    msg = str(err.value)
    assert "resnet56" in msg and "wrn_40_2" in msg and "ShuffleV2" in msg and "timm/" in msg
    assert "model=<name>" in msg and "model.name" in msg
    with pytest.raises(ValueError):
        create_model("Resnet56", num_classes=100)  # names are exact


def test_zoo_pretrained_flag():
    assert n_params(create_model("resnet8", num_classes=100, pretrained=False)) == PARAMS["resnet8"]
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_model("resnet8", num_classes=100, pretrained=True)


def test_timm_cnn():
    model = create_model("timm/resnet10t", num_classes=100).eval()
    taps = default_taps(model)
    assert taps == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert set(taps) <= set(dict(model.named_modules()))
    y, shapes = run_with_taps(model, torch.randn(2, 3, 32, 32), taps)
    assert y.shape == (2, 100)
    assert [s[0] for s in shapes] == [64, 64, 128, 256, 512]


def test_timm_vit():
    model = create_model("timm/vit_tiny_patch16_224", num_classes=100, img_size=32, patch_size=4, depth=4).eval()
    taps = default_taps(model)
    assert taps == [f"blocks.{i}" for i in range(4)]
    assert set(taps) <= set(dict(model.named_modules()))
    y, shapes = run_with_taps(model, torch.randn(2, 3, 32, 32), taps)
    assert y.shape == (2, 100)
    assert shapes == [(65, 192)] * 4  # 8×8 patches + class token


def test_timm_pretrained_offline_gives_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    # offline, with an empty cache, so the result never depends on the machine's network or cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError) as err:
        create_model("timm/resnet10t", num_classes=100, pretrained=True)
    msg = str(err.value)
    assert msg.startswith("model.pretrained=true") and "resnet10t" in msg
    assert "HF_HUB_OFFLINE" in msg and "network" in msg
    assert "pretrained=false" in msg and "cache" in msg.lower()


def test_timm_pretrained_without_network_fails_in_seconds(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE set and no network: kdx probes the hub, finds it unreachable and switches the hub to its
    offline mode, so the error comes from the (empty) local cache at once instead of after ~45 s of retries."""
    import time

    import huggingface_hub.constants as hf_constants
    from kdx.models import timm_models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens on the discard port
    assert not timm_models.hub_reachable()
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"model.pretrained=true.*no network"):
        create_model("timm/resnet10t", num_classes=100, pretrained=True)
    assert hf_constants.HF_HUB_OFFLINE is True
    print(f"failed after {time.monotonic() - start:.2f} s")
