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
    assert r["kdx_img_s"] > 0 and r["bare_img_s"] > 0
    assert abs(r["ratio_kdx_over_bare"] - r["kdx_img_s"] / r["bare_img_s"]) < 1e-2
    assert "| dkd/wrn40_2_wrn16_2/fp32 |" in printed
    assert json.loads(out.read_text().splitlines()[0])["bench"]["case"] == r["case"]
    assert logging.getLogger("kdx").level == before  # quietened while benchmarking only


def test_bench_rejects_an_unknown_case(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--methods", "fitnet"])
    assert e.value.code == 2
    assert "fitnet" in capsys.readouterr().err


def test_bench_cache_case_reports_live_and_cached_rates(capsys):
    assert bench.main(["--cache-only", "--pairs", "wrn40_2_wrn16_2", "--precisions", "fp32",
                       "--warmup", "1", "--steps", "2", "--batch", "8"]) == 0
    rows = [json.loads(line)["bench"] for line in capsys.readouterr().out.splitlines() if line.startswith('{"bench"')]
    assert [r["case"] for r in rows] == ["cache/kd/wrn40_2_wrn16_2/fp32"]
    r = rows[0]
    assert r["live_teacher_img_s"] > 0 and r["kdx_img_s"] > 0 and r["cache_fill_s"] is not None
    assert r["cache_fill_images"] == 4 * 8 * 3  # 4 views of every image of the 3-step split
