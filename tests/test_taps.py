"""Feature taps (kdx.features): shapes for zoo/timm models, equality with the hooked computation,
no features kept across steps or captured in evaluation, clear errors, no hooks when unused,
torch.compile, and the build-time wiring through the real config."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn as nn
from hydra.utils import instantiate

from conftest import TINY, compose_cfg
from kdx.errors import ConfigError
from kdx.features import FeatureTaps, check_taps, feature_shapes, model_tap_sets, tokens_to_map
from kdx.models import create_model, default_taps
from kdx.run import build_job as build


def stages(chs, n, hw=(32, 16, 8)):
    return [(2, c, s, s) for c, s in zip(chs, hw) for _ in range(n)]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet8", stages([16, 32, 64], 1)),
        ("resnet20", stages([16, 32, 64], 3)),  # AFD: 9 features
        ("resnet56", stages([16, 32, 64], 9)),  # AFD: 27 features
        ("resnet8x4", stages([64, 128, 256], 1)),
        ("resnet32x4", stages([64, 128, 256], 5)),
        ("wrn_40_2", stages([32, 64, 128], 6)),  # §4.1: 6×(32×32²), 6×(64×16²), 6×(128×8²)
        ("wrn_16_2", stages([32, 64, 128], 2)),  # §4.1: 2× each
        ("vgg8", [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4), (2, 512, 4, 4)]),
        ("ShuffleV2", [(2, 116, 16, 16)] * 4 + [(2, 232, 8, 8)] * 8 + [(2, 464, 4, 4)] * 4),
    ],
)
def test_zoo_tap_shapes(name, expected):
    model = create_model(name, num_classes=100)
    taps = FeatureTaps(model, default_taps(model))
    assert [tuple(s) for s in feature_shapes(model, taps, (3, 32, 32))] == expected
    assert model.training  # the dry forward restores the mode


def test_every_zoo_model_has_valid_tap_sets_and_a_classifier():
    from kdx.models import list_models

    for name in list_models():
        model = create_model(name, num_classes=10)
        sets = model_tap_sets(model)
        assert {"blocks", "feats", "pooled_feat", "final_map"} <= set(sets), name
        for key, taps in sets.items():
            check_taps(model, taps, f"model.taps.{key}")
        pooled, final = FeatureTaps(model, sets["pooled_feat"]), FeatureTaps(model, sets["final_map"])
        x = torch.randn(2, 3, 32, 32)
        with pooled.capture() as p, final.capture() as f:
            logits = model.eval()(x)
        (p,), (f,) = p.values(), f.values()
        assert torch.allclose(model.get_classifier()(p), logits, atol=1e-5)  # pooled feature → classifier → logits
        assert p.shape == (2, f.shape[1]) and torch.allclose(f.mean((2, 3)), p, atol=1e-5), name  # final map → pool


def test_resnet110_config_taps_every_other_block(tmp_path):
    cfg = compose_cfg(["model=resnet110"], tmp_path)
    model = instantiate(cfg.model, num_classes=100)
    taps = model_tap_sets(model)["blocks"]
    assert len(taps) == 27 and taps[0] == "layer1.1" and taps[-1] == "layer3.17"  # AFD indices 2,4,...,54
    blocks = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(18)]
    assert taps == blocks[1::2]
    shapes = feature_shapes(model, FeatureTaps(model, taps), (3, 32, 32))
    assert [tuple(s) for s in shapes] == stages([16, 32, 64], 9)
    assert len(default_taps(create_model("resnet110", num_classes=100))) == 54  # model.taps=null: every block


def test_taps_equal_the_hooked_computation():
    """CIFAR ResNet taps are ReLU(block output); WRN taps are ReLU(BN1(block input)) and ReLU(final BN)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    res = create_model("resnet20", num_classes=10).eval()
    taps = FeatureTaps(res, default_taps(res))
    with torch.no_grad(), taps.capture() as f:
        res(x)
    h = res.relu(res.bn1(res.conv1(x)))
    h = res.layer1(h)
    assert torch.equal(f["layer1.2"], h)
    assert torch.equal(f["layer2.0"], res.layer2[0](h))
    assert (f["layer3.2"] >= 0).all()

    wrn = create_model("wrn_16_2", num_classes=10).eval()
    taps = FeatureTaps(wrn, default_taps(wrn))
    assert taps.names == ["block1.layer.1.relu1", "block2.layer.0.relu1", "block2.layer.1.relu1",
                          "block3.layer.0.relu1", "block3.layer.1.relu1", "relu"]
    with torch.no_grad():
        with taps.capture() as f:
            wrn(x)
        g1 = wrn.block1(wrn.conv1(x))
        block = wrn.block2.layer[0]
        assert torch.equal(f["block2.layer.0.relu1"], torch.relu(block.bn1(g1)))
        g3 = wrn.block3(wrn.block2(g1))
        assert torch.equal(f["relu"], torch.relu(wrn.bn1(g3)))


