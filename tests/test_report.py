"""kdx.report on hand-made sweeps: the numbers below are worked out by hand, not by the code under test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdx import report

ROOT = Path(__file__).resolve().parent.parent
PAPER = {"teacher": 79.42, "student": 72.5, "kd": 73.33, "dkd": 76.32}  # as in experiment/cifar100/dkd/...
TEACHER_INFO = {"arch": "resnet32x4", "ckpt": "/t/resnet32x4.pt", "sha256": "abc"}


def result(method: str, seed: int, best: float, last: float, *, history: bool = True, paper=PAPER,
           started: str = "2024-01-01T10:00:00") -> dict:
    """A results.json as kdx.runner writes it (the keys the report reads, plus a few others)."""
    teacher = None if method == "none" else "resnet32x4"
    hist = [{"epoch": e, "val_acc1": best - 3 + e, "val_acc5": 90.0, "test_acc1": best - 3 + e, "lr": 0.05}
            for e in (1, 2, 3)] if history else []
    return {
        "status": "complete", "task": "train" if method == "none" else "distill", "method": method,
        "dataset": "cifar100", "student": "resnet8x4", "teacher": teacher,
        "pair": "resnet8x4" if teacher is None else "resnet32x4-resnet8x4", "seed": seed, "epochs": 3,
        "epochs_done": 3, "test_acc1_last": last, "test_acc1_best": best, "best_epoch": 3,
        "best_selected_on": "test split (mdistiller protocol)",
        "teacher_acc1": None if teacher is None else 79.3, "teacher_info": None if teacher is None else TEACHER_INFO,
        "started": started, "history": hist,
        "config": {"seed": seed, "paths": {"output_dir": f"/x/{method}{seed}"}, "distill": {"temperature": 4},
                   **({} if paper is None else {"paper": paper})},
    }


def job(sweep: Path, name: str, res: dict | None = None) -> Path:
    d = sweep / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text("trainer:\n  max_epochs: 240\n")
    if res is not None:
        (d / "results.json").write_text(json.dumps(res))
    return d


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    import torch

    s = tmp_path_factory.mktemp("multirun") / "2024-01-01" / "10-00-00"
    job(s, "0_distill=none,seed=0", result("none", 0, 72.0, 71.5))
    job(s, "1_distill=none,seed=1", result("none", 1, 72.6, 72.1))
    kd0 = job(s, "2_distill=kd,seed=0", result("kd", 0, 73.0, 72.8))
    job(s, "3_distill=kd,seed=1", result("kd", 1, 73.4, 73.1))
    job(s, "4_distill=kd,seed=2", result("kd", 2, 73.5, 73.3))
    job(s, "5_distill=dkd,seed=0", result("dkd", 0, 76.0, 75.5, history=False))
    # killed at epoch 37 of 240: a checkpoint with kdx's history, no results.json
    failed = job(s, "6_distill=dkd,seed=1")
    (failed / "checkpoints").mkdir()
    state = {"epoch": 36, "kdx": {"history": [{"epoch": 37, "val_acc1": 60.0}]}}
    torch.save(state, failed / "checkpoints" / "last.ckpt")
    job(s, "7_distill=dkd,seed=2", dict(result("dkd", 2, 99.0, 99.0), status="running"))
    # seed 0 twice (different temperature): only the later one (74.4) is averaged
    job(s, "8_topk,seed=0", result("kd+topk_scale", 0, 74.0, 73.0, started="2024-01-01T10:00:00"))
    dup = result("kd+topk_scale", 0, 74.4, 73.6, started="2024-01-01T12:00:00")
    dup["config"]["distill"]["temperature"] = 2
    job(s, "9_topk,seed=0", dup)
    # not student runs: a teacher trained inside a job, a ReffAKD stage-A artifact
    (kd0 / "teacher").mkdir()
    (kd0 / "teacher" / "results.json").write_text(json.dumps(result("none", 0, 10.0, 10.0)))
    (kd0 / "reffakd_ae").mkdir()
    (kd0 / "reffakd_ae" / "results.json").write_text(json.dumps({"status": "complete", "task": "reffakd_ae"}))
    return s


@pytest.fixture(scope="module")
def written(sweep) -> dict[str, Path]:
    return report.write(report.load([sweep]), sweep, "both")


def cells(sweep) -> dict:
    (row,) = report.load([sweep]).rows
    return row.cells


def test_mean_std_n_by_hand(sweep):
    c = cells(sweep)
    # kd best 73.0, 73.4, 73.5: mean 73.3, squared deviations .09+.01+.04 = .14, /2 → std √.07
    assert c["kd"].stats("best") == pytest.approx((73.3, 0.07 ** 0.5, 3))
    # kd last 72.8, 73.1, 73.3: mean 219.2/3, squared deviations sum .38/3, /2 → var .19/3
    assert c["kd"].stats("last") == pytest.approx((219.2 / 3, (0.19 / 3) ** 0.5, 3))
    assert c["baseline"].stats("best") == pytest.approx((72.3, 0.18 ** 0.5, 2))
    assert c["dkd"].stats("best") == (76.0, None, 1)  # the failed and the unfinished dkd runs are not in
    assert c["teacher"].stats("best") == (79.3, None, 1)  # one teacher checkpoint, logged by 4 runs


def test_table_cells_paper_and_difference(sweep):
    md = report.markdown(report.load([sweep]), "best")
    row = next(line for line in md.splitlines() if line.startswith("| cifar100"))
    assert "resnet32x4 → resnet8x4" in row
    assert "79.30; paper 79.42 (-0.12)" in row  # teacher
    assert "72.30 ± 0.42 (n=2); paper 72.50 (-0.20)" in row  # baseline
    assert "73.30 ± 0.26 (n=3); paper 73.33 (-0.03)" in row  # kd
    assert "76.00; paper 76.32 (-0.32)" in row  # dkd, n=1 shows the value alone
    assert "74.40 †" in row and "74.40 †; paper" not in row  # no paper.kd+topk_scale: the kd number is not used
    assert md.index("| teacher | baseline | dkd | kd | kd+topk_scale |") > 0


def test_best_vs_last(sweep):
    best = report.markdown(report.load([sweep]), "best")
    last = report.markdown(report.load([sweep]), "last")
    both = report.markdown(report.load([sweep]), "both")
    assert "73.30 ± 0.26 (n=3)" in best and "Last epoch" not in best
    assert "73.07 ± 0.25 (n=3); paper 73.33 (-0.26)" in last and "Best epoch" not in last
    assert "71.80 ± 0.42 (n=2)" in last and "72.30 ± 0.42" not in last
    assert "73.30 ± 0.26" in both and "73.07 ± 0.25" in both


def test_unfinished_listed_not_averaged(sweep):
    md = report.markdown(report.load([sweep]), "both", base=sweep)
    section = md.split("## Not finished or failed")[1]
    assert "`6_distill=dkd,seed=1`: no results.json; last epoch reached 37/240 (checkpoints/last.ckpt)" in section
    assert "`7_distill=dkd,seed=2`: status 'running'" in section
    assert "99.00" not in md
    assert "teacher/" not in md and "reffakd_ae" not in md  # job-internal records are neither runs nor failures


def test_duplicate_seed_flagged_and_counted_once(sweep):
    c = cells(sweep)["kd+topk_scale"]
    assert c.stats("best") == (74.4, None, 1) and c.seeds == [0]
    md = report.markdown(report.load([sweep]), "both", base=sweep)
    dup = md.split("## Duplicated seeds")[1].split("##")[0]
    assert "seed 0: `8_topk,seed=0`, `9_topk,seed=0`; averaged `9_topk,seed=0`" in dup
    assert "distill.temperature (4 vs 2)" in dup


def test_baseline_only_and_disagreeing_paper(tmp_path):
    s = tmp_path / "s"
    job(s, "0", result("none", 0, 60.0, 59.0))
    job(s, "1", result("kd", 0, 70.0, 69.0))
    job(s, "2", result("kd", 1, 71.0, 70.0, paper=dict(PAPER, kd=70.0)))
    other = result("none", 0, 50.0, 49.0, paper=None)
    other["student"] = other["pair"] = "resnet20"
    job(s, "3", other)
    rep = report.load([s])
    assert [r.title for r in rep.rows] == ["resnet32x4 → resnet8x4", "resnet20 (no teacher)"]
    md = report.markdown(rep, "best")
    assert "70.50 ± 0.71 (n=2); paper: runs disagree (70.00, 73.33)" in md
    assert "| cifar100 | resnet20 (no teacher) | – | 50.00 | – |" in md
    kd = next(line for line in report.csv_text(rep).splitlines() if ",kd," in line)
    assert ",,,70;73.33," in kd  # paper, diff_best, diff_last empty; both values kept


def test_csv_reads_with_expected_numbers(written):
    import pandas as pd

    df = pd.read_csv(written["results.csv"])
    assert list(df.columns) == report.CSV_COLUMNS
    assert sorted(df["column"]) == ["baseline", "dkd", "kd", "kd+topk_scale", "teacher"]
    kd = df[df["method"] == "kd"].iloc[0]
    assert (kd.dataset, kd.pair, kd.best_n, kd.last_n, kd.seeds) == ("cifar100", "resnet32x4-resnet8x4", 3, 3, "0;1;2")
    assert kd.best_mean == pytest.approx(73.3) and kd.best_std == pytest.approx(0.2646, abs=1e-4)
    assert kd.last_mean == pytest.approx(73.0667, abs=1e-4) and kd.paper == 73.33
    assert kd.diff_best == pytest.approx(-0.03) and kd.diff_last == pytest.approx(-0.2633, abs=1e-4)
    base = df[df["column"] == "baseline"].iloc[0]
    assert (base.method, base.best_mean, base.paper) == ("none", pytest.approx(72.3), 72.5)
    dkd = df[df["method"] == "dkd"].iloc[0]
    assert dkd.best_n == 1 and pd.isna(dkd.best_std)
    topk = df[df["method"] == "kd+topk_scale"].iloc[0]
    assert pd.isna(topk.paper) and topk.duplicate_seeds == 0  # the one duplicated seed


def test_pngs_exist_and_load(written):
    from matplotlib.image import imread

    for name in ("acc_by_method.png", "val_curves.png"):
        path = written[name]
        assert path.stat().st_size > 0
        h, w, _ = imread(path).shape
        assert h > 100 and w > 100


def test_pngs_with_one_run_and_no_history(tmp_path):
    s = tmp_path / "one"
    job(s, "0", result("kd", 0, 70.0, 69.0, history=False))
    out = report.write(report.load([s]), tmp_path / "out", "last")
    assert all(out[n].stat().st_size > 0 for n in ("acc_by_method.png", "val_curves.png"))


def test_sweep_callback_writes_and_says_where(sweep, tmp_path, capsys):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import shutil

    s = tmp_path / "sweep"
    shutil.copytree(sweep, s)
    cb = instantiate({"_target_": "kdx.report.SweepReport", "metric": "test_acc1_best"})
    # the fixture holds jobs that did not complete: the report is written, then the sweep's status says so
    with pytest.raises(SystemExit) as stop:
        cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(s)}}}))
    assert stop.value.code == 1
    assert all((s / n).stat().st_size > 0 for n in report.OUTPUT_FILES)
    out = capsys.readouterr().out
    assert f"Results table: {s / 'results.md'}" in out and "2 job(s) did not complete" in out
    assert "Last epoch" not in (s / "results.md").read_text()


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "kdx.report", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_writes_files(sweep, tmp_path):
    proc = cli(str(sweep), "--out", str(tmp_path / "o"), "--metric", "best")
    assert proc.returncode == 0, proc.stderr
    assert all((tmp_path / "o" / n).stat().st_size > 0 for n in report.OUTPUT_FILES)
    assert "73.30 ± 0.26 (n=3)" in proc.stdout and str(tmp_path / "o" / "results.md") in proc.stdout


def test_cli_empty_or_missing_folder_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    job(tmp_path / "failed", "0_x")
    for folder in (tmp_path / "empty", tmp_path / "nope", tmp_path / "failed"):
        proc = cli(str(folder), "--no-plots")
        assert proc.returncode == 2 and str(folder) in proc.stderr, proc.stderr
    assert "0_x: no results.json; no checkpoint saved" in proc.stderr


def test_table_teacher_runs_join_the_network_teacher_row(tmp_path):
    """ReffAKD's teacher is a label table: its column sits in the row of the same student, like the baseline."""
    s = tmp_path / "sweep"
    job(s, "0_none", result("none", 0, 60.0, 59.0))
    job(s, "1_kd", result("kd", 0, 64.0, 63.0))
    table = result("reffakd", 0, 55.0, 54.0) | {"teacher": "reffakd", "pair": "reffakd-resnet8x4",
                                                  "teacher_acc1": None, "teacher_network": False,
                                                  "teacher_info": {"arch": "reffakd", "table_sha256": "f00"}}
    job(s, "2_reffakd", table)
    rows = report.load([s]).rows
    assert len(rows) == 1 and rows[0].title == "resnet32x4 → resnet8x4"
    assert rows[0].cells["reffakd"].values["best"] == [55.0]
    assert rows[0].cells["teacher"].values["best"] == [79.3]  # the network teacher's accuracy only
    # alone (no network-teacher run of that student), the table teacher keeps a row of its own
    alone = tmp_path / "alone"
    job(alone, "0_reffakd", table)
    (row,) = report.load([alone]).rows
    assert row.title == "reffakd → resnet8x4" and "teacher" not in row.cells


def test_a_cell_mixing_training_budgets_says_so(tmp_path):
    s = tmp_path / "sweep"
    job(s, "0_kd", result("kd", 0, 70.0, 69.0))
    job(s, "1_kd", result("kd", 1, 60.0, 59.0) | {"epochs": 12})  # another budget (the fixture's is 3)
    (row,) = report.load([s]).rows
    text = report.format_cell(row.cells["kd"], "best")
    assert text.startswith("65.00 ± 7.07 (n=2)") and "mixes epochs 12/3" in text
    assert "mixes epochs" not in report.format_cell(row.cells["teacher"], "best")
