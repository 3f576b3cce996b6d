"""The data-free baselines next to NAYER (DeepInversion, CMI, Fast, DAFL): their losses against hand values and the
official functions, one synthesis step each, and each method end to end through the real config with exact resume
and the cost fields of the data-free regime."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn

from conftest import TINY, compose_cfg
from kdx.datafree.augment import normalize_float
from kdx.datafree.base import SynthesisEnv
from kdx.datafree.cmi import CMI, FeatureMemory, MLPHead, contrastive_loss, random_resized_crop
from kdx.datafree.common import BestBatch, BNStatHooks, Generator, class_balance, dcgan_init, image_prior_tv, jsdiv
from kdx.datafree.dafl import DAFL
from kdx.datafree.deepinv import DeepInversion, jitter_and_flip
from kdx.datafree.fast import Fast, add_meta_grads, set_reptile_grads
from kdx.distill.kd import KD
from kdx.models.registry import create_model
from kdx.run import build_job, run

# ---------------------------------------------------------------------------------------- official reference values
# From zju-vipa/Fast-Datafree 0dcecbc (its datafree/ package is tmtuan1307/NAYER c6bedcd's, byte for byte, for
# criterions.py, hooks.py, synthesis/{deepinversion,contrastive,generative}.py), run on CPU by a scratch script on
# the inputs rebuilt below from the same seeds.


def _logits():
    torch.manual_seed(0)
    return torch.randn(4, 5) * 2, torch.randn(4, 5) * 2


def test_losses_equal_the_official_criterions():
    s, t = _logits()
    assert float(jsdiv(s, t, T=3)) == pytest.approx(0.07135859876871109, rel=1e-5)  # criterions.jsdiv(s, t, T=3)
    assert float(jsdiv(s, t)) == pytest.approx(0.5844326615333557, rel=1e-5)
    assert float(class_balance(t)) == pytest.approx(-1.3465698957443237, rel=1e-5)  # class_balance_loss(t)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 5)
    assert float(image_prior_tv(x)) == pytest.approx(4.111135005950928, rel=1e-5)  # get_image_prior_losses(x)


def test_bn_hooks_with_momentum_equal_the_official_deepinversion_hook():
    """hooks.DeepInversionHook(m, 0.9): r_feature summed over layers, update_mmt between forwards."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)).eval()
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    hooks = BNStatHooks(net, 0.9)
    x1, x2 = torch.randn(8, 3, 6, 6), torch.randn(8, 3, 6, 6) + 1
    got = []
    for x in (x1, x2, x1):
        with hooks.recording():
            net(x)
        got.append(float(hooks.loss().detach()))
        hooks.update_momentum()
    assert got == pytest.approx([4.868671417236328, 4.839841842651367, 4.842637538909912], rel=1e-5)


def test_generator_is_the_official_one_and_its_meta_gradients():
    torch.manual_seed(3)  # models.generator.Generator(nz=16, ngf=8, img_size=32, nc=3) built under the same seed
    g = Generator(nz=16, ngf=8, img_size=32, nc=3).train()
    z = torch.randn(5, 16)
    assert sum(p.numel() for p in g.parameters()) == 21163
    assert float(g(z).sum()) == pytest.approx(7585.7958984375, rel=1e-5)
    torch.manual_seed(4)  # fast_meta.fomaml_grad twice / reptile_grad (alpha 67) on two such generators
    meta, fast = Generator(nz=4, ngf=2, img_size=8), Generator(nz=4, ngf=2, img_size=8)
    fast(torch.randn(3, 4)).sum().backward()
    add_meta_grads(meta, fast)
    add_meta_grads(meta, fast)
    assert float(sum(p.grad.sum() for p in meta.parameters())) == pytest.approx(1840.2906494140625, rel=1e-5)
    set_reptile_grads(meta, fast)
    assert float(sum(p.grad.abs().sum() for p in meta.parameters())) == pytest.approx(4194.70947265625, rel=1e-5)


