"""Teachers people already have: mdistiller's cifar_teachers.tar and CRD's (RepDistiller's) released CIFAR-100
teachers load through ``teacher.ckpt=`` as they are (their dict layout, their parameter names); a file of another
layout or architecture is refused naming the file."""
from __future__ import annotations

import argparse
import hashlib

import pytest
import torch

from conftest import TINY, compose_cfg
from kdx.errors import CheckpointError
from kdx.io import checkpoint_meta, load_state_dict_file
from kdx.models import create_model

# The official parameter names and shapes, per architecture: (count, first 16 hex of sha256 over "name:shape" lines
# in state-dict order) of `model_dict[name](num_classes=100).state_dict()`, computed from
# megvii-research/mdistiller @ a08d46f (mdistiller/models/cifar/__init__.py, cifar_model_dict) and
# HobbitLong/RepDistiller @ b84f547 (models/__init__.py, model_dict); both give the same values for the names they
# share (RepDistiller has no ResNet18). kdx's zoo model of the same name must match: then their files load as they are.
OFFICIAL_KEYS = {
    "MobileNetV2": (320, "67dd5adb2196190e"), "ResNet18": (122, "15776a9a917d8d66"),
    "ResNet50": (320, "01c941c55d8830fa"), "ShuffleV1": (296, "542ef1e4af09fe27"),
    "ShuffleV2": (338, "db138f467cd82af3"), "resnet110": (668, "932a055377884f91"),
    "resnet14": (92, "92530df46a51a173"), "resnet20": (128, "48702a589dcc22ab"),
    "resnet32": (200, "e488f60b23a4db1c"), "resnet32x4": (206, "670cd82105052059"),
    "resnet44": (272, "fcf7a5a278e22506"), "resnet56": (344, "1d3465ca54c565c3"),
    "resnet8": (56, "ac039310c98e68d8"), "resnet8x4": (62, "4b191cfaf50907ea"),
    "vgg11": (58, "7edcbfd7d4b24633"), "vgg13": (72, "adbafd0e22ce9038"), "vgg16": (93, "4b0f395fe5fbd954"),
    "vgg19": (114, "0820bef0b1c3cee0"), "vgg8": (37, "792c36c85a183c23"), "wrn_16_1": (82, "cc273e84a60cb768"),
    "wrn_16_2": (83, "28fc720be1913fd2"), "wrn_40_1": (226, "f8967803e64be646"),
    "wrn_40_2": (227, "029bbe2cbcd6d721"),
}


@pytest.mark.parametrize("arch", sorted(OFFICIAL_KEYS))
def test_kdx_parameter_names_are_the_official_ones(arch):
    with torch.device("meta"):  # names and shapes only
        sd = create_model(arch, num_classes=100).state_dict()
    digest = hashlib.sha256("\n".join(f"{k}:{tuple(v.shape)}" for k, v in sd.items()).encode()).hexdigest()[:16]
    assert (len(sd), digest) == OFFICIAL_KEYS[arch]


def _official_file(folder, arch: str, kind: str = "epoch", seed: int = 0):
    """A teacher file as mdistiller's tar and CRD's fetch script ship it (RepDistiller train_teacher.py's dicts):
    `<arch>_vanilla/ckpt_epoch_240.pth` = {'epoch', 'model', 'accuracy', 'optimizer'}; `<arch>_best.pth` has
    'best_acc'; `<arch>_last.pth` has the run's argparse options 'opt'."""
    torch.manual_seed(seed)
    net = create_model(arch, num_classes=100)
    for m in net.modules():  # trained-looking BN statistics, so eval mode is not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # momentum buffers in the optimizer state, as in the real files
    d = folder / f"{arch}_vanilla"
    d.mkdir(parents=True, exist_ok=True)
    if kind == "epoch":
        obj = {"epoch": 240, "model": net.state_dict(), "accuracy": torch.tensor([79.42]),
               "optimizer": opt.state_dict()}
        path = d / "ckpt_epoch_240.pth"
    elif kind == "best":
        obj = {"epoch": 231, "model": net.state_dict(), "best_acc": torch.tensor([79.6]), "optimizer": opt.state_dict()}
        path = d / f"{arch}_best.pth"
    else:
        ns = argparse.Namespace(model=arch, dataset="cifar100", learning_rate=0.05, lr_decay_epochs=[150, 180, 210])
        obj = {"opt": ns, "model": net.state_dict(), "optimizer": opt.state_dict()}
        path = d / f"{arch}_last.pth"
    # CRD's files date from 2019 (torch ≤ 1.5): the legacy, non-zip serialisation; the others the current one
    torch.save(obj, path, **({"_use_new_zipfile_serialization": False} if kind == "epoch" else {}))
    return path, net.eval()


@pytest.mark.parametrize("arch,kind", [("resnet56", "epoch"), ("wrn_40_2", "epoch"), ("resnet8x4", "best"),
                                       ("resnet20", "last")])
def test_released_layouts_load_through_teacher_ckpt(tmp_path, arch, kind, one_thread):
    from kdx.build import build
    from kdx.run import run

    path, net = _official_file(tmp_path / "download_ckpts" / "cifar_teachers", arch, kind)
    overrides = [o for o in TINY if not o.startswith("data.num_classes")] + [
        "data.num_classes=100", f"teacher_arch={arch}", f"teacher.ckpt={path}"]
    job = build(compose_cfg(overrides, tmp_path), run_job=run)
    teacher = job.module.teacher
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x, None, None).logits, net(x))  # the same function as the file's network
    assert teacher.info["ckpt"] == str(path) and teacher.info["epochs"] == {"epoch": 240, "best": 231}.get(kind)
    assert teacher.known_acc1 is None  # measured on this run's test split, not taken from the file


def test_meta_of_the_released_layout(tmp_path):
    path, _ = _official_file(tmp_path, "resnet8")
    assert checkpoint_meta(path) == {"epochs": 240, "layout": "mdistiller/CRD {'epoch', 'model', ...}"}
    torch.save({"weights": {}}, tmp_path / "other.pth")
    assert checkpoint_meta(tmp_path / "other.pth") == {} and checkpoint_meta(tmp_path / "missing.pth") == {}
    assert set(load_state_dict_file(path, "teacher.ckpt")) == set(create_model("resnet8", 100).state_dict())


def test_wrong_architecture_is_refused_naming_the_file_and_its_architecture(tmp_path):
    from kdx.build import build
    from kdx.run import run

    path, _ = _official_file(tmp_path, "resnet8x4")
    overrides = [o for o in TINY if not o.startswith("data.num_classes")] + [
        "data.num_classes=100", "teacher_arch=resnet32x4", f"teacher.ckpt={path}"]
    with pytest.raises(CheckpointError) as err:
        build(compose_cfg(overrides, tmp_path), run_job=run)
    msg = str(err.value)
    assert str(path) in msg and "teacher_arch=resnet8x4" in msg and "teacher.ckpt" in msg


@pytest.mark.parametrize("obj", [{"epoch": 240, "weights": {"a": torch.ones(1)}}, {"epoch": 240, "model": {}},
                                 [torch.ones(1)]])
def test_wrong_layout_is_refused_naming_the_file(tmp_path, obj):
    path = tmp_path / "resnet56_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=r"holds no state dict of tensors.*teacher\.ckpt") as err:
        load_state_dict_file(path, "teacher.ckpt")
    assert str(path) in str(err.value) and "'model'" in str(err.value)
