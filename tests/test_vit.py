"""ViT students and teachers through ``timm/<name>``: the input size follows the data, DeiT's distillation token
(``distill=deit``, hard and soft, alone or with another logit method on the class token), and the feature methods
on ViT token maps. Tiny ViTs (embed 16–32, depth 1–3), synthetic data, no network."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import TINY, compose_cfg
from kdx.api import load_student
from kdx.distill.base import Batch, ModelOutput
from kdx.distill.deit import DeiT
from kdx.distill.kd import KD
from kdx.distill.none import CrossEntropy
from kdx.errors import ConfigError
from kdx.regimes.step import distill_step
from kdx.run import build_job, run

pytestmark = pytest.mark.usefixtures("one_thread")


def vit(prefix: str = "model", name: str = "vit_tiny_patch16_224", **kw) -> list[str]:
    """Overrides for a tiny timm ViT (patch 8 unless given: a 4×4 grid on 32×32 images)."""
    kw = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, **kw}
    head = ["teacher_arch=timm", f"teacher.model.name=timm/{name}"] if prefix == "teacher.model" else \
        ["model=timm", f"model.name=timm/{name}"]
    return head + [f"+{prefix}.{k}={v}" for k, v in kw.items()]


DISTILLED = "deit_tiny_distilled_patch16_224"


# ------------------------------------------------------------------------------------------ input size
def test_vit_input_size_and_channels_follow_the_data(tmp_path):
    """32×32 RGB → img_size 32 (a 4×4 grid of patch 8); 1×24×24 → in_chans 1, img_size 24: no 224 mismatch."""
    job = build_job(compose_cfg(TINY + vit(), tmp_path, "rgb"))
    net = job.module.student
    assert net.patch_embed.img_size == (32, 32) and net.patch_embed.grid_size == (4, 4)
    assert list(job.cfg.model.data_shape) == [3, 32, 32]  # recorded: sub-runs and sidecars rebuild the same network
    gray = build_job(compose_cfg(TINY + vit() + ["data.channels=1", "data.image_size=24"], tmp_path, "gray"))
    net = gray.module.student
    assert net.patch_embed.img_size == (24, 24) and net.patch_embed.proj.in_channels == 1
    assert net(torch.zeros(2, 1, 24, 24)).shape == (2, 10)


def test_a_vit_trained_on_32px_data_reloads_through_the_api(tmp_path):
    results = run(compose_cfg(TINY + vit() + ["task=train"], tmp_path))
    student = load_student(results["output_dir"])
    assert student(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)


def test_a_size_the_vit_cannot_take_names_the_setting(tmp_path):
    """A fixed img_size against 32×32 data (timm's "Input height (32) doesn't match model (224)")."""
    with pytest.raises(ConfigError, match=r"timm/vit_tiny_patch16_224 cannot take the data's 3×32×32 images with "
                                          r"model.img_size=224: AssertionError: Input height \(32\) doesn't match "
                                          r"model \(224\)\. Remove model.img_size"):
        build_job(compose_cfg(TINY + vit() + ["+model.img_size=224"], tmp_path))


# ------------------------------------------------------------------------------------------ DeiT's loss
def official_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed seeded inputs of the official reference run (see the test below)."""
    torch.manual_seed(0)
    B, C = 4, 5
    torch.randn(B, 3)  # the official loss's `inputs` (fed to a stub teacher returning t)
    t = torch.randn(B, C) * 3
    z_cls, z_dist = torch.randn(B, C) * 2, torch.randn(B, C) * 2
    return t, z_cls, z_dist, torch.tensor([0, 3, 1, 4])


@pytest.mark.parametrize("hard, alpha, tau, official", [
    (False, 0.5, 1.0, 1.2459684610366821),
    (False, 0.3, 3.0, 1.6675816774368286),
    (True, 0.5, 1.0, 3.041332244873047),
    (True, 0.3, 3.0, 2.556302070617676),
])
def test_deit_loss_equals_the_official_distillation_loss(hard, alpha, tau, official):
    """facebookresearch/deit @ 7e160fe, losses.py, DistillationLoss(nn.CrossEntropyLoss(), teacher, 'soft'|'hard',
    alpha, tau)(inputs, (z_cls, z_dist), y) on official_inputs() (torch 2.14 CPU): the sum of kdx's terms."""
    t, z_cls, z_dist, y = official_inputs()
    deit = DeiT(CrossEntropy(), hard=hard, alpha=alpha, tau=tau)
    terms = deit(ModelOutput(z_cls, extra={"dist": z_dist}), ModelOutput(t), Batch(z_cls, y, y), 1)
    assert set(terms) == {"ce", "deit"}
    assert sum(terms.values()).item() == pytest.approx(official, rel=1e-6)


def test_deit_terms_by_hand():
    """Soft: α·Σ_b Σ_c p_t (log p_t − log p_d)·τ²/(B·C) (the official B·C divisor); hard: α·mean −log p_d[argmax t];
    the class token: (1 − α)·CE."""
    t, z_cls, z_dist, y = official_inputs()
    B, C = t.shape
    alpha, tau = 0.3, 3.0
    log_pt, log_pd = (torch.log_softmax(z / tau, 1) for z in (t, z_dist))
    soft = alpha * (log_pt.exp() * (log_pt - log_pd)).sum() * tau ** 2 / (B * C)
    hard = alpha * -torch.log_softmax(z_dist, 1)[torch.arange(B), t.argmax(1)].mean()
    ce = (1 - alpha) * -torch.log_softmax(z_cls, 1)[torch.arange(B), y].mean()
    for is_hard, want in ((False, soft), (True, hard)):
        terms = DeiT(CrossEntropy(), hard=is_hard, alpha=alpha, tau=tau)(
            ModelOutput(z_cls, extra={"dist": z_dist}), ModelOutput(t), Batch(z_cls, y, y), 1)
        torch.testing.assert_close(terms["deit"], want)
        torch.testing.assert_close(terms["ce"], ce)


def test_deit_composes_with_a_logit_method_on_the_class_token():
    """distill/base=kd: KD's terms on the class-token logits, scaled by 1 − α; the dist token as before."""
    t, z_cls, z_dist, y = official_inputs()
    terms = DeiT(KD(temperature=4.0, w_ce=0.1, w_kd=0.9), alpha=0.25)(
        ModelOutput(z_cls, extra={"dist": z_dist}), ModelOutput(t), Batch(z_cls, y, y), 1)
    kd = KD(temperature=4.0, w_ce=0.1, w_kd=0.9)(ModelOutput(z_cls), ModelOutput(t), Batch(z_cls, y, y), 1)
    assert set(terms) == {"ce", "kd", "deit"}
    torch.testing.assert_close(terms["kd"], 0.75 * kd["kd"])
    torch.testing.assert_close(terms["ce"], 0.75 * kd["ce"])


# ------------------------------------------------------------------------------------------ DeiT end to end
@pytest.mark.parametrize("hard", [False, True])
def test_deit_step_on_a_tiny_distilled_vit_equals_the_hand_derived_terms(tmp_path, teacher_ckpt, hard):
    """Through the real config (distill=deit, its base CE with label smoothing 0.1): the step's terms equal the
    formulas on the captured class-token, dist-token and teacher logits."""
    cfg = compose_cfg(TINY + vit(name=DISTILLED) + ["distill=deit", f"distill.hard={str(hard).lower()}",
                                                   "distill.alpha=0.4", "distill.tau=2.0",
                                                   f"teacher.ckpt={teacher_ckpt}"], tmp_path)
    job = build_job(cfg)
    dm, student = job.datamodule, job.module.student
    x8, y, idx = dm.train_dataset[list(range(8))]
    x = dm.transform_batch((x8, y, idx), train=False)[0]
    got: dict[str, torch.Tensor] = {}
    def keep(who):
        def hook(m, a, out) -> None:  # returns None: the output is left as it is
            got.setdefault(who, out)
        return hook

    student.register_forward_hook(keep("student"))
    job.module.teacher.network.register_forward_hook(keep("teacher"))
    student.train()
    loss, terms = distill_step(job.module.step_parts, Batch(x, y, idx), 1)
    z_cls, z_dist = (z.detach() for z in got["student"])
    t = got["teacher"]
    ce = F.cross_entropy(z_cls, y, label_smoothing=0.1)
    if hard:
        dist = F.cross_entropy(z_dist, t.argmax(1))
    else:
        log_pt, log_pd = torch.log_softmax(t / 2, 1), torch.log_softmax(z_dist / 2, 1)
        dist = (log_pt.exp() * (log_pt - log_pd)).sum() * 4 / z_dist.numel()
    torch.testing.assert_close(terms["ce"].detach(), 0.6 * ce)
    torch.testing.assert_close(terms["deit"].detach(), 0.4 * dist)
    torch.testing.assert_close(loss.detach(), 0.6 * ce + 0.4 * dist)
    student.eval()  # evaluation: the mean of the two heads, a plain tensor
    out = student(x)
    torch.testing.assert_close(out, (z_cls + z_dist) / 2)


def test_deit_runs_end_to_end(tmp_path, teacher_ckpt):
    over = ["distill=deit", "distill.hard=true", "distill/base=kd", f"teacher.ckpt={teacher_ckpt}"]
    results = run(compose_cfg(TINY + vit(name=DISTILLED) + over, tmp_path))
    assert results["status"] == "complete" and math.isfinite(results["history"][-1]["train_loss"])
    assert results["config"]["distill"]["base"]["_target_"] == "kdx.distill.kd.KD"
    assert results["method"] == "deit+kd"  # the label names the base loss too (CE, the default, adds nothing)


def test_deit_needs_a_student_with_a_distillation_token(tmp_path, teacher_ckpt):
    with pytest.raises(ConfigError, match=r"distill=deit needs a student with a distillation token.*"
                                          r"deit_tiny_distilled_patch16_224"):
        build_job(compose_cfg(TINY + ["distill=deit", f"teacher.ckpt={teacher_ckpt}"], tmp_path))


def test_deit_base_must_be_a_logit_method():
    from kdx.distill.at import AT

    with pytest.raises(ConfigError, match=r"distill.base=AT: DeiT's class-token loss must be a logit method"):
        DeiT(AT())


# ------------------------------------------------------------------------------------------ feature taps on ViTs
@pytest.mark.parametrize("method", ["at", "fitnet"])
def test_feature_methods_on_vit_token_maps(tmp_path, teacher_ckpt, method):
    """A ViT student (patch 4: 8×8 token maps of blocks.i) against the resnet8 teacher's feature maps."""
    results = run(compose_cfg(TINY + vit(patch_size=4, depth=3) + [f"distill={method}",
                                                                   f"teacher.ckpt={teacher_ckpt}"], tmp_path))
    assert results["status"] == "complete" and math.isfinite(results["history"][-1]["train_loss"])


def test_vit_teacher_and_vit_student_with_attention_transfer(tmp_path):
    """A ViT teacher (random weights from a file, patch 4) tapped as maps too; AT between the two token grids."""
    ckpt = tmp_path / "vit_teacher.pt"
    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, in_chans=3, embed_dim=32,
                                depth=3, num_heads=2, patch_size=4)
    torch.save(teacher.state_dict(), ckpt)
    cfg = compose_cfg(TINY + vit(patch_size=4) + vit("teacher.model", depth=3, patch_size=4)
                      + ["distill=at", f"teacher.ckpt={ckpt}"], tmp_path)
    job = build_job(cfg)
    shapes = {k: [tuple(f.shape) for f in v] for k, v in _tap_shapes(job).items()}
    assert shapes["teacher"] == [(2, 32, 8, 8)] * 3 and shapes["student"] == [(2, 32, 8, 8)] * 2
    results = run(cfg)
    assert results["status"] == "complete" and math.isfinite(results["history"][-1]["train_loss"])


def _tap_shapes(job) -> dict[str, list[torch.Tensor]]:
    parts = job.module.step_parts
    out = {}
    for who, net, taps in (("teacher", job.module.teacher.network, parts.teacher_taps),
                           ("student", job.module.student, parts.student_taps)):
        with torch.no_grad(), taps.capture() as feats:
            net.eval()(torch.zeros(2, 3, 32, 32))
        out[who] = feats["feats"]
    return out
