"""``python -m kdx.bench`` runs a case end to end (the numbers are a benchmark's, not asserted)."""
import json

import pytest

from kdx import bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_runs_one_tiny_case_and_prints_json_and_table(capsys, tmp_path):
    import logging

    out = tmp_path / "bench.jsonl"
    before = logging.getLogger("kdx").level
    assert bench.main(["--methods", "dkd", "--pairs", "wrn40_2_wrn16_2", "--precisions", "fp32",
                       "--warmup", "1", "--steps", "2", "--batch", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line)["bench"] for line in printed.splitlines() if line.startswith('{"bench"')]
    assert len(rows) == 1 and rows[0]["case"] == "dkd/wrn40_2_wrn16_2/fp32"
    r = rows[0]
    assert r["kdx_img_s"] > 0 and r["bare_img_s"] > 0 and r["repeats"] == 3 == len(r["bare_img_s_runs"])
    assert r["ratio_min"] <= r["ratio_kdx_over_bare"] <= r["ratio_max"]
    assert r["overhead_ms_step_min"] <= r["overhead_ms_step"] <= r["overhead_ms_step_max"]
    assert "| dkd/wrn40_2_wrn16_2/fp32 |" in printed
    assert json.loads(out.read_text().splitlines()[0])["bench"]["case"] == r["case"]
    assert logging.getLogger("kdx").level == before  # quietened while benchmarking only


@pytest.mark.parametrize("args, named", [
    (["--methods", "nosuch"], "nosuch"),
    (["--pairs", "resnet8:nosuch"], "nosuch"),
    (["--pairs", "resnet8"], "resnet8"),
    (["--repeats", "0"], "--repeats"),
    (["--clock", "thread"], "--threads 1"),
])
def test_bench_rejects_an_unknown_case(capsys, args, named):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2
    assert named in capsys.readouterr().err


def test_bench_cache_case_reports_live_and_cached_rates(capsys):
    assert bench.main(["--cache-only", "--pairs", "wrn40_2_wrn16_2", "--precisions", "fp32",
                       "--warmup", "1", "--steps", "2", "--repeats", "1", "--batch", "8"]) == 0
    rows = [json.loads(line)["bench"] for line in capsys.readouterr().out.splitlines() if line.startswith('{"bench"')]
    assert [r["case"] for r in rows] == ["cache/kd/wrn40_2_wrn16_2/fp32"]
    r = rows[0]
    assert r["live_teacher_img_s"] > 0 and r["kdx_img_s"] > 0 and r["cache_fill_s"] is not None
    assert r["cache_fill_images"] == 4 * 8 * 3  # 4 views of every image of the 3-step split


def test_methods_cover_every_distill_config_but_the_data_free_ones_and_deit():
    from pathlib import Path

    from kdx.cli import CONFIG_DIR

    paths = list((Path(CONFIG_DIR) / "distill").glob("*.yaml"))
    # the data-free methods (a synthesis regime, timed by kdx.bench_datafree) and DeiT (a distillation-token student)
    # have no bare real-data loop to compare with
    data_free = {p.stem for p in paths if "datafree" in p.read_text()}
    assert data_free == {"nayer", "deepinv", "cmi", "fast", "dafl"}
    assert {p.stem for p in paths} - data_free - {"deit"} <= set(bench.METHODS)
    assert {"kd+topk_scale", "kd+ls", "kd+dot"} <= set(bench.METHODS)
    assert bench.parse_pair("resnet8:resnet8") == ("resnet8", "resnet8")
    assert bench.parse_pair("wrn40_2_wrn16_2") == ("wrn_40_2", "wrn_16_2")
    assert bench.method_overrides("kd+dot") == ["distill=kd", "optim=dot"]


def test_summary_of_interleaved_rounds():
    # kdx 10, 12, 11 ms/step against bare 8, 8, 10 ms/step (2 steps of batch 4 per window)
    s = bench.summarise([0.020, 0.024, 0.022], [0.016, 0.016, 0.020], steps=2, batch=4)
    assert (s["kdx_ms_step"], s["bare_ms_step"]) == (11.0, 8.0)
    assert (s["overhead_ms_step"], s["overhead_ms_step_min"], s["overhead_ms_step_max"]) == (2.0, 1.0, 4.0)
    assert (s["ratio_kdx_over_bare"], s["ratio_min"], s["ratio_max"]) == (0.8, 0.6667, 0.9091)
    assert s["kdx_img_s"] == round(4000 / 11, 2) and s["bare_img_s"] == 500.0