def test_cmi_head_and_contrastive_loss_equal_the_official_lines():
    """contrastive.MLPHead(6, 3) and the loss lines of CMISynthesizer.synthesize (cr_T 0.2, 4 rows + 5 cached)."""
    torch.manual_seed(5)
    head = MLPHead(6, 3)
    lf, gf, clf, cgf = torch.randn(4, 6), torch.randn(4, 6), torch.randn(5, 6), torch.randn(5, 6)
    pl_, pg = head(torch.cat([lf, clf, gf, cgf])).chunk(2)
    assert float(contrastive_loss(pl_, pg, 4, 0.2, split=True)) == pytest.approx(9.708795547485352, rel=1e-5)
    assert float(contrastive_loss(pl_, pg, 4, 0.2, split=False)) == pytest.approx(4.816461563110352, rel=1e-5)


def test_feature_memory_draws_as_the_official_one_and_the_full_memory_quirk():
    """contrastive.MemoryBank(max_size=8): get_data(6) gives 4, then 0 when exactly full, then 6."""
    rng = torch.Generator().manual_seed(0)
    for fix, want in ((False, [4, 0, 6]), (True, [4, 6, 6])):
        mem, got = FeatureMemory(8, full_fix=fix), []
        for k in range(3):
            mem.add(torch.full((4, 2), float(k)))
            got.append(len(mem.sample(6, rng)))
        assert got == want
    assert mem.data[:, 0].tolist() == [2, 2, 2, 2, 1, 1, 1, 1] and mem.ptr == 4  # a ring: the oldest replaced
    empty = contrastive_loss(torch.eye(2)[:1], torch.eye(2)[:1], 1, 0.2, split=True)
    assert math.isnan(float(empty))  # the official second mean over no negatives


def test_two_deepinversion_steps_equal_the_official_synthesizer(one_thread):
    """DeepInvSyntheiszer(iterations=2, lr_g 0.1, adv 1, bn 10, oh 1, tv 1e-3).synthesize(targets) with its
    jitter_and_flip patched to the identity, resnet8 teacher and student built under seed 11 (eval mode), inputs
    torch.randn after seed 12, mean (0.5, 0.4, 0.3), std (0.2, 0.25, 0.3): the returned (last, aliased) batch."""
    torch.manual_seed(11)
    teacher, student = create_model("resnet8", 10).eval(), create_model("resnet8", 10).eval()
    teacher.requires_grad_(False)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    env = SynthesisEnv(teacher, student, 10, (3, 32, 32), mean, std, [str(i) for i in range(10)], "synthetic",
                       torch.Generator().manual_seed(0), torch.device("cpu"))
    sm = DeepInversion(_kd(), g_steps=2, synthesis_batch_size=6, tv=1e-3, jitter=0.0, flip=False)
    sm.setup(env)
    torch.manual_seed(12)
    x = torch.randn(6, 3, 32, 32).requires_grad_()
    targets = torch.tensor([0, 1, 1, 3, 7, 9])
    batch = {"x": x, "targets": targets, "opt": torch.optim.Adam([x], 0.1, betas=(0.5, 0.99))}
    sm._start_batch = lambda env: setattr(sm, "_batch", batch)  # the official inputs instead of a fresh draw
    sm.synthesis_step(env, 0, 0, 0)
    out = sm.synthesis_step(env, 0, 1, 0).images[0]
    assert float(out.sum()) == pytest.approx(7423.35888671875, rel=1e-4)
    assert out[0, 0, 0, :4].tolist() == pytest.approx([0.5146006, 0.5153575, 0.5291921, 0.4015034], abs=2e-4)
    assert out[5, 2, 31, 28:].tolist() == pytest.approx([0.1915818, 0.2039170, 0.0978445, 0.3637482], abs=2e-4)


def _official_env(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)) -> SynthesisEnv:
    torch.manual_seed(11)
    teacher, student = create_model("resnet8", 10).eval(), create_model("resnet8", 10).eval()
    teacher.requires_grad_(False)
    return SynthesisEnv(teacher, student, 10, (3, 32, 32), mean, std, [str(i) for i in range(10)], "synthetic",
                        torch.Generator().manual_seed(0), torch.device("cpu"))


