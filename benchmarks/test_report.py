"""The report's arithmetic: target checks, ratios, several input files, files written."""
from __future__ import annotations

import json

from .report import main


def _row(provider, n, h, v, ms, mib, fraction=None):
    return {"kind": "timing", "provider": provider, "n": n, "hidden": h, "vocab": v, "dtype": "bfloat16",
            "device": "cuda", "loss": 0.5, "median_ms": ms, "peak_extra_mib": mib, "fraction_of_floor": fraction,
            "tflops": None, "matmul_tflops": 790.0}


def _accuracy(provider, dh, dw):
    return {"kind": "accuracy", "provider": provider, "n": 2048, "hidden": 4096, "vocab": 128256,
            "dtype": "bfloat16", "device": "cuda", "estimator": "full", "loss_error": 1e-6, "dh_error": dh,
            "dw_error": dw}


def test_report_checks_targets_and_writes_files(tmp_path):
    headline = [
        _row("opsdl_fast", 8192, 4096, 128256, 54.0, 1002.0, 0.85),
        _row("opsdl_fast_sampled", 8192, 4096, 128256, 53.0, 1002.0),
        _row("opsdl_lean", 8192, 4096, 128256, 95.0, 240.0),
        _row("liger_fused_linear_jsd", 8192, 4096, 128256, 101.0, 1127.0),
        _row("liger_jsd_loss_chunked", 8192, 4096, 128256, 66.0, 1253.0),
        _accuracy("opsdl_fast", 0.0023, 0.0031),
        _accuracy("liger_fused_linear_jsd", 0.022, 0.03),
    ]
    rest = [_row("opsdl_fast", 8192, 4096, 32768, 30.0, 900.0, 0.5),
            _row("liger_jsd_loss_chunked", 8192, 4096, 32768, 20.0, 1100.0),
            _row("opsdl_lean", 8192, 4096, 32768, 25.0, 300.0)]
    machine = {"kind": "machine", "gpu": "Test GPU"}
    cut_short = {"kind": "unmeasured", "provider": "naive", "shape": "N16384-H3584-V152064", "reason": "out of memory"}
    for name, rows in (("a.jsonl", [machine, *headline]), ("b.jsonl", [machine, *rest, cut_short])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tests.log").write_text("....\n===== 140 passed, 2 skipped in 50.0s =====\n")
    assert main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "out"),
                 "--tests-log", str(tmp_path / "tests.log")]) == 0

    result = json.loads((tmp_path / "out" / "results.json").read_text())
    goals = {(g["target"], g["shape"]): g for g in result["targets"]}
    head, v32 = "8192x4096x128256", "8192x4096x32768"
    speed = goals[("default time / fastest Liger", head)]
    assert abs(speed["value"] - 54 / 66) < 1e-12 and speed["met"] and "liger_jsd_loss_chunked" in speed["beside"]
    assert abs(goals[("default extra memory / Liger's", head)]["value"] - 1002 / 1127) < 1e-12
    assert goals[("default fraction of the 4-product floor", head)]["met"] is True
    assert goals[("lean time / fastest Liger", head)]["met"] is False  # 95 / 66 > 1.4
    assert goals[("lean extra memory", head)]["met"] is True
    assert goals[("sampled time / full time", head)]["met"] is True
    assert goals[("default time / fastest Liger", v32)]["met"] is False and goals[("lean extra memory", v32)]["met"] is False
    assert goals[("default fraction of the 4-product floor", "8192x4096x256000")]["met"] is None  # not measured
    dh = goals[("opsdl_fast dh error vs float64", "2048x4096x128256")]
    assert dh["met"] and "dh 2.20%" in dh["beside"]
    assert goals[("opsdl_lean dh error vs float64", "")]["met"] is None
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Test GPU" in md and "140 passed, 2 skipped" in md and "| opsdl_fast | 54.00 | 1002.0 |" in md
    assert "| liger_fused_linear_jsd | 2048x4096x128256 | bfloat16 | full | 1.00e-06 | 2.20% | 3.00% |" in md
    assert "- naive at N16384-H3584-V152064: out of memory" in md
    assert (tmp_path / "out" / "plot.png").stat().st_size > 1000
