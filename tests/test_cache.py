"""Teacher-logit cache (``teacher_cache=exact|augmented``): exactness, views, invalidation, refusals, runs."""
from __future__ import annotations

import json
import logging
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from conftest import compose_cfg, distill_module
from kdx.errors import ConfigError
from kdx.data.augment import draw_view, view_params
from kdx.data.arrays import ArrayDataModule
from kdx.data.datasets import SplitArrays
from kdx.data.synthetic import SyntheticDataModule
from kdx.distill.base import Strategy
from kdx.models import create_model
from kdx.run import build_job as build
from kdx.teachers.cache import COMPLETE, FILLED, KEY, CachedTeacher, CacheSettings
from kdx.teachers.network import NetworkTeacher



pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------------------ helpers
class _Strategy:
    """The parts of a Lightning strategy that ``CachedTeacher.fill`` uses; ranks in threads share a barrier."""

    root_device = torch.device("cpu")

    def __init__(self, rank: int = 0, barrier: threading.Barrier | None = None, shared: dict | None = None):
        self.rank, self._barrier, self._shared = rank, barrier, shared

    def barrier(self, name: str | None = None) -> None:
        if self._barrier is not None:
            self._barrier.wait()

    def reduce(self, t, reduce_op=None):
        if self._barrier is None:
            return t
        self._shared[self.rank] = t
        self._barrier.wait()
        total = sum(self._shared.values())
        self._barrier.wait()
        return total


class StubTrainer:
    def __init__(self, precision: str = "32-true", rank: int = 0, world: int = 1, barrier=None, shared=None):
        self.global_rank, self.world_size = rank, world
        self.strategy = _Strategy(rank, barrier, shared)
        self.precision_plugin = Precision() if precision == "32-true" else MixedPrecision(precision, "cpu")


def _ckpt(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.save(create_model("resnet8", num_classes=10).state_dict(), path)
    return path


def _teacher(ckpt: Path) -> NetworkTeacher:
    return NetworkTeacher(create_model("resnet8", num_classes=10), ckpt=str(ckpt), meta={"arch": "resnet8"})


def _synthetic(**kw) -> SyntheticDataModule:
    dm = SyntheticDataModule(**{"num_classes": 10, "train_size": 100, "test_size": 20, "batch_size": 16, **kw})
    dm.setup()
    return dm


def _cached(tmp_path, dm, ckpt, mode="exact", views=1, precision="32-true", dtype="auto") -> CachedTeacher:
    return CachedTeacher(_teacher(ckpt), CacheSettings(mode, views, dtype, str(tmp_path / "cache")), dm, "synthetic", precision)


def _live_rows(teacher, dm, trainer, idx: torch.Tensor, view: int | None = None) -> torch.Tensor:
    """The live teacher on the training inputs of ``idx``, in the pre-pass's batches and precision."""
    out = []
    for chunk in idx.split(dm.eval_batch_size):
        batch = dm.train_dataset[chunk.tolist()]
        x = dm.transform_batch(batch, train=True)[0] if view is None else dm.transform_view_batch(batch, view)[0]
        with trainer.precision_plugin.train_step_context():
            out.append(teacher(x).logits)
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("precision, dtype", [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)])
def test_exact_rows_equal_the_live_teacher_bit_for_bit(tmp_path, precision, dtype):
    dm = _synthetic(augment=False)
    ckpt = _ckpt(tmp_path / "t.pt")
    cached, trainer = _cached(tmp_path, dm, ckpt, precision=precision), StubTrainer(precision)
    cached.fill(trainer)
    live = _live_rows(_teacher(ckpt), dm, trainer, torch.arange(100))
    assert live.dtype == dtype and cached.info["cache"]["dtype"] == str(dtype).removeprefix("torch.")
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(1))
    got = cached(torch.zeros(100, 1), None, perm).logits
    assert got.dtype == dtype and torch.equal(got, live[perm])  # stored in the live dtype: nothing rounded
    # float16 storage under 32-true: the live logits rounded to float16, given back as float32
    if precision == "32-true":
        half = _cached(tmp_path, dm, ckpt, dtype="float16")
        half.fill(trainer)
        got = half(torch.zeros(100, 1), None, perm).logits
        assert got.dtype == torch.float32 and torch.equal(got, live[perm].half().float())
        assert half.folder != cached.folder