def test_two_fast_syntheses_equal_the_official_meta_synthesizer(one_thread, monkeypatch):
    """FastMetaSynthesizer(nz 8, ngf 4, iterations 2, lr_g 5e-3, lr_z 0.015, adv 1.33, bn 10, oh 0.5, bn_mmt 0.9,
    is_maml 1, warm-up 0), its Generator built after seed 13, its augmentation patched to the normalisation alone,
    .cuda() to the identity; two synthesize(targets) calls, z drawn after seeds 20 and 21: each returned batch and
    the meta generator after both."""
    import kdx.datafree.fast as fast_mod

    monkeypatch.setattr(fast_mod, "augment", lambda x, mean, std, *a: normalize_float(x, mean, std))
    env, targets = _official_env(), torch.tensor([0, 1, 1, 3, 7, 9])
    sm = Fast(_kd(), g_steps=2, synthesis_batch_size=6, nz=8, ngf=4, reset_l0=False)
    sm.setup(env)
    torch.manual_seed(13)
    sm.generator.load_state_dict(Generator(nz=8, ngf=4).state_dict())
    sums = []
    for k in range(2):
        def start(env, ep, unit, warmup, k=k):
            torch.manual_seed(20 + k)
            z = torch.randn(6, 8).requires_grad_()
            fast = copy.deepcopy(sm.generator)
            opt = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": 0.015}], lr=5e-3,
                                   betas=(0.5, 0.999))
            sm._batch = {"z": z, "targets": targets, "fast": fast, "opt": opt, "best": BestBatch()}

        monkeypatch.setattr(sm, "_start_batch", start)
        sm.synthesis_step(env, k, 0, 0)
        sums.append(float(sm.synthesis_step(env, k, 1, 0).images[0].sum()))
    assert sums == pytest.approx([9369.6728515625, 8931.818359375], rel=1e-6)
    assert float(sum(p.sum() for p in sm.generator.parameters())) == pytest.approx(30.265939712524414, rel=1e-4)


def test_two_cmi_syntheses_equal_the_official_synthesizer(one_thread, monkeypatch):
    """CMISynthesizer(nz 8, ngf 4, bank_size 12, n_neg 8, head_dim 4, iterations 2, lr_g 1e-3, adv 0.5, bn 1, oh 1,
    cr 0.8, cr_T 0.2), its Generator built after seed 14 (then its probe input, memory and head), reset_model
    patched to a no-op and both views to the normalised image; two synthesize(targets) calls, z after seeds 30 and
    31 (the second draws its negatives from the 6 stored rows): each returned batch, the head and generator after."""
    env, targets = _official_env(), torch.tensor([0, 1, 1, 3, 7, 9])
    sm = CMI(_kd(), g_steps=2, synthesis_batch_size=6, nz=8, ngf=4, head_dim=4, memory_size=12, n_neg=8,
             feature_reuse=True)  # the official re-initialisation is patched out of the reference
    sm.setup(env)
    torch.manual_seed(14)
    sm.generator.load_state_dict(Generator(nz=8, ngf=4).state_dict())
    dim = sm.head.head[0].in_features
    torch.randn(1, 3, 32, 32), torch.randn(12, 2 * dim)  # the official probe input and random memory rows
    sm.head.load_state_dict(MLPHead(dim, 4).state_dict())
    sm.head_opt = torch.optim.Adam(sm.head.parameters(), lr=1e-3)
    monkeypatch.setattr(sm, "_views", lambda env, x: (normalize_float(x, env.mean, env.std),) * 2)
    sums = []
    for k in range(2):
        def start(env, k=k):
            torch.manual_seed(30 + k)
            z = torch.randn(6, 8).requires_grad_()
            opt = torch.optim.Adam([{"params": sm.generator.parameters()}, {"params": [z]}], 1e-3, betas=(0.5, 0.999))
            sm._batch = {"z": z, "targets": targets, "opt": opt, "best": BestBatch()}

        monkeypatch.setattr(sm, "_start_batch", start)
        sm.synthesis_step(env, k, 0, 0)
        sums.append(float(sm.synthesis_step(env, k, 1, 0).images[0].sum()))
    assert sums == pytest.approx([9473.8916015625, 9353.1904296875], rel=1e-6)
    assert float(sum(p.sum() for p in sm.head.parameters())) == pytest.approx(-13.012618064880371, rel=1e-4)
    assert float(sum(p.sum() for p in sm.generator.parameters())) == pytest.approx(23.739566802978516, rel=1e-4)
    assert sm.memory.n_updates == 12


