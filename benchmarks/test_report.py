"""The report's arithmetic: target checks, ratios, files written."""
from __future__ import annotations

import json

from .report import main


def _row(provider, n, h, v, ms, mib, fraction=None):
    return {"extra_info": {"provider": provider, "n": n, "hidden": h, "vocab": v, "dtype": "bfloat16",
                           "device": "cuda", "loss": 0.5, "median_ms": ms, "peak_extra_mib": mib,
                           "fraction_of_floor": fraction, "tflops": None, "matmul_tflops": 790.0}}


def test_report_checks_targets_and_writes_files(tmp_path):
    rows = [
        _row("opsdl_triton_full", 8192, 4096, 128256, 90.0, 40.0, 0.6),
        _row("opsdl_triton_sampled", 8192, 4096, 128256, 60.0, 30.0),
        _row("liger_fused_linear_jsd", 8192, 4096, 128256, 100.0, 3000.0),
        _row("liger_jsd_loss_chunked", 8192, 4096, 128256, 120.0, 2500.0),
        _row("opsdl_triton_full", 8192, 4096, 32768, 30.0, 35.0, 0.5),
        _row("opsdl_triton_full", 1024, 4096, 128256, 20.0, 10.0, 0.4),
    ]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"machine_info": {"gpu": "Test GPU"}, "benchmarks": rows}))
    (tmp_path / "tests.log").write_text("....\n===== 140 passed, 2 skipped in 50.0s =====\n")
    assert main([str(bench), "--out", str(tmp_path / "out"), "--tests-log", str(tmp_path / "tests.log")]) == 0

    result = json.loads((tmp_path / "out" / "results.json").read_text())
    goals = {g["target"].split(" in ")[0]: g for g in result["targets"]}
    assert abs(goals["full time / fastest Liger time"]["value"] - 0.9) < 1e-12 and goals["full time / fastest Liger time"]["met"]
    assert goals["full fraction of the floor"]["met"] is False  # 0.6 < 0.7
    assert abs(goals["sampled time / full time"]["value"] - 60 / 90) < 1e-12 and goals["sampled time / full time"]["met"]
    assert goals["full extra memory"]["met"] is True
    assert goals["full extra memory spread over V"]["value"] == 5.0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Test GPU" in md and "140 passed, 2 skipped" in md and "| opsdl_triton_full | 90.00 | 40.0 |" in md
    assert (tmp_path / "out" / "plot.png").stat().st_size > 1000
