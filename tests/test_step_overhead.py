"""The training step without a host sync: losses summed on the device, logged as per-step means every
``trainer.log_every_n_steps`` steps and at epoch end, checked for non-finite values at logging points, every
``perf.check_finite_every`` steps and at epoch end (kdx.regimes.base, kdx.regimes.window). No speed is asserted."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from conftest import compose_cfg
from kdx.errors import ConfigError, NonFiniteLossError
from kdx.regimes.base import KDModule
from kdx.regimes.window import TermWindow, stacked
from kdx.run import build_job, run

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ the window
def test_window_means_per_term_over_the_steps_that_had_it():
    w = TermWindow()
    t = torch.tensor
    w.add(stacked(t(3.0), {"ce": t(1.0), "kd": t(2.0)}), ("ce", "kd"), step=4)
    w.add(stacked(t(5.0), {"ce": t(2.0), "kd": t(3.0)}), ("ce", "kd"), step=5)
    w.add(stacked(t(7.0), {"ce": t(3.0), "kd": t(3.0), "aux": t(1.0)}), ("ce", "kd", "aux"), step=6)  # a new term
    total, terms = w.read()
    assert total == pytest.approx(5.0) and (w.first_step, w.last_step, w.steps) == (4, 6, 3)
    assert terms == pytest.approx({"ce": 2.0, "kd": 8 / 3, "aux": 1.0})
    w.reset()
    assert w.steps == 0 and w.first_step is None and math.isnan(w.read()[0])


def test_window_keeps_a_non_finite_step_visible_and_owns_its_sums():
    w, values = TermWindow(), stacked(torch.tensor(1.0), {"ce": torch.tensor(1.0)})
    w.add(values, ("ce",), 0)
    w.add(values, ("ce",), 1)
    assert values.tolist() == [1.0, 1.0]  # the caller's vector is not summed into (it is shared by two windows)
    w.add(stacked(torch.tensor(float("nan")), {"ce": torch.tensor(float("inf"))}), ("ce",), 2)
    total, terms = w.read()
    assert math.isnan(total) and terms["ce"] == math.inf


def test_check_interval_is_validated(tmp_path, tiny):
    with pytest.raises(ConfigError, match="perf.check_finite_every=0"):
        build_job(compose_cfg(tiny + ["perf.check_finite_every=0"], tmp_path))  # before the missing teacher's run
    assert not (tmp_path / "run" / "teacher").exists()


# ------------------------------------------------------------------------------------------ non-finite loss
NAN = ["distill=none", "trainer.max_epochs=3", "distill._target_=kdx_test_helpers.NaNAtStep"]


@pytest.mark.parametrize("settings, at_step, steps", [
    # no logging point in a 4-step epoch; checked every 3 steps: NaN from step 4 (epoch 2) → caught at step 6
    (["trainer.log_every_n_steps=50", "perf.check_finite_every=3"], 4, "global steps 4–6"),
    # checked at the logging points (every 2 steps: after steps 5, 7, ...): NaN from step 5 → caught at step 5
    (["trainer.log_every_n_steps=2"], 5, "global steps 4–5"),
    # a NaN in the epoch's last steps, after the last check: caught at the epoch's end, before its checkpoint
    (["trainer.log_every_n_steps=50", "perf.check_finite_every=3"], 7, "global step 7:"),
])
def test_nan_loss_stops_within_the_check_interval_naming_steps_and_term(tmp_path, tiny, settings, at_step, steps):
    cfg = compose_cfg(tiny + NAN + settings + [f"+distill.at_step={at_step}"], tmp_path)
    with pytest.raises(NonFiniteLossError) as err:
        run(cfg)
    msg = str(err.value)
    assert "Non-finite loss at epoch 2, " in msg and steps in msg and "ce=nan" in msg, msg
    # the last good checkpoint is epoch 1's: the NaN steps of epoch 2 never reached a checkpoint
    assert "last.ckpt" in msg
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "failed" and record["epochs_done"] == 1
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_check_finite_off_never_reads_the_losses_back(tmp_path, tiny, monkeypatch):
    reads = []
    real = TermWindow.read
    monkeypatch.setattr(TermWindow, "read", lambda self: reads.append(self) or real(self))
    job = build_job(compose_cfg(tiny + NAN + ["perf.check_finite=false", "trainer.max_epochs=1",
                                              "trainer.log_every_n_steps=50", "+distill.at_step=1"], tmp_path))
    job.trainer.fit(job.module, datamodule=job.datamodule)  # trains on through the NaN
    assert len(reads) == 1 and reads[0] is job.module._unlogged  # the epoch-end log only


# ------------------------------------------------------------------------------------------ logged values
def test_logged_terms_are_the_per_step_means_since_the_previous_row(tmp_path, tiny, teacher_ckpt, monkeypatch):
    """CSV rows every 3 steps and at each epoch's end (4 steps an epoch): each value of train/loss/<term> is the mean
    of that term over the steps since the previous row, and every step is in exactly one row."""
    per_step: list[tuple[int, dict[str, float]]] = []
    real = KDModule.record_step

    def spy(self, loss, terms, batch_size):
        per_step.append((self.global_step, {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}))
        return real(self, loss, terms, batch_size)

    monkeypatch.setattr(KDModule, "record_step", spy)
    run(compose_cfg(tiny + ["distill=kd", f"teacher.ckpt={teacher_ckpt}", "logger=csv", "trainer.max_epochs=2",
                            "trainer.log_every_n_steps=3"], tmp_path))
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss/kd")]
    assert [s for s, _ in per_step] == list(range(8))
    logged_at = [int(r["step"]) for r in rows]
    assert logged_at == [2, 3, 5, 7]  # logging points after steps 2 and 5; epoch ends after steps 3 and 7
    prev = -1
    for r, at in zip(rows, logged_at):
        window = [v for s, v in per_step if prev < s <= at]
        for key, column in (("loss", "train/loss"), ("ce", "train/loss/ce"), ("kd", "train/loss/kd")):
            assert float(r[column]) == pytest.approx(sum(v[key] for v in window) / len(window), rel=1e-5), (at, key)
        prev = at