# ---------------------------------------------------------------------------------------- hand values and invariants


def test_hand_values_of_the_shared_losses():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    assert float(image_prior_tv(x)) == pytest.approx(1 + 2 + 1 + 3)  # |d_h| 1, |d_v| 2, diagonals 1 and 3
    assert float(class_balance(torch.zeros(3, 7))) == pytest.approx(-math.log(7))
    z = torch.randn(6, 5)
    assert float(jsdiv(z, z, T=3)) == pytest.approx(0.0, abs=1e-7) and float(jsdiv(z, -z)) > 0
    e = torch.eye(2)  # orthonormal projections at T = 1: each row −log(e / (e + 1))
    per_row = math.log(1 + math.exp(-1))
    assert float(contrastive_loss(e, e, 1, 1.0, split=True)) == pytest.approx(2 * per_row)
    assert float(contrastive_loss(e, e, 1, 1.0, split=False)) == pytest.approx(per_row)


def test_augmentations_are_rolls_flips_and_resized_crops():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8).requires_grad_()
    rng = torch.Generator().manual_seed(0)
    assert torch.equal(jitter_and_flip(x, 0.0, False, rng), x)
    for _ in range(5):  # one roll (and maybe one flip) of the whole batch: the same shift for every image
        y = jitter_and_flip(x, 1 / 8, True, rng)
        shifts = [(dy, dx, f) for dy in range(-1, 2) for dx in range(-1, 2) for f in (0, 1)
                  if torch.equal(y, torch.roll(x, (dy, dx), (2, 3)).flip(3) if f else torch.roll(x, (dy, dx), (2, 3)))]
        assert len(shifts) == 1
    assert torch.allclose(random_resized_crop(x, (1.0, 1.0), (1.0, 1.0), rng), x, atol=1e-4)  # the whole image
    crop = random_resized_crop(x, (0.25, 0.25), (1.0, 1.0), rng)  # a 4×4 box resized to 8×8
    crop.sum().backward()
    assert crop.shape == x.shape and int((x.grad[0, 0] > 1e-4).sum()) == 16  # only the box feeds the output


def test_generator_reinit_and_fast_schedule():
    g = Generator(nz=8, ngf=4, img_size=8)
    dcgan_init(list(g.modules()), torch.Generator().manual_seed(0))
    w = g.l1[0].weight
    assert abs(float(w.std()) - 0.02) < 0.005 and float(g.l1[0].bias.abs().sum()) == 0
    bn = g.conv_blocks[0]
    assert abs(float(bn.weight.mean()) - 1) < 0.02 and float(bn.bias.abs().sum()) == 0
    fast = Fast(KD())  # the official script: warm-up 20, one synthesis per epoch
    assert [e for e in range(25) if fast.adv_on(e, 0, 20)] == list(range(19, 25))  # from call 20: one epoch early
    late = Fast(KD(), adv_from_call=False)
    assert [e for e in range(25) if late.adv_on(e, 0, 20)] == list(range(20, 25))
    assert fast.call_index(139, 0) == 140 == fast.reset_l0_at + 20  # reset_l0 at the 140th synthesis


def test_dafl_refuses_a_loss_that_reads_labels_and_declares_no_bank():
    from kdx.distill.dkd import DKD
    from kdx.distill.topkd import TopKScale

    for loss in (KD(w_ce=1.0), DKD(), KD(w_ce=0.0, teacher_transform=TopKScale())):
        assert loss.reads_labels()
        with pytest.raises(ValueError, match="distill.loss.w_ce"):
            DAFL(loss)
    assert not _kd().reads_labels()
    assert DAFL.uses_bank is False and DeepInversion.uses_bank and DAFL(_kd()).rounds(0, 0) == 80


# ---------------------------------------------------------------------------------------- one synthesis step


def _kd() -> KD:
    return KD(temperature=20.0, w_ce=0.0, w_kd=1.0)  # distill/loss=kd of the data-free methods


def _env(seed: int = 0) -> SynthesisEnv:
    torch.manual_seed(seed)
    teacher, student = create_model("resnet8", 10).eval(), create_model("resnet8", 10)
    teacher.requires_grad_(False)
    return SynthesisEnv(teacher, student, 10, (3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                        [str(i) for i in range(10)], "synthetic", torch.Generator().manual_seed(seed),
                        torch.device("cpu"))


def _frozen(env: SynthesisEnv) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in env.teacher.state_dict().items()}