def test_timm_cnn_taps():
    model = create_model("timm/resnet18", num_classes=10)
    taps = FeatureTaps(model, default_taps(model))
    assert taps.names == ["act1", "layer1", "layer2", "layer3", "layer4"]
    shapes = [tuple(s) for s in feature_shapes(model, taps, (3, 32, 32))]
    assert shapes == [(2, 64, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2), (2, 512, 1, 1)]


def test_timm_vit_tokens_become_maps():
    model = create_model("timm/vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2)
    taps = FeatureTaps(model, default_taps(model))
    assert taps.names == ["blocks.0", "blocks.1"]
    assert [tuple(s) for s in feature_shapes(model, taps, (3, 32, 32))] == [(2, 192, 8, 8)] * 2
    # the map is the patch tokens (class token dropped) in row-major grid order
    model.eval()
    raw = {}
    hook = model.blocks[1].register_forward_hook(lambda m, a, o: raw.setdefault("t", o))
    with torch.no_grad(), taps.capture() as f:
        model(torch.randn(2, 3, 32, 32))
    hook.remove()
    tokens = raw["t"]
    assert torch.equal(f["blocks.1"][:, :, 0, 1], tokens[:, 1 + 1])
    assert torch.equal(f["blocks.1"][:, :, 2, 3], tokens[:, 1 + 2 * 8 + 3])
    with pytest.raises(ValueError, match="patch grid"):
        tokens_to_map(torch.randn(2, 10, 4), 1, (2, 2))


def test_nothing_is_kept_between_steps_or_outside_a_capture():
    model = create_model("resnet8", num_classes=10)
    taps = FeatureTaps(model, default_taps(model))
    x = torch.randn(2, 3, 32, 32)
    with taps.capture() as first:
        model(x)
    assert not taps.capturing and taps._store is None
    ref = weakref.ref(first["layer3.0"])
    model(x)  # a forward outside a capture (evaluation) stores nothing
    model.eval()
    with torch.no_grad():
        model(x)
    with taps.capture() as second:
        model(x)
    assert first is not second and set(second) == {"layer1.0", "layer2.0", "layer3.0"}
    del first
    gc.collect()
    assert ref() is None, "the taps kept a feature from an earlier step alive"


def test_capture_errors():
    model = create_model("resnet8", num_classes=10)
    taps = FeatureTaps(model, ["layer1.0"])
    with pytest.raises(RuntimeError, match="did not run"):
        with taps.capture():
            model.conv1(torch.randn(1, 3, 8, 8))
    assert not taps.capturing  # an error leaves the taps clean

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.act(x))

    twice = Twice()
    with pytest.raises(RuntimeError, match="ran twice"):
        with FeatureTaps(twice, ["act"]).capture():
            twice(torch.randn(2, 3))


def test_unknown_tap_lists_valid_names():
    model = create_model("resnet8", num_classes=10)
    with pytest.raises(ConfigError) as err:
        FeatureTaps(model, ["layer1.0", "layer9.0"], setting="teacher.model.taps")
    msg = str(err.value)
    assert "teacher.model.taps" in msg and "'layer9.0'" in msg and "layer2.0.conv1" in msg and "fc" in msg
    with pytest.raises(ConfigError, match="duplicate"):
        FeatureTaps(model, ["fc", "fc"])
    with pytest.raises(ConfigError, match="non-empty"):
        FeatureTaps(model, [])


@pytest.mark.parametrize("setting", ["model.taps", "teacher.model.taps"])
def test_unknown_tap_stops_the_run_at_start_up(tmp_path, setting):
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.") + r"\.blocks.*'nope'"):
        build(compose_cfg(TINY + ["distill=afd", f"{setting}={{blocks: [layer1.0, nope]}}"], tmp_path))
    assert not (tmp_path / "teachers").exists(), "the error must come before a teacher is trained"


