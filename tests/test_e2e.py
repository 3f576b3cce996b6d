"""End to end through the real Hydra config on synthetic data: train, KD, DKD, resume, reliability."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import compose_cfg, run_cli
from kdx.errors import CheckpointError
from kdx.models import create_model
from kdx.errors import NonFiniteLossError
from kdx.run import build_job as build, run


def read_results(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


def test_task_train_writes_teacher_student_and_results(tmp_path, tiny):
    res = run(compose_cfg(tiny + ["task=train"], tmp_path))
    out = tmp_path / "run"
    saved = read_results(out)
    assert saved["status"] == "complete" and saved["task"] == "train" and saved["method"] == "none"
    assert saved["epochs_done"] == 1 and len(saved["history"]) == 1
    assert saved["test_acc1_last"] == pytest.approx(res["test_acc1_last"])
    for f in ("student.pt", "teacher.pt", "teacher.json", "student.json"):
        assert (out / f).is_file(), f
    side = json.loads((out / "teacher.json").read_text())
    assert side["arch"] == "resnet8" and side["num_classes"] == 10 and len(side["sha256"]) == 64
    # student.pt loads with create_model + load_state_dict, no kdx trainer involved
    net = create_model("resnet8", num_classes=10)
    net.load_state_dict(torch.load(out / "student.pt", weights_only=True))
    # registered in the teacher store under the dataset key
    assert (tmp_path / "teachers" / "synthetic" / "resnet8" / "teacher.pt").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()


def test_distill_none_is_task_train(tmp_path, tiny):
    res = run(compose_cfg(tiny + ["distill=none"], tmp_path))
    assert res["task"] == "train" and res["teacher"] is None


@pytest.mark.parametrize("method", ["kd", "dkd", "kd_crd"])
def test_distill_trains_missing_teacher_then_distils(tmp_path, tiny, method, caplog):
    res = run(compose_cfg(tiny + [f"distill={method}", "logger=csv"], tmp_path))
    assert res["method"] == method and res["task"] == "distill"
    assert res["teacher"] == "resnet8" and res["teacher_acc1"] is not None
    assert (tmp_path / "teachers" / "synthetic" / "resnet8" / "teacher.json").is_file()
    assert (tmp_path / "run" / "teacher" / "results.json").is_file()  # the teacher's own run
    assert "training it first" in caplog.text
    terms = {"kd": {"ce", "kd"}, "kd_crd": {"ce", "kd"}, "dkd": {"ce", "tckd", "nckd"}}[method]
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {h[len("train/loss/"):] for h in header if h.startswith("train/loss/")} == terms  # one curve per term
    assert "teacher/acc1" in header
    assert res["teacher_info"]["sha256"]


def test_teacher_is_frozen_in_eval_and_outside_the_optimiser(tmp_path, tiny, teacher_ckpt):
    ckpt = teacher_ckpt
    job = build(compose_cfg(tiny + ["distill=dkd", f"teacher.ckpt={ckpt}", "trainer.max_epochs=2"], tmp_path))
    module, teacher = job.module, job.module.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher_params & {id(p) for p in module.parameters()}
    assert all(not p.requires_grad for p in teacher.parameters())
    module.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    seen = []

    class Probe(__import__("lightning").pytorch.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            opt_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            seen.append((teacher.training, bool(opt_ids & teacher_params), all(p.grad is None for p in teacher.parameters())))

    job.trainer.callbacks.append(Probe())
    job.trainer.fit(module, datamodule=job.datamodule)
    assert seen and all(s == (False, False, True) for s in seen)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched too
    # the student's parameters (and only those) are optimised
    opt_ids = {id(p) for g in job.trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_ids == {id(p) for p in module.student.parameters()}


def test_results_record_protocol(tmp_path, tiny):
    res = run(compose_cfg(tiny + ["task=train", "trainer.max_epochs=2", "seed=3"], tmp_path))
    assert res["seed"] == 3 and res["epochs"] == 2 and len(res["history"]) == 2
    assert res["best_epoch"] in (1, 2)
    best = max(res["history"], key=lambda r: r["val_acc1"])
    assert res["test_acc1_best"] == pytest.approx(best["test_acc1"])
    assert res["test_acc1_last"] == pytest.approx(res["history"][-1]["test_acc1"], abs=1e-4)
    assert res["config"]["seed"] == 3 and "wall_time_s" in res and "git" in res


def _weights(path: Path) -> dict:
    return torch.load(path / "student.pt", weights_only=True)


def test_exact_resume_matches_uninterrupted_run(tmp_path, tiny, teacher_ckpt):
    common = tiny + ["distill=kd", "trainer.deterministic=true", "scheduler.milestones=[1]", "seed=7",
                     f"teacher.ckpt={teacher_ckpt}"]
    straight = run(compose_cfg(common + ["trainer.max_epochs=2"], tmp_path, name="straight"))
    run(compose_cfg(common + ["trainer.max_epochs=1"], tmp_path, name="part"))
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    resumed = run(compose_cfg(common + ["trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path, name="part"))
    assert resumed["epochs_done"] == 2 and [h["epoch"] for h in resumed["history"]] == [1, 2]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["test_acc1_last"] == pytest.approx(straight["test_acc1_last"])


def test_nan_loss_stops_naming_step_term_and_checkpoint(tmp_path, tiny):
    # 128 samples / batch 32 = 4 steps an epoch: the NaN comes at step 6, in epoch 2, after a checkpoint
    cfg = compose_cfg(
        tiny + ["distill=none", "trainer.max_epochs=3", "distill._target_=kdx_test_helpers.NaNAtStep", "+distill.at_step=5"],
        tmp_path,
    )
    with pytest.raises(NonFiniteLossError) as err:
        run(cfg)
    msg = str(err.value)
    assert "epoch 2" in msg and "global step 5" in msg and "ce=nan" in msg
    assert "last.ckpt" in msg and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    # the run leaves its record: failed, with the error, the epochs done and the command that resumes it
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("NonFiniteLossError: Non-finite loss at epoch 2")
    assert record["epochs_done"] == 1 and record["epochs"] == 3
    assert f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}" in record["resume_command"]


def test_truncated_teacher_checkpoint_is_a_clear_error(tmp_path, tiny, teacher_ckpt):
    good = teacher_ckpt
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated.pt.*(truncated|corrupted)"):
        build(compose_cfg(tiny + [f"teacher.ckpt={bad}"], tmp_path))
    foreign = tmp_path / "foreign.pt"
    foreign.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="foreign.pt"):
        build(compose_cfg(tiny + [f"teacher.ckpt={foreign}"], tmp_path))


def test_teacher_with_wrong_class_count_is_a_clear_error(tmp_path, tiny, teacher_ckpt):
    ckpt = teacher_ckpt
    with pytest.raises(CheckpointError, match=r"10 classes.*5"):
        build(compose_cfg(tiny + ["data.num_classes=5", f"teacher.ckpt={ckpt}"], tmp_path))
    # without a sidecar, the shape check names the mismatch
    bare = tmp_path / "bare" / "weights.pt"
    bare.parent.mkdir()
    bare.write_bytes(ckpt.read_bytes())
    with pytest.raises(CheckpointError, match=r"(?s)weights.pt.*Shape mismatch.*\[?10"):
        build(compose_cfg(tiny + ["data.num_classes=5", f"teacher.ckpt={bare}"], tmp_path))


def test_store_teacher_with_bad_sha256_is_refused(tmp_path, tiny, teacher_store):
    import shutil

    shutil.copytree(teacher_store, tmp_path / "teachers")
    stored = tmp_path / "teachers" / "synthetic" / "resnet8" / "teacher.pt"
    data = bytearray(stored.read_bytes())
    data[-20] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        build(compose_cfg(tiny + ["distill=kd"], tmp_path))


def test_cli_entry_point_writes_run_folder(tmp_path):
    out = tmp_path / "cli_run"
    proc = run_cli([
        "data=synthetic", "data.num_classes=10", "data.train_size=64", "data.test_size=32", "model=resnet8",
        "task=train", "trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=csv", "progress_bar=none",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={out}", f"paths.teachers={tmp_path / 'teachers'}",
    ])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "results.json").is_file()
    assert (out / "student.pt").is_file() and (out / "csv" / "metrics.csv").is_file()
    metrics = (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    for name in ("train/loss", "train/loss/ce", "val/acc1", "val/acc1_best"):
        assert name in metrics


def test_cli_missing_dataset_offline_names_data_root(tmp_path):
    proc = run_cli([
        "data=cifar100", f"paths.data_dir={tmp_path / 'empty'}", "data.download=false", "distill=kd",
        f"hydra.run.dir={tmp_path / 'x'}", f"paths.teachers={tmp_path / 'teachers'}", "logger=none",
    ], timeout=300)
    assert proc.returncode != 0
    assert "data.root" in (proc.stderr + proc.stdout) and "data.npz_path" in (proc.stderr + proc.stdout)
    assert not (tmp_path / "x" / "teacher").exists()  # stopped before training a teacher


def test_teacher_of_another_architecture_is_a_clear_error(tmp_path, tiny, teacher_ckpt):
    ckpt = teacher_ckpt
    with pytest.raises(CheckpointError, match=r"trained as 'resnet8'.*teacher_arch=resnet8"):
        build(compose_cfg(tiny + ["teacher_arch=resnet14", f"teacher.ckpt={ckpt}"], tmp_path))


def test_auto_train_off_names_the_settings(tmp_path, tiny):
    with pytest.raises(CheckpointError, match=r"teacher.ckpt=.*task=train model=resnet8"):
        build(compose_cfg(tiny + ["teacher.auto_train=false"], tmp_path))


@pytest.mark.parametrize("data", ["cifar10", "fashion_mnist"])
def test_real_offline_data_through_the_config(tmp_path, tiny, data):
    """The real data in ../shared/data (CIFAR-10 JPEG copy, Fashion-MNIST) through data=<name>, tiny budget."""
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    overrides = [o for o in tiny if not o.startswith("data.")] + [
        f"data={data}", "data.subset=300", "data.test_subset=200", "task=train", f"paths.data_dir={SHARED_DATA}",
    ]
    res = run(compose_cfg(overrides, tmp_path))
    assert res["data"]["sizes"]["train"] == 300 and res["data"]["sizes"]["test"] == 200
    assert res["data"]["num_classes"] == 10 and res["dataset"] == f"{data}-subset300"
    assert res["status"] == "complete"
    if data == "cifar10":  # no torchvision files offline: the array file was used, and it is recorded
        assert "cifar10_jpeg.npz" in res["data"]["source"]


@pytest.mark.parametrize("extra", [["trainer.precision=bf16-mixed"], ["perf.channels_last=true"], ["perf=fast"],
                                   pytest.param(["perf.compile=true"], marks=pytest.mark.slow)])
def test_fast_paths_run_kd(tmp_path, tiny, extra, teacher_ckpt):
    ckpt = teacher_ckpt
    res = run(compose_cfg(tiny + ["distill=dkd", f"teacher.ckpt={ckpt}"] + extra, tmp_path))
    assert res["status"] == "complete" and res["test_acc1_last"] is not None
    # the exported student is a plain fp32 state dict whatever the precision or memory format
    sd = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in sd.values())


def test_history_train_loss_is_the_same_epochs_mean(tmp_path, tiny):
    """Each history row's train_loss is the mean of that epoch's logged step losses (not the previous epoch's)."""
    import csv

    res = run(compose_cfg(tiny + ["task=train", "trainer.max_epochs=2", "logger=csv"], tmp_path))
    (metrics,) = list((tmp_path / "run").rglob("metrics.csv"))
    steps: dict[int, list[float]] = {}
    for row in csv.DictReader(metrics.open()):
        if row.get("train/loss"):
            steps.setdefault(int(row["epoch"]), []).append(float(row["train/loss"]))
    assert sorted(steps) == [0, 1] and all(len(v) == 4 for v in steps.values())  # 128 images / batch 32
    for row in res["history"]:
        losses = steps[row["epoch"] - 1]
        assert row["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