def test_ranks_fill_disjoint_rows_and_rank0_finishes(tmp_path):
    """Two ranks (threads sharing barriers, as DDP processes do): each computes its own rows only."""
    ckpt, world = _ckpt(tmp_path / "t.pt"), 2
    barrier, shared, seen, errors = threading.Barrier(world), {}, {}, []
    teachers = [_cached(tmp_path, _synthetic(augment=False), ckpt) for _ in range(world)]

    def rank_main(rank: int) -> None:
        t = teachers[rank]
        compute = t._compute

        def spy(folder, key, dtype, filled, rows, *args):  # the rows this rank computes
            seen[rank] = rows.copy()
            return compute(folder, key, dtype, filled, rows, *args)

        t._compute = spy
        try:
            t.fill(StubTrainer(rank=rank, world=world, barrier=barrier, shared=shared))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert not set(seen[0]) & set(seen[1]) and sorted([*seen[0], *seen[1]]) == list(range(100))
    assert all(t.rows_computed == 100 for t in teachers)  # summed over ranks
    assert (teachers[0].folder / COMPLETE).is_file()
    dm = _synthetic(augment=False)
    live = _live_rows(_teacher(ckpt), dm, StubTrainer(), torch.arange(100))
    got = teachers[1](torch.zeros(100, 1), None, torch.arange(100)).logits
    torch.testing.assert_close(got, live, rtol=1e-5, atol=1e-5)  # other batch compositions than one process