def test_a_missing_tap_set_names_the_strategy_and_the_setting():
    """A strategy that reads a tap set a model does not declare stops at start-up, naming both (here a user's
    model without tap sets; MobileNetV2 has no preact_feats, as mdistiller's)."""
    from kdx.distill.afd import AFDStrategy
    from kdx.features import attach_feature_taps

    user_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ConfigError, match=r"AFDStrategy reads the tap set\(s\) \['blocks'\] of model .*model\.taps="):
        attach_feature_taps(AFDStrategy(), user_model, None, (3, 32, 32))
    assert "preact_feats" not in model_tap_sets(create_model("mobile_half", num_classes=10))
    with pytest.raises(ConfigError, match="model.taps="):
        create_model("resnet8", num_classes=10, taps=["layer1.0"])  # a plain list: which set?


def test_model_taps_override_reaches_the_strategy(tmp_path):
    over = ["distill=rtk", "model.taps={blocks: [layer2.0, layer3.0]}", "teacher.model.taps={blocks: [layer3.0]}"]
    job = build(compose_cfg(TINY + over, tmp_path))
    rtk = job.module.strategy.feature_loss
    assert rtk.s_shapes == [(32, 16, 16), (64, 8, 8)] and rtk.t_shapes == [(64, 8, 8)]
    assert job.module.step_parts.student_taps.sets == {"blocks": ["layer2.0", "layer3.0"]}
    assert job.module.step_parts.teacher_taps.sets == {"blocks": ["layer3.0"]}


def test_no_hooks_without_a_feature_strategy(tmp_path):
    job = build(compose_cfg(TINY + ["distill=kd"], tmp_path))
    assert job.module.step_parts.student_taps is None and job.module.step_parts.teacher_taps is None
    nets = [job.module.student, job.module.teacher.net]
    assert not any(m._forward_hooks for net in nets for m in net.modules())


def test_attention_parameters_are_a_function_of_the_seed(tmp_path):
    """Every DDP rank builds the same AFD module: it is built after seeding, before the optimiser."""
    params = [build(compose_cfg(TINY + ["distill=afd"], tmp_path, name=f"r{i}")).module.strategy.state_dict()
              for i in range(2)]
    assert params[0].keys() == params[1].keys()
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])
    other = build(compose_cfg(TINY + ["distill=afd", "seed=1"], tmp_path, name="s1")).module.strategy.state_dict()
    assert not torch.equal(other["feature_loss.p_t"], params[0]["feature_loss.p_t"])


def test_training_captures_and_evaluation_does_not(tmp_path):
    job = build(compose_cfg(TINY + ["distill=afd", "trainer.num_sanity_val_steps=1"], tmp_path))
    module = job.module
    seen = {"train": [], "eval": []}

    def probe(m, a, o):
        seen["train" if m.training else "eval"].append(module.step_parts.student_taps.capturing)

    def probe_teacher(m, a, o):
        seen.setdefault("teacher", []).append(module.step_parts.teacher_taps.capturing)

    module.student.fc.register_forward_hook(probe)
    module.teacher.net.fc.register_forward_hook(probe_teacher)
    job.trainer.fit(module, datamodule=job.datamodule)
    job.trainer.test(module, datamodule=job.datamodule, verbose=False)
    n_train = job.trainer.num_training_batches
    assert seen["train"] == [True] * n_train
    assert seen["eval"] and not any(seen["eval"])  # sanity check, validation and test: no capture
    assert seen["teacher"].count(True) == n_train  # the teacher's forward in training steps only
    assert not module.step_parts.student_taps.capturing and not module.step_parts.teacher_taps.capturing


def test_taps_under_torch_compile():
    """Hooks registered before compiling fire inside the compiled graph (dynamo traces them)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10)
    taps = FeatureTaps(model, default_taps(model))
    x = torch.randn(4, 3, 32, 32)
    with taps.capture() as eager:
        model(x)
    compiled = torch.compile(model, backend="aot_eager")
    with taps.capture() as comp:
        out = compiled(x)
    assert list(comp) == list(eager)
    assert all(torch.allclose(comp[k], eager[k], atol=1e-6) for k in eager)
    (out.sum() + sum(f.pow(2).mean() for f in comp.values())).backward()
    assert model.conv1.weight.grad is not None
    compiled(x)  # outside a capture: nothing stored
    assert taps._store is None
