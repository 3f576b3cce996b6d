"""Pretrained teachers with their own input pipeline: the teacher's view of the batch (normalisation and size, from
the model's pretrained configuration or given), local pretrained weights, the fine-tuning path at the network's own
resolution, and the wrong combinations refused with the setting named. No network: weights are random, saved to files.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from conftest import TINY, compose_cfg
from kdx.distill.base import Batch
from kdx.errors import CheckpointError, ConfigError
from kdx.models import create_model
from kdx.models.input_view import InputView, ViewSettings, resolve_view
from kdx.regimes.step import distill_step
from kdx.run import build_job, run

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = "vit_tiny_patch16_224"  # pretrained cfg: 224×224, mean = std = (0.5, 0.5, 0.5), bicubic
TINY_VIT = {"embed_dim": 16, "depth": 1, "num_heads": 1}


def vit_file(path: Path, classes: int) -> Path:
    """Random weights of a tiny ViT (timm's vit_tiny_patch16_224 layout, 224×224) in a local file."""
    torch.manual_seed(1)
    torch.save(timm.create_model(VIT, num_classes=classes, **TINY_VIT).state_dict(), path)
    return path


def pretrained_vit_teacher(file: Path) -> list[str]:
    """A pretrained-style teacher: the local file's weights as they are, its view resolved from its pretrained cfg."""
    return ["teacher_arch=timm", f"teacher.model.name=timm/{VIT}",
            *[f"+teacher.model.{k}={v}" for k, v in TINY_VIT.items()],
            "teacher.from_pretrained=true", f"teacher.model.pretrained_file={file}", "teacher.input.size=auto",
            "teacher.input.mean=auto", "teacher.input.std=auto", "teacher.input.interpolation=auto"]


def seen_by_networks(job, n: int = 4) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One distillation step on the first ``n`` training images (no augmentation): the inputs the teacher's and the
    student's networks received, the uint8 images and the student's batch."""
    dm = job.datamodule
    x8, y, idx = dm.train_dataset[list(range(n))]
    x = dm.transform_batch((x8, y, idx), train=False)[0]
    seen: dict[str, torch.Tensor] = {}
    def keep(who):
        def hook(m, a) -> None:  # returns None: the input is left as it is
            seen.setdefault(who, a[0])
        return hook

    hooks = [job.module.teacher.network.register_forward_pre_hook(keep("teacher")),
             job.module.student.register_forward_pre_hook(keep("student"))]
    distill_step(job.module.step_parts, Batch(x, y, idx), 1)
    for h in hooks:
        h.remove()
    return seen, x8, x


def reference_view(x8: torch.Tensor, size: int, mode: InterpolationMode, mean, std) -> torch.Tensor:
    """The teacher's own pipeline on the known images, independently: [0, 1] floats, torchvision's Resize (antialias),
    Normalize with the teacher's statistics."""
    return TF.normalize(TF.resize(x8.float() / 255, [size, size], interpolation=mode, antialias=True), mean, std)


def test_teacher_sees_its_own_view_resolved_from_its_pretrained_config(tmp_path):
    """Student: 3×32×32 in the data's normalisation; the teacher (local pretrained file, auto view): exactly its own
    224×224 bicubic view in its pretrained mean/std (0.5), built from the same batch on the device."""
    cfg = compose_cfg(TINY + ["data.augment=false", "data.batch_size=4"] + pretrained_vit_teacher(vit_file(
        tmp_path / "vit.pth", 10)), tmp_path)
    job = build_job(cfg)
    seen, x8, x = seen_by_networks(job)
    dm = job.datamodule
    assert dm.mean != (0.5, 0.5, 0.5)  # the data's statistics differ from the teacher's
    assert seen["student"].shape == (4, 3, 32, 32) and torch.equal(seen["student"], x)
    want = reference_view(x8, 224, InterpolationMode.BICUBIC, [0.5] * 3, [0.5] * 3)
    assert seen["teacher"].shape == (4, 3, 224, 224)
    torch.testing.assert_close(seen["teacher"], want, atol=2e-5, rtol=0)
    teacher = job.module.teacher
    assert teacher.info["input"] == {"size": [224, 224], "interpolation": "bicubic", "mean": [0.5] * 3,
                                     "std": [0.5] * 3}
    assert teacher.info["ckpt"].startswith("pretrained file") and teacher.network.patch_embed.img_size == (224, 224)


def test_given_view_end_to_end_with_the_teacher_accuracy_on_its_view(tmp_path, teacher_ckpt):
    """Explicit settings (48×48 bilinear, ImageNet statistics) on a kdx teacher: pixels as the reference, and a whole
    run records the view and measures the teacher's accuracy on it."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    over = TINY + ["data.augment=false", f"teacher.ckpt={teacher_ckpt}", "teacher.input.size=48",
                   f"teacher.input.mean=[{','.join(map(str, mean))}]", f"teacher.input.std=[{','.join(map(str, std))}]"]
    seen, x8, _ = seen_by_networks(build_job(compose_cfg(over, tmp_path, "step")))
    torch.testing.assert_close(seen["teacher"], reference_view(x8, 48, InterpolationMode.BILINEAR, mean, std),
                               atol=2e-5, rtol=0)
    results = run(compose_cfg(over, tmp_path, "run"))
    assert results["teacher_info"]["input"]["size"] == [48, 48] and results["teacher_acc1"] is not None


def test_view_module_is_the_identity_or_an_affine_map_without_resize():
    """No settings: no view. Renormalisation alone is exact per channel; a resize alone keeps the normalisation."""
    net = torch.nn.Identity()
    assert resolve_view(ViewSettings(), net, [0.5], [0.25], "teacher.input") is None
    view = InputView([0.5, 0.4], [0.25, 0.2], None, [0.1, 0.2], [0.5, 0.4])
    x = torch.randn(2, 2, 5, 5)
    want = (x * torch.tensor([0.25, 0.2]).view(1, 2, 1, 1) + torch.tensor([0.5, 0.4]).view(1, 2, 1, 1)
            - torch.tensor([0.1, 0.2]).view(1, 2, 1, 1)) / torch.tensor([0.5, 0.4]).view(1, 2, 1, 1)
    torch.testing.assert_close(view(x), want)
    resize = InputView(None, None, (10, 10), interpolation="nearest")
    assert torch.equal(resize(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))


@pytest.mark.parametrize("settings, match", [
    ({"size": "auto"}, r"teacher.input.size=auto reads the model's pretrained configuration"),
    ({"mean": [0.5, 0.5, 0.5]}, r"teacher.input.mean and teacher.input.std go together"),
    ({"mean": [0.5], "std": [0.5]}, r"teacher.input.mean=\[0.5\]: give auto or 3 numbers"),
    ({"size": 0}, r"teacher.input.size=0"),
    ({"size": 8, "interpolation": "lanczos"}, r"teacher.input.interpolation='lanczos'"),
])
def test_bad_view_settings_name_the_setting(settings, match):
    with pytest.raises(ConfigError, match=match):
        resolve_view(ViewSettings(**settings), torch.nn.Identity(), [0.5] * 3, [0.2] * 3, "teacher.input")


def test_unknown_view_key_is_refused():
    with pytest.raises(ConfigError, match=r"Unknown key 'teacher.input.sise'"):
        ViewSettings.from_node({"sise": 3}, "teacher.input")


# ------------------------------------------------------------------------------------------ wrong combinations
def test_teacher_head_with_the_wrong_class_count_is_refused(tmp_path):
    """A checkpoint with a 7-way classifier on 10-class data (kdx's checkpoint check), and pretrained weights with a
    7-way head (timm would silently put a fresh classifier on them)."""
    ckpt = tmp_path / "seven.pt"
    torch.save(create_model("resnet8", num_classes=7).state_dict(), ckpt)
    with pytest.raises(CheckpointError, match=r"(?s)seven.pt does not fit.*fc.weight: checkpoint \(7, 64\) vs model "
                                              r"\(10, 64\).*set teacher.ckpt"):
        build_job(compose_cfg(TINY + [f"teacher.ckpt={ckpt}"], tmp_path, "ckpt"))
    with pytest.raises(ConfigError, match=r"teacher.from_pretrained=true: the pretrained classifier of timm/"
                                          r"vit_tiny_patch16_224 has 7 classes but data=synthetic has 10"):
        build_job(compose_cfg(TINY + pretrained_vit_teacher(vit_file(tmp_path / "v7.pth", 7)), tmp_path, "pre"))


def test_a_resolution_the_teacher_cannot_take_is_refused(tmp_path, teacher_ckpt):
    """resnet8 ends in AvgPool2d(8): a 16×16 view leaves a 4×4 map it cannot pool."""
    with pytest.raises(ConfigError, match=r"teacher.input.size: the teacher \(CifarResNet\) cannot take its view of "
                                          r"the data \(\[16, 16\]\).*Set teacher.input.size"):
        build_job(compose_cfg(TINY + [f"teacher.ckpt={teacher_ckpt}", "teacher.input.size=16"], tmp_path))


def test_a_teacher_kdx_would_train_is_refused_a_view(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher.input sets the view of a teacher trained elsewhere.*"
                                          r"teacher.model.input_size"):
        build_job(compose_cfg(TINY + ["teacher.input.size=48"], tmp_path))
    assert not (tmp_path / "run" / "teacher").exists()  # refused before any training


def test_from_pretrained_needs_pretrained_weights(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher.from_pretrained=true needs pretrained weights"):
        build_job(compose_cfg(TINY + ["teacher_arch=timm", "teacher.from_pretrained=true"], tmp_path))


# ------------------------------------------------------------------------------------------ local weights, fine-tuning
def test_local_pretrained_file_keeps_a_matching_head_and_replaces_another(tmp_path):
    """model.pretrained_file (offline): every weight from the file; a classifier of another class count is fresh."""
    file = vit_file(tmp_path / "vit.pth", 10)
    saved = torch.load(file)
    same = create_model(f"timm/{VIT}", num_classes=10, pretrained_file=str(file), **TINY_VIT).state_dict()
    assert all(torch.equal(saved[k], same[k]) for k in saved)
    other = create_model(f"timm/{VIT}", num_classes=3, pretrained_file=str(file), **TINY_VIT).state_dict()
    assert other["head.weight"].shape == (3, 16)
    assert all(torch.equal(saved[k], other[k]) for k in saved if not k.startswith("head."))
    with pytest.raises(ConfigError, match=r"model.pretrained_file=.*nowhere.pth: no such file"):
        create_model(f"timm/{VIT}", num_classes=3, pretrained_file=str(tmp_path / "nowhere.pth"))


def test_fine_tuning_runs_the_network_at_its_own_resolution(tmp_path):
    """task=train with model.input_size: the 32×32 batch is resized by the network to its 48×48 (img_size 48), the
    run stores the teacher, and the same node as a teacher loads it at that resolution."""
    vit = ["model=timm", f"model.name=timm/{VIT}", "model.input_size=48", "+model.patch_size=16",
           *[f"+model.{k}={v}" for k, v in TINY_VIT.items()]]
    job = build_job(compose_cfg(TINY + ["task=train"] + vit, tmp_path, "job"))
    net = job.module.student
    grids: list[tuple[int, ...]] = []
    net.patch_embed.register_forward_pre_hook(lambda m, a: grids.append(tuple(a[0].shape)))  # append → None
    net(torch.zeros(2, 3, 32, 32))
    assert net.patch_embed.img_size == (48, 48) and grids == [(2, 3, 48, 48)]
    assert list(job.cfg.model.data_shape) == [3, 32, 32]
    results = run(compose_cfg(TINY + ["task=train"] + vit, tmp_path, "train"))
    teacher = ["teacher_arch=timm", f"teacher.model.name=timm/{VIT}", "teacher.model.input_size=48",
               "+teacher.model.patch_size=16", *[f"+teacher.model.{k}={v}" for k, v in TINY_VIT.items()],
               f"teacher.ckpt={results['teacher_path']}"]
    job = build_job(compose_cfg(TINY + teacher, tmp_path, "distill"))
    assert job.module.teacher.network.patch_embed.img_size == (48, 48)


RECIPES = Path(__file__).resolve().parent.parent / "conf" / "experiment" / "cifar100" / "pretrained_teacher"


@pytest.mark.parametrize("experiment", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_pretrained_teacher_recipes_compose(tmp_path, experiment):
    from kdx.config import check_values, resolved, validate

    cfg = compose_cfg([f"experiment=cifar100/pretrained_teacher/{experiment}"], tmp_path)
    validate(cfg)
    check_values(resolved(cfg))
    fine_tuning = experiment in ("resnet50", "deit_small")  # task=train recipes; the others are <teacher>_<student>
    net = cfg.model if fine_tuning else cfg.teacher.model
    assert net.pretrained and net.input_size == 224 and str(net.name).startswith("timm/")


def test_torchvision_weights_load_through_timm(tmp_path):
    """torchvision's ResNet state dict (its .pth layout) as model.pretrained_file of timm/resnet18.tv_in1k: the same
    network, the same logits."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    file = tmp_path / "resnet18-tv.pth"
    torch.save(tv.state_dict(), file)
    net = create_model("timm/resnet18.tv_in1k", num_classes=10, pretrained_file=str(file)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), tv(x))


def test_a_teacher_view_is_refused_in_the_data_free_regime(tmp_path, teacher_ckpt):
    """Synthesised images go to the teacher network as they are: a teacher.input view would be silently skipped."""
    over = TINY + ["distill=nayer", f"teacher.ckpt={teacher_ckpt}", "teacher.input.size=48"]
    with pytest.raises(ConfigError, match=r"teacher.input.*data-free regime"):
        build_job(compose_cfg(over, tmp_path))
