"""A new user's first hour, through the real CLI and config: checkpoints that resume from the last epoch, stops
that leave a record, sweeps that survive a failing job, nothing lost on a retry, the loaded teacher named, a
Python API, user code (strategy, model, array file) labelled by what ran, one console line per event."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, TINY, cli_env, compose_cfg, run_cli
from kdx.errors import ConfigError
from kdx.run import run

TINY_CLI = [o for o in TINY if o != "logger=none"] + ["logger=csv"]


def read(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


def ckpt_epochs(path: Path) -> int:
    """Completed epochs in a Lightning checkpoint (its ``epoch`` counts from 0; kdx's history one per epoch)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert len(state["kdx"]["history"]) == state["epoch"] + 1
    return state["epoch"] + 1


def test_sigterm_after_epoch_k_leaves_a_record_and_its_command_resumes(tmp_path):
    """A scheduler's SIGTERM in epoch 3 of 4: last.ckpt is epoch 2, results.json says interrupted with the command
    that resumes; running that command ends at epoch 4 with each epoch trained once."""
    out = tmp_path / "run"
    args = TINY_CLI + ["distill=none", "trainer.max_epochs=4", f"hydra.run.dir={out}",
                       "distill._target_=kdx_test_helpers.SigtermOnce", "+distill.at_epoch=3",
                       f"+distill.flag={tmp_path / 'sent'}"]
    first = run_cli(args)
    assert first.returncode != 0
    record = read(out)
    assert record["status"] == "interrupted" and record["epochs_done"] == 2 and record["epochs"] == 4
    assert ckpt_epochs(out / "checkpoints" / "last.ckpt") == 2
    assert f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}" in record["resume_command"]
    console = first.stdout + first.stderr
    assert "Interrupted: stopped by SIGTERM. Epochs done: 2 of 4" in console
    assert record["resume_command"] in console

    command = shlex.split(record["resume_command"])
    assert command[:3] == ["python", "-m", "kdx"]
    second = subprocess.run([sys.executable, *command[1:]], env=cli_env(), capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    done = read(out)
    assert done["status"] == "complete" and done["epochs_done"] == 4
    assert done["resumed_from"] == str(out / "checkpoints" / "last.ckpt")
    assert [h["epoch"] for h in done["history"]] == [1, 2, 3, 4]
    assert ckpt_epochs(out / "checkpoints" / "last.ckpt") == 4
    assert (out / "attempts" / "1" / "results.json").is_file()  # the interrupted record is kept

    # one console line per event: no duplicated Lightning lines, no advertisement, units on accuracies
    console = second.stdout + second.stderr
    assert console.count("`Trainer.fit` stopped") == 1
    assert "litlogger" not in console and "Tip:" not in console
    assert "Test top-1 " in console and " %" in console


def test_last_checkpoint_is_the_last_epoch_when_accuracy_never_improves(tmp_path, tiny, teacher_store):
    # lr 0: val/acc1 is the same every epoch, so only epoch 1 is "best"; last.ckpt is still epoch 3
    res = run(compose_cfg(tiny + ["distill=none", "trainer.max_epochs=3", "optim.lr=0"], tmp_path))
    ckpts = tmp_path / "run" / "checkpoints"
    assert ckpt_epochs(ckpts / "last.ckpt") == 3
    assert res["best_epoch"] == 1 and (ckpts / "best-epoch001.ckpt").is_file()  # names count from 1, as best_epoch


def test_a_failing_job_does_not_stop_the_sweep(tmp_path, teacher_store):
    """``-m optim.lr=1e9,0.05``: job 0 fails (non-finite loss), job 1 runs, the report lists job 0 with its error
    and resume command, and the sweep exits 1. A re-run skips the failed job unless retry_failed=true, which keeps
    the failed attempt's record."""
    args = ["-m", *TINY_CLI, "distill=none", "optim.lr=1e9,0.05", "resume=auto", "sweep_name=lr",
            f"paths.teachers={teacher_store}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    first = run_cli(args, cwd=tmp_path)
    console = first.stdout + first.stderr
    assert first.returncode == 1, console[-3000:]
    jobs = {p.name: p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and (p / "results.json").is_file()}
    assert sorted(jobs) == ["optim.lr=0.05", "optim.lr=1000000000.0"]
    failed, good = read(jobs["optim.lr=1000000000.0"]), read(jobs["optim.lr=0.05"])
    assert failed["status"] == "failed" and failed["error"].startswith("NonFiniteLossError")
    assert good["status"] == "complete"
    assert "1 job(s) did not complete" in console and "failed: NonFiniteLossError" in console
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "NonFiniteLossError" in table and "resume:" in table

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 1
    assert "retry_failed=true" in again.stdout + again.stderr
    assert not (jobs["optim.lr=1000000000.0"] / "attempts").exists()

    retry = run_cli(args + ["retry_failed=true"], cwd=tmp_path)
    assert retry.returncode == 1
    assert read(jobs["optim.lr=1000000000.0"])["status"] == "failed"
    assert json.loads((jobs["optim.lr=1000000000.0"] / "attempts" / "1" / "results.json").read_text())["status"] == "failed"
    assert read(jobs["optim.lr=0.05"])["wall_time_s"] == good["wall_time_s"]  # the complete job was not re-run


def test_a_corrupted_results_json_and_its_logs_are_kept(tmp_path, tiny, teacher_store):
    overrides = [o for o in tiny if o != "logger=none"] + ["logger=csv", "distill=none", "resume=auto"]
    first = run(compose_cfg(overrides, tmp_path))
    out = Path(first["output_dir"])
    metrics = sorted(out.glob("csv/**/metrics.csv"))
    assert metrics
    old_metrics = metrics[0].read_text()
    (out / "results.json").write_text('{"status": "compl')  # a crash mid-write (not kdx's: it writes atomically)
    second = run(compose_cfg(overrides, tmp_path))
    assert second["status"] == "complete"
    kept = out / "attempts" / "1"
    assert (kept / "results.json").read_text() == '{"status": "compl'
    assert [p.read_text() for p in kept.glob("csv/**/metrics.csv")] == [old_metrics]


def test_the_loaded_teacher_is_recorded_and_logged(tmp_path, tiny, teacher_store, caplog):
    import logging

    from kdx.io import sha256_file

    with caplog.at_level(logging.INFO, logger="kdx"):
        res = run(compose_cfg(tiny + ["distill=kd"], tmp_path, teachers=teacher_store))
    weights = teacher_store / "synthetic" / "resnet8" / "teacher.pt"
    stored = json.loads(weights.with_suffix(".json").read_text())
    info = res["teacher_info"]
    assert info["ckpt"] == str(weights) and info["sha256"] == sha256_file(weights)
    assert (info["arch"], info["dataset"], info["epochs"]) == ("resnet8", "synthetic", 1)
    assert info["recorded_test_acc1"] == stored["test_acc1"]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Teacher: "))
    assert line == (f"Teacher: resnet8 from {weights} (sha256 {info['sha256'][:12]}, trained on synthetic for 1 epoch, "
                    f"recorded test top-1 {stored['test_acc1']:.2f} %)")


def test_a_cut_short_teacher_checkpoint_is_named_in_the_log(tmp_path, tiny, caplog):
    import logging

    train = run(compose_cfg(tiny + ["task=train", "trainer.limit_train_batches=2", "register_teacher=false"],
                            tmp_path, name="quick"))
    with caplog.at_level(logging.INFO):
        run(compose_cfg(tiny + ["distill=kd", f"teacher.ckpt={train['teacher_path']}"], tmp_path))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "cut short: trainer.limit_train_batches=2" in text and "cut-short budget" in text


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory) -> dict:
    if not (SHARED_DATA / "FashionMNIST").is_dir():
        pytest.skip(f"{SHARED_DATA}/FashionMNIST not present")
    tmp = tmp_path_factory.mktemp("api")
    base = [o for o in TINY if not o.startswith("data")]
    return run(compose_cfg(base + ["data=fashion_mnist", f"paths.data_dir={SHARED_DATA}", "data.subset=256",
                                   "data.test_subset=300", "data.batch_size=32", "task=train",
                                   "trainer.max_epochs=2"], tmp))


def test_python_api_reproduces_the_runs_test_accuracy(fashion_run):
    from kdx.api import evaluate, load_student
    from kdx.build import instantiate_data
    from omegaconf import OmegaConf

    out = fashion_run["output_dir"]
    assert evaluate(out)["acc1"] == pytest.approx(fashion_run["test_acc1_last"], abs=1e-4)
    assert evaluate(out, which="best")["acc1"] == pytest.approx(fashion_run["test_acc1_best"], abs=1e-4)

    # the loaders' raw uint8 images (what a user gets from the datamodule) go straight in
    student = load_student(out)
    assert student.class_names[:2] == ["T-shirt/top", "Trouser"]
    dm = instantiate_data(OmegaConf.create(student.meta["config"]["data"]))
    dm.setup()
    correct = n = 0
    for x, y, _ in dm.test_dataloader():
        assert x.dtype == torch.uint8
        pred = student.predict(x)
        assert torch.equal(pred, student.predict(x.float() / 255))  # ToTensor()-style floats in [0, 1] too
        correct, n = correct + int((pred == y).sum()), n + len(y)
    assert 100.0 * correct / n == pytest.approx(fashion_run["test_acc1_last"], abs=1e-4)
    with pytest.raises(ConfigError, match="held-out"):
        evaluate(out, split="val")


def test_a_user_strategy_is_labelled_by_its_class(tmp_path, tiny, teacher_store):
    res = run(compose_cfg(tiny + ["distill=none", "distill._target_=kdx_test_helpers.UserKD", "~distill.w_ce",
                                  "~distill.label_smoothing", "+distill.temperature=3"], tmp_path,
                          teachers=teacher_store))
    assert res["method"] == "UserKD" and res["config"]["method"] == "UserKD"
    assert res["teacher"] == "resnet8"


def test_a_user_model_as_student_and_teacher(tmp_path, tiny):
    """A network that knows nothing of kdx (no ``name``/``taps`` arguments, its class count called ``classes``),
    as student and as teacher: the teacher is trained and stored under its class name."""
    user = ["model=user", "model.net._target_=kdx_test_helpers.TinyNet", "model.num_classes_arg=classes",
            "teacher_arch=user", "teacher.model.net._target_=kdx_test_helpers.TinyNet",
            "teacher.model.num_classes_arg=classes", "+teacher.model.net.width=16"]
    res = run(compose_cfg(tiny + ["distill=kd"] + user, tmp_path))
    assert (res["student"], res["teacher"], res["pair"]) == ("TinyNet", "TinyNet", "TinyNet-TinyNet")
    assert (tmp_path / "teachers" / "synthetic" / "TinyNet" / "teacher.pt").is_file()
    from kdx.api import load_student

    assert type(load_student(res["output_dir"]).net).__name__ == "TinyNet"
    # a feature method on it: the error says which setting gives the taps
    with pytest.raises(ConfigError, match=r"model\.taps"):
        run(compose_cfg(tiny + ["distill=at"] + user, tmp_path, name="at"))
    # the network's own argument name for the class count is a setting
    with pytest.raises(ConfigError, match="model.num_classes_arg"):
        run(compose_cfg(tiny + ["distill=none", "model=user", "model.net._target_=kdx_test_helpers.TinyNet"],
                        tmp_path, name="bad"))


def test_an_array_file_with_seven_classes(tmp_path, tiny):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (140, 32, 32, 3), dtype=np.uint8)
    y = np.arange(140) % 7
    x[np.arange(140), 0, 0, 0] = y * 30  # a little class signal
    path = tmp_path / "seven_classes.npz"
    np.savez(path, train_x=x[:105], train_labels=y[:105], test_x=x[105:], test_labels=y[105:])
    base = [o for o in tiny if not o.startswith("data")]
    res = run(compose_cfg(base + ["data=array", f"data.path={path}", "data.batch_size=35", "distill=kd"], tmp_path))
    assert res["status"] == "complete" and res["dataset"] == "seven_classes"
    assert res["data"]["num_classes"] == 7
    state = torch.load(Path(res["output_dir"]) / "student.pt", weights_only=True)
    assert state["fc.weight"].shape[0] == 7


def test_a_user_config_folder_on_the_search_path(tmp_path, tiny, teacher_store):
    """A user's own method config (``<folder>/distill/userkd.yaml``) through ``hydra.searchpath``: selected like
    kdx's own, labelled by its option name, its keys validated against the class's arguments."""
    folder = tmp_path / "myconf" / "distill"
    folder.mkdir(parents=True)
    (folder / "userkd.yaml").write_text("_target_: kdx_test_helpers.UserKD\ntemperature: 3.0\nw_ce: 0.5\nw_kd: 0.5\n")
    (folder / "typo.yaml").write_text("_target_: kdx_test_helpers.UserKD\ntemprature: 3.0\n")
    search = f"hydra.searchpath=[file://{tmp_path / 'myconf'}]"
    res = run(compose_cfg(tiny + [search, "distill=userkd"], tmp_path, teachers=teacher_store))
    assert res["status"] == "complete" and res["method"] == "userkd"
    assert res["config"]["distill"]["temperature"] == 3.0
    with pytest.raises(ConfigError, match=r"distill\.temprature.*temperature"):
        run(compose_cfg(tiny + [search, "distill=typo"], tmp_path, name="typo", teachers=teacher_store))