def _untouched(env: SynthesisEnv, before: dict[str, torch.Tensor]) -> None:
    assert all(torch.equal(v, before[k]) for k, v in env.teacher.state_dict().items())
    assert all(p.grad is None for p in (*env.teacher.parameters(), *env.student.parameters()))


def _params(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def _changed(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a, b))


def test_deepinversion_step_moves_the_images_only(one_thread):
    env, sm = _env(), DeepInversion(KD(), g_steps=2, synthesis_batch_size=6)
    sm.setup(env)
    before = _frozen(env)
    out = sm.synthesis_step(env, 0, 0, 0)
    x1 = sm._batch["x"].detach().clone()
    assert set(out.terms) == {"bn", "oh", "adv"} and out.images is None
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert float(x1.min()) >= lo and float(x1.max()) <= hi  # clamped to the image range after the step
    out = sm.synthesis_step(env, 0, 1, 0)
    x2 = out.images[0]  # keep_best=false (official): the last iterate, denormalised
    assert not torch.allclose(x2, x1 * 0.25 + 0.5) and x2.shape == (6, 3, 32, 32)
    assert out.images[1].tolist() == sorted(out.images[1].tolist())  # sorted targets
    assert float(x2.min()) >= -1e-6 and float(x2.max()) <= 1 + 1e-6  # back in [0, 1]
    _untouched(env, before)


def test_cmi_step_moves_generator_latents_head_and_memory(one_thread):
    env = _env()
    sm = CMI(KD(), g_steps=2, synthesis_batch_size=6, nz=8, ngf=4, head_dim=4, memory_size=12, n_neg=5)
    sm.setup(env)
    before, head0 = _frozen(env), _params(sm.head)
    sm.synthesis_step(env, 0, 0, 0)
    gen1, z1 = _params(sm.generator), sm._batch["z"].detach().clone()
    out = sm.synthesis_step(env, 0, 1, 0)
    assert _changed(gen1, _params(sm.generator)) and _changed(head0, _params(sm.head))
    assert sm._batch == {} and out.images[0].shape == (6, 3, 32, 32) and z1.shape == (6, 8)
    assert set(out.terms) == {"bn", "oh", "adv", "cr"} and sm.memory.n_updates == 6
    assert sm.memory.data.shape[1] == 2 * sm.head.head[0].in_features  # (local, global) instance means
    _untouched(env, before)


def test_fast_step_meta_update_after_the_last_inner_step(one_thread):
    env = _env()
    sm = Fast(KD(), g_steps=3, synthesis_batch_size=6, nz=8, ngf=4)
    sm.setup(env)
    before, meta0 = _frozen(env), _params(sm.generator)
    for u in range(2):
        sm.synthesis_step(env, 0, u, 0)
        assert not _changed(meta0, _params(sm.generator))  # the meta generator waits for the last inner step
    fast = sm._batch["fast"]
    assert _changed(meta0, _params(fast))
    out = sm.synthesis_step(env, 0, 2, 0)
    assert _changed(meta0, _params(sm.generator)) and out.images is not None
    assert sm.hooks.mmt[0] is not None  # momentum statistics folded in after the synthesis
    _untouched(env, before)


def test_dafl_step_and_samples(one_thread):
    env = _env()
    sm = DAFL(_kd(), synthesis_batch_size=6, nz=8, ngf=4)
    sm.setup(env)
    before, g0 = _frozen(env), _params(sm.generator)
    out = sm.synthesis_step(env, 0, 0, 0)
    assert set(out.terms) == {"oh", "act", "balance"} and out.images is None and _changed(g0, _params(sm.generator))
    g1 = _params(sm.generator)
    x, y = sm.sample(env, 5)
    assert x.shape == (5, 3, 32, 32) and y.tolist() == [0] * 5 and not _changed(g1, _params(sm.generator))
    _untouched(env, before)


# ---------------------------------------------------------------------------------------- end to end