# ------------------------------------------------------------------------------------------ validity
def test_changed_teacher_transform_or_key_rebuilds_and_says_why(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kdx.teachers.cache")
    a, b = _ckpt(tmp_path / "a.pt", seed=0), _ckpt(tmp_path / "b.pt", seed=1)
    dm = _synthetic()  # augment on: the augmented mode, whose key has the transform
    first = _cached(tmp_path, dm, a, "augmented", 2)
    first.fill(StubTrainer())
    assert first.rows_computed == 200 and "none for these settings" in caplog.text
    caplog.clear()
    again = _cached(tmp_path, _synthetic(), a, "augmented", 2)
    again.fill(StubTrainer())  # warm: same folder, nothing computed
    assert again.folder == first.folder and again.rows_computed == 0
    caplog.clear()
    other = _cached(tmp_path, _synthetic(), b, "augmented", 2)
    other.fill(StubTrainer())
    assert other.folder != first.folder and other.rows_computed == 200
    assert "teacher.sha256" in caplog.text and "teacher.ckpt" not in caplog.text
    caplog.clear()
    padded = _cached(tmp_path, _synthetic(pad=2), b, "augmented", 2)
    padded.fill(StubTrainer())
    assert padded.rows_computed == 200 and "transform.pad: 4 → 2" in caplog.text
    caplog.clear()
    # a key.json that does not match its folder (damaged, older format) is rebuilt in place, with a warning
    key = json.loads((padded.folder / KEY).read_text())
    (padded.folder / KEY).write_text(json.dumps({**key, "classes": 11}))
    redo = _cached(tmp_path, _synthetic(pad=2), b, "augmented", 2)
    redo.fill(StubTrainer())
    assert redo.folder == padded.folder and redo.rows_computed == 200
    assert any(r.levelno == logging.WARNING and "classes: 11 → 10" in r.getMessage() for r in caplog.records)
    # an interrupted fill (flags missing, no complete marker) computes only the missing rows
    flags = np.memmap(redo.folder / FILLED, np.uint8, "r+", shape=(200,))
    flags[::4] = 0
    flags.flush()
    (redo.folder / COMPLETE).unlink()
    caplog.clear()
    resume = _cached(tmp_path, _synthetic(pad=2), b, "augmented", 2)
    resume.fill(StubTrainer())
    assert resume.rows_computed == 50 and "resuming" in caplog.text and (redo.folder / COMPLETE).is_file()


# ------------------------------------------------------------------------------------------ views
class Patterned(ArrayDataModule):
    """Images whose pixels tell where they come from: channel 0 codes the row, 1 the column, 2 the sample."""

    H = 16

    def __init__(self, n: int = 24, **common) -> None:
        super().__init__(name="patterned", root="", **common)
        self.n = n
        self._num_classes, self._image_shape = 4, (3, self.H, self.H)
        self._mean, self._std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def _load_arrays(self) -> SplitArrays:
        h, n = self.H, self.n
        r = np.arange(h).reshape(1, h, 1).repeat(h, 2)
        x = np.stack([np.stack([20 + 6 * r, 20 + 6 * r.transpose(0, 2, 1), np.full((1, h, h), 10 + i)])[:, 0]
                      for i in range(n)]).astype(np.uint8)
        y = np.arange(n) % 4
        return SplitArrays(x, y, x[:8], y[:8])


class Decoder(nn.Module):
    """A 'teacher' whose logits are what it saw: ``[dy, dx, flip, sample, 0]`` read from the centre pixels."""

    def __init__(self, pad: int = 4, num_classes: int = 5) -> None:
        super().__init__()
        self.pad, self.num_classes = pad, num_classes
        self.register_buffer("stats", torch.tensor([0.5, 0.25]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode(x, self.stats, self.pad, self.num_classes)


def decode(x: torch.Tensor, stats: torch.Tensor, pad: int, num_classes: int = 5) -> torch.Tensor:
    pix = ((x.float() * stats[1] + stats[0]) * 255).round()
    c = Patterned.H // 2
    row, col, right = (pix[:, 0, c, c] - 20) / 6, (pix[:, 1, c, c] - 20) / 6, pix[:, 1, c, c + 1] - pix[:, 1, c, c]
    flip = right < 0
    dy = row - c + pad
    dx = torch.where(flip, col - (Patterned.H - 1 - c), col - c) + pad
    out = torch.zeros(len(x), num_classes)
    out[:, :4] = torch.stack([dy, dx, flip.float(), pix[:, 2, c, c] - 10], 1)
    return out


class Recorder(Strategy):
    """Records what the student was shown and what the teacher said, per step; CE keeps the student learning."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def loss_terms(self, student, teacher, batch, epoch):
        self.seen.append((epoch, batch.idx.clone(), batch.x.clone(), teacher.logits.clone()))
        return {"ce": nn.functional.cross_entropy(student.logits, batch.y)}


def test_augmented_student_sees_the_view_whose_logits_the_teacher_gave(tmp_path):
    pad, views, n = 4, 3, 24
    dm = Patterned(n=n, batch_size=8, pad=pad, seed=5)
    dm.setup()
    torch.save(Decoder(pad).state_dict(), tmp_path / "decoder.pt")
    teacher = NetworkTeacher(Decoder(pad), ckpt=str(tmp_path / "decoder.pt"), meta={"arch": "decoder"})
    cached = CachedTeacher(teacher, CacheSettings("augmented", views, "auto", str(tmp_path / "cache")), dm, "patterned")
    assert dm.views == views  # the datamodule now draws its crops from the stored views
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5))
    recorder = Recorder()
    module = distill_module(student, recorder, partial(torch.optim.SGD, lr=0.01), dm, 5, teacher=cached)
    trainer = Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert len(recorder.seen) == 4 * 3
    stats = torch.tensor([0.5, 0.25])
    per_sample: dict[int, set] = {}
    for epoch, idx, x, t_logits in recorder.seen:
        shown = decode(x, stats, pad)  # what the student's pixels say about their crop and flip
        assert torch.equal(shown, t_logits), epoch  # ... is exactly what the teacher saw when it gave these logits
        assert torch.equal(shown[:, 3].long(), idx)
        dx, dy, flip = view_params(draw_view(dm.seed, epoch - 1, idx, views), idx, pad, views)
        assert torch.equal(shown[:, 0].long(), dy) and torch.equal(shown[:, 1].long(), dx)
        assert torch.equal(shown[:, 2].bool(), flip)
        for i, row in zip(idx.tolist(), shown[:, :3].long().tolist()):
            per_sample.setdefault(i, set()).add(tuple(row))
    # every sample keeps to its own V views, and the epochs do use several of them
    assert all(1 <= len(s) <= views for s in per_sample.values())
    assert sum(len(s) > 1 for s in per_sample.values()) > n // 2


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("overrides, match", [
    (["distill=afd", "teacher_cache=exact", "data.augment=false"], "intermediate features.*teacher_cache=off"),
    (["distill=rtk", "teacher_cache=augmented"], "intermediate features.*teacher_cache=off"),
    (["teacher_cache=exact"], "data.augment=false.*teacher_cache=augmented"),
    (["teacher_cache=exact", "teacher_cache.mode=sometimes", "data.augment=false"], "not one of off, exact, augmented"),
    (["teacher_cache=augmented", "teacher_cache.views=0"], "teacher_cache.views=0"),
])
def test_unsupported_settings_stop_at_build_naming_the_setting(tmp_path, tiny, overrides, match):
    with pytest.raises(ConfigError, match=match):
        build(compose_cfg(tiny + overrides, tmp_path))
    assert not (tmp_path / "teachers").exists()  # before any teacher was trained


def test_table_and_data_free_teachers_refuse_the_cache():
    from kdx.datafree.nayer import NAYER
    from kdx.distill.kd import KD
    from kdx.teachers.network import NetworkTeacherSource
    from kdx.teachers.reffakd import ReffAKDSource

    dm = _synthetic(augment=False)
    exact = CacheSettings("exact", dir="/tmp")
    with pytest.raises(ConfigError, match="table of soft labels.*teacher_cache=off"):
        exact.checked(KD(), ReffAKDSource, dm, "distill")
    with pytest.raises(ConfigError, match="datafree regime.*teacher_cache=off"):
        exact.checked(NAYER(KD(), lte=None), NetworkTeacherSource, dm, "datafree")
    assert exact.checked(KD(), NetworkTeacherSource, dm, "distill") is exact
    assert CacheSettings(False).checked(KD(), NetworkTeacherSource, dm, "distill") is None  # YAML's bare `off`


# ------------------------------------------------------------------------------------------ end to end
class TeacherCalls(Callback):
    """Counts the teacher network's forward calls: in training batches per (1-based) epoch, in validation, at setup."""

    def __init__(self, net: nn.Module) -> None:
        self.phase, self.calls = "setup", {}
        net.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls[self.phase] = self.calls.get(self.phase, 0) + 1

    def on_train_batch_start(self, trainer, *args) -> None:
        self.phase = trainer.current_epoch + 1

    def on_validation_batch_start(self, *args) -> None:
        self.phase = "val"

    def on_train_batch_end(self, *args) -> None:
        self.phase = "other"

    on_validation_batch_end = on_train_batch_end


def _fit(tmp_path, tiny, overrides, name, epochs: int = 2):
    """A tiny KD job (64 training samples, 2 steps an epoch) through the real config, fitted; calls and losses seen."""
    small = ["data.train_size=64", f"trainer.max_epochs={epochs}", f"paths.cache_dir={tmp_path / 'cache'}"]
    job = build(compose_cfg(tiny + small + overrides, tmp_path, name=name))
    teacher = job.module.teacher
    counter = TeacherCalls(getattr(teacher, "live", teacher).net)
    job.trainer.callbacks.append(counter)
    seen = []
    strategy_forward = job.module.strategy.forward
    job.module.strategy.forward = lambda s, t, b, e: (seen.append((e, b, t.logits.clone())),
                                                      strategy_forward(s, t, b, e))[1]
    job.trainer.fit(job.module, datamodule=job.datamodule)
    return job, counter.calls, seen


@pytest.mark.parametrize("mode, extra", [
    ("exact", ["data.augment=false"]),
    ("augmented", ["teacher_cache.views=2", "data.on_device=true"]),
])
def test_kd_run_through_the_config_reads_the_cache_and_still_measures_the_teacher(tmp_path, tiny, mode, extra):
    ckpt = _ckpt(tmp_path / "teacher.pt")  # no sidecar: the teacher's accuracy is measured in the run
    common = ["distill=kd", f"teacher.ckpt={ckpt}", *extra]
    job, calls, seen = _fit(tmp_path, tiny, common + [f"teacher_cache={mode}"], "cold")
    # the pre-pass (and the teacher's accuracy, measured once on the test split): no training step ran the teacher
    assert set(calls) == {"setup", "val"} and calls["val"] == 1
    rows = 64 * (2 if mode == "augmented" else 1)
    assert job.module.teacher.info["cache"]["rows_computed"] == rows
    live = job.module.teacher.live
    for epoch, batch, t_logits in seen:  # the loss got the teacher's logits on the pixels the student saw
        torch.testing.assert_close(t_logits, live(batch.x).logits, rtol=1e-5, atol=1e-5)  # batch-composition noise
    assert {e for e, *_ in seen} == {1, 2}
    assert job.trainer.callback_metrics["teacher/cache_rows_computed"] == rows
    if mode == "augmented":
        return
    live_job, live_calls, _ = _fit(tmp_path, tiny, common, "live", epochs=1)
    assert live_calls == {1: 2, "val": 1}  # the live teacher runs in every training step
    assert job.module.teacher_acc1 is not None and job.module.teacher_acc1 == live_job.module.teacher_acc1


def test_every_logit_method_runs_on_the_cache(tmp_path, tiny):
    ckpt = _ckpt(tmp_path / "teacher.pt")
    common = [f"teacher.ckpt={ckpt}", "data.augment=false", "teacher_cache=exact", "trainer.limit_val_batches=0",
              "trainer.limit_train_batches=1"]
    for i, method in enumerate([["distill=kd_crd"], ["distill=dkd"], ["distill=topkd"],
                                ["distill=kd", "distill/teacher_transform=topk_scale"]]):
        job, calls, seen = _fit(tmp_path, tiny, method + common, f"run{i}", epochs=1)
        cached, strategy = job.module.teacher, job.module.strategy
        assert set(calls) == {"setup"} and seen  # the pre-pass only
        if i > 0:  # a warm cache: the teacher ran only for the dtype probe (two samples)
            assert cached.info["cache"]["rows_computed"] == 0 and calls == {"setup": 1}
        for _, batch, t_logits in seen:  # a teacher transform (TopKD's scaling) applies to the cached raw logits
            raw = cached(batch.x, batch.y, batch.idx).logits
            assert torch.equal(t_logits, strategy.transform_teacher(raw, batch.y))
            assert (strategy.teacher_transform is None) == torch.equal(t_logits, raw)


@pytest.mark.slow
def test_ddp_cpu_two_ranks_fill_one_cache_then_read_it(tmp_path):
    """trainer=ddp_cpu through the real CLI, augmented views and on-device data: the ranks share one fill."""
    from conftest import TINY, run_cli

    ckpt = _ckpt(tmp_path / "teacher.pt")
    base = [a for a in TINY if not a.startswith("logger")] + [
        "trainer=ddp_cpu", "distill=kd", "logger=csv", f"teacher.ckpt={ckpt}", "teacher_cache=augmented",
        "teacher_cache.views=2", f"teacher_cache.dir={tmp_path / 'cache'}", "data.on_device=true",
        "trainer.max_epochs=2",
    ]
    for name, computed in (("cold", 256), ("warm", 0)):
        proc = run_cli(base + [f"hydra.run.dir={tmp_path / name}"], timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        res = json.loads((tmp_path / name / "results.json").read_text())
        cache = res["teacher_info"]["cache"]
        assert res["status"] == "complete" and cache["rows"] == 256 and cache["rows_computed"] == computed
        assert (Path(cache["path"]) / COMPLETE).is_file() and res["teacher_acc1"] is not None