class FakeClock:
    """A timer that moves only when a step runs: ``advance`` seconds per call of the wrapped step function."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def costing(self, fn, seconds: float):
        def step(*args, **kwargs):
            self.now += seconds
            return fn(*args, **kwargs)
        return step


def test_overhead_figure_on_a_fake_timer(monkeypatch, capsys):
    """kdx's step made to cost 4 ms and the bare loop's 3 ms on a fake timer: the bench reports 1 ms/step overhead
    and kdx/bare 0.75 in every round, whatever the machine does meanwhile (a unit test of the arithmetic and of the
    interleaving, not a timing)."""
    import kdx.regimes.distill as distill_regime
    import kdx.regimes.step as step

    clock = FakeClock()
    monkeypatch.setitem(bench.CLOCKS, "wall", clock)
    real = step.distill_step
    monkeypatch.setattr(step, "distill_step", clock.costing(real, 0.003))  # the bare loop's (looked up per call)
    monkeypatch.setattr(distill_regime, "distill_step", clock.costing(real, 0.004))  # kdx's training step
    assert bench.main(["--methods", "kd", "--pairs", "resnet8:resnet8", "--precisions", "fp32", "--batch", "2",
                       "--warmup", "1", "--steps", "3", "--repeats", "4"]) == 0
    out = capsys.readouterr().out
    (r,) = [json.loads(line)["bench"] for line in out.splitlines() if line.startswith('{"bench"')]
    assert r["case"] == "kd/resnet8:resnet8/fp32" and r["repeats"] == 4 and r["steps"] == 3
    assert (r["kdx_ms_step"], r["bare_ms_step"]) == (4.0, 3.0)
    assert (r["overhead_ms_step"], r["overhead_ms_step_min"], r["overhead_ms_step_max"]) == (1.0, 1.0, 1.0)
    assert (r["ratio_kdx_over_bare"], r["ratio_min"], r["ratio_max"]) == (0.75, 0.75, 0.75)
    assert r["kdx_img_s"] == 500.0 and r["bare_img_s_runs"] == [666.67] * 4
    assert "| kd/resnet8:resnet8/fp32 | 500.0 | 666.7 | +1.00 (+1.00…+1.00) | 0.750 (0.750–0.750) |" in out
    assert bench.clock is not clock  # the timer is the module's own again


def test_a_case_whose_loss_turns_non_finite_is_reported_not_timed():
    row = {"case": "vid/wrn40_2_wrn16_2/fp32", "method": "vid", "pair": "wrn40_2_wrn16_2", "precision": "fp32",
           "failed": "Non-finite loss at epoch 1, global step 2: loss=nan; term(s) vid=nan."}
    assert "| vid/wrn40_2_wrn16_2/fp32 | not timed: Non-finite loss at epoch 1, global step 2 |" in bench.table([row])


def test_phases_cut_kdx_step_at_lightning_hooks_and_bare_loop_in_four(monkeypatch, capsys):
    """``python -m kdx.bench_phases`` on a fake clock that advances 1 ms per read: every phase between two marks is
    exactly 1 ms, so the phases printed are the marks a KD step reaches, in order, each seen once per step."""
    import itertools

    from kdx import bench_phases

    ticks = itertools.count()
    monkeypatch.setattr(bench_phases, "clock", lambda: next(ticks) / 1000)
    assert bench_phases.main(["--method", "kd", "--batch", "2", "--steps", "4", "--warmup", "1"]) == 0
    printed = capsys.readouterr().out
    row = json.loads(next(line for line in printed.splitlines() if line.startswith('{"phases"')))["phases"]
    assert list(row["kdx_ms"]) == list(bench_phases.KDX_PHASES.values())  # every hook, in a step's order
    assert set(row["kdx_ms"].values()) == {1.0} and row["kdx_sum_ms"] == len(bench_phases.KDX_PHASES)
    assert row["bare_ms"] == {"data": 1.0, "forward": 1.0, "backward": 1.0, "optimiser": 1.0}
    assert "| backward | 1.000 |" in printed and "Difference of the sums: +8.000 ms" in printed


def test_phases_rejects_an_unknown_method(capsys):
    from kdx import bench_phases

    with pytest.raises(SystemExit) as e:
        bench_phases.main(["--method", "nosuch"])
    assert e.value.code == 2 and "nosuch" in capsys.readouterr().err


def test_phases_floor_times_a_bare_loop_and_lightning_both_ways(monkeypatch, capsys):
    """``--floor`` on a fake clock read once per step (1 ms a read): each loop then measures exactly 1 ms a step, so
    the row holds the three loops, each timed per step over its own steps."""
    import itertools

    from kdx import bench_phases

    ticks = itertools.count()
    monkeypatch.setattr(bench_phases, "clock", lambda: next(ticks) / 1000)
    assert bench_phases.main(["--floor", "--steps", "4", "--warmup", "1"]) == 0
    printed = capsys.readouterr().out
    row = json.loads(next(line for line in printed.splitlines() if line.startswith('{"phases"')))["phases"]
    assert row["ms_step"] == {"bare loop": 1.0, "Lightning, automatic optimisation": 1.0,
                              "Lightning, manual optimisation": 1.0}
    assert "| Lightning, manual optimisation | 1.000 | +0.000 |" in printed