SMALL = ["module.warmup=1", "module.kd_steps=4", "module.batch_size=16", "module.grid_per_class=2"]
METHODS = {
    "deepinv": ["distill.g_steps=2", "distill.synthesis_batch_size=12", "distill.rounds=2"],
    "cmi": ["distill.g_steps=2", "distill.synthesis_batch_size=12", "distill.ngf=8", "distill.nz=16",
            "distill.head_dim=8", "distill.memory_size=48", "distill.n_neg=10"],
    "fast": ["distill.g_steps=2", "distill.synthesis_batch_size=12", "distill.ngf=8", "distill.nz=16",
             "distill.reset_l0_at=0"],
    "dafl": ["distill.rounds=2", "distill.synthesis_batch_size=12", "distill.ngf=8", "distill.nz=16"],
}


class StopAfter(pl.Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _student(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return {k: v for k, v in state["state_dict"].items() if k.startswith("student.")}


@pytest.mark.parametrize("method", list(METHODS))
def test_end_to_end_exact_resume_and_cost_fields(method, tmp_path, teacher_ckpt, one_thread):
    args = [*TINY, f"distill={method}", "trainer.max_epochs=3", f"teacher.ckpt={teacher_ckpt}", *SMALL,
            *METHODS[method]]
    straight = run(compose_cfg(args, tmp_path, "straight"))
    job = build_job(compose_cfg(args, tmp_path, "cut"))  # the same run, stopped after 2 epochs, then resumed
    job.trainer.callbacks.append(StopAfter(2))
    job.trainer.fit(job.module, datamodule=job.module.fit_datamodule())
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    resumed = run(compose_cfg(args + [f"ckpt_path={last}"], tmp_path, "resumed"))
    a, b = (_student(tmp_path / name / "checkpoints" / "last.ckpt") for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume is not bit-identical"
    assert [h["val_acc1"] for h in straight["history"]] == [h["val_acc1"] for h in resumed["history"]]
    # cost: per-epoch fields add up to the totals, steps follow the schedule, images match the bank or the samples
    saved = json.loads((tmp_path / "straight" / "results.json").read_text())
    df, hist, module = saved["datafree"], saved["history"], job.module
    assert len(hist) == 3 and df["training_images_used"] == 0
    for key, total in (("synthesis_s", "synthesis_time_s"), ("student_s", "student_time_s")):
        assert sum(h[key] for h in hist) == pytest.approx(df[total], abs=0.02)
        assert hist[-1][f"{key}_total"] == pytest.approx(df[total], abs=0.01)
    assert hist[0]["student_s"] == 0 and all(h["synthesis_s"] > 0 for h in hist)  # epoch 1 is the warm-up
    steps = [module.synthesiser.synthesis_units(e, 1) for e in range(3)]
    assert [h["synthesis_steps"] for h in hist] == steps and df["synthesis_steps"] == sum(steps) == \
        df["synthesis_steps_full_run"]
    if module.synthesiser.uses_bank:
        per_epoch = [module.synthesiser.images_per_epoch(e, 1) for e in range(3)]
        assert [h["bank_images"] for h in hist] == [sum(per_epoch[: e + 1]) for e in range(3)]
    else:
        per_epoch = [0, 4 * 16, 4 * 16]  # every student step draws its batch
        assert all(h["bank_images"] == 0 for h in hist)
    assert [h["images_synthesised"] for h in hist] == per_epoch and df["images_synthesised"] == sum(per_epoch)
    assert resumed["datafree"]["synthesis_steps"] == df["synthesis_steps"]


def test_every_baseline_config_composes_with_its_official_regime():
    from kdx.config import validate

    want = {"deepinv": (0, 0.1, 1000), "cmi": (0, 0.1, 200), "fast": (20, 0.2, 2), "dafl": (0, 0.1, 1)}
    for method, (warmup, lr, g_steps) in want.items():
        cfg = compose_cfg([f"distill={method}", "data=cifar100"], Path("/tmp/kdx-datafree-compose"))
        validate(cfg)
        assert (cfg.module.warmup, cfg.optim.lr, cfg.distill.g_steps) == (warmup, lr, g_steps)
        assert cfg.module.batch_size == cfg.distill.synthesis_batch_size == 256 and cfg.module.kd_steps == 400
        assert cfg.distill.loss.temperature == 20.0 and cfg.distill.loss.w_ce == 0.0
    cfg = compose_cfg(["experiment=cifar100/nayer/vgg11_res18", "distill=fast"], Path("/tmp/kdx-datafree-compose"))
    assert cfg.distill.adv == 1.0  # the Fast script's per-pair weight (conf/recipe/fast/cifar100/nayer/)


# ---------------------------------------------------------------------------------------- the comparison and its report


def _fake_run(method: str, seed: int, times: list[float], accs: list[float]):
    from kdx.report import Run

    hist = [{"epoch": e + 1, "val_acc1": a, "synthesis_s_total": t, "synthesis_steps_total": 10 * (e + 1),
             "images_synthesised_total": 100 * (e + 1), "student_s_total": 1.0 * (e + 1)}
            for e, (t, a) in enumerate(zip(times, accs))]
    return Run(Path(f"/x/{method}{seed}"), {"method": method, "seed": seed, "dataset": "cifar100", "student": "resnet8",
                                             "teacher": "resnet20", "task": "distill", "history": hist,
                                             "test_acc1_best": max(accs), "test_acc1_last": accs[-1]})


def test_cost_tables_read_equal_time_and_time_to_accuracy(tmp_path):
    from kdx import report
    from kdx.bench_datafree import acc_at_time, cost_section, time_to_acc

    nayer = [_fake_run("nayer", s, [10, 20, 30], [20, 40, 50]) for s in (0, 1)]
    deepinv = [_fake_run("deepinv", s, [100, 200, 300], [10, 30, 44 + s]) for s in (0, 1)]
    assert acc_at_time(nayer[0], 25) == 40 and acc_at_time(deepinv[0], 50) is None
    assert time_to_acc(nayer[0], 45) == 30 and time_to_acc(deepinv[0], 50) is None
    text = cost_section(nayer + deepinv)
    row = next(line for line in text.splitlines() if line.startswith("| deepinv"))
    # horizons 30 s (shortest total = NAYER's): deepinv has no epoch within; every run's best reaches 44 % (deepinv
    # seed 0's best): at 300 s, 10× NAYER's 30 s; 90 % of NAYER's best (45 %): deepinv seed 0 never reaches it
    # last column: NAYER reaches deepinv's final 44.5 % at 30 s, deepinv synthesised for 300 s: 10×
    assert row.split(" | ")[7:] == ["—", "—", "300.0 (10.0× NAYER)", "not reached", "30.0 (10.0×) |"]
    nayer_row = next(line for line in text.splitlines() if line.startswith("| nayer"))
    assert "30.0 (1.0× NAYER)" in nayer_row and "50.00" in nayer_row and "44.0%" in text
    assert nayer_row.endswith("| — |")
    if importlib.util.find_spec("matplotlib") is not None:
        rep = report.build(nayer + deepinv, [])
        assert report.plot_synthesis_cost(rep, tmp_path / "cost.png") and (tmp_path / "cost.png").stat().st_size > 0
        plain = [report.Run(Path("/y"), {**r.data, "history": [{"epoch": 1, "val_acc1": 3.0}]}) for r in nayer]
        assert not report.plot_synthesis_cost(report.build(plain, []), tmp_path / "none.png")


@pytest.mark.parametrize("budget", ["cpu", "tiny"])
def test_the_comparison_commands_compose(budget):
    from kdx.bench_datafree import METHODS, commands
    from kdx.config import validate

    for method, argv in commands(budget, list(METHODS), "0,1", "b", []):
        overrides = [a for a in argv[4:] if not a.startswith(("seed=", "resume=", "sweep_name="))] + ["seed=0"]
        cfg = compose_cfg(overrides, Path("/tmp/kdx-datafree-compose"))
        validate(cfg)
        assert cfg.distill._target_.lower().endswith(method if method != "deepinv" else "deepinversion")
        assert cfg.teacher.train.max_epochs == (15 if budget == "cpu" else 1)  # one stored teacher for all methods


def test_report_only_runs_nothing(tmp_path, monkeypatch, capsys):
    import subprocess

    from kdx import bench_datafree

    def refuse(*a, **k):
        raise AssertionError("--report-only must not start a run")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.chdir(tmp_path)
    assert bench_datafree.main(["--report-only", "--name", "nothing-here"]) == 1
    assert "no sweep folder" in capsys.readouterr().err
