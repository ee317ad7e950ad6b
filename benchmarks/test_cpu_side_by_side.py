"""The CPU side-by-side command runs end to end on a small shape: every provider measured on the same
inputs, ratios to the others, errors against float64, the machine named. Never checks a timing."""
import json

from .cpu_side_by_side import main


def test_side_by_side_writes_its_report(tmp_path):
    assert main(["--rows", "64,96", "--dtypes", "float32,bfloat16", "--rounds", "2", "--hidden", "32",
                 "--vocab", "500", "--providers", "opsdl_torch,opsdl_torch_lean,naive", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["machine"]["model"] and result["machine"]["torch_capability"]
    rows = result["rows"]
    assert [(r["dtype"], r["n"]) for r in rows[::3]] == [("float32", 64), ("float32", 96), ("bfloat16", 64),
                                                         ("bfloat16", 96)]
    for r in rows:
        assert len(r["times_ms"]) == 2 and 0 < r["min_ms"] <= r["median_ms"] and "time_over_liger_jsd_loss_chunked_compiled" not in r
        assert abs(r["time_over_naive"] * next(o["median_ms"] for o in rows if o["provider"] == "naive"
                                              and (o["n"], o["dtype"]) == (r["n"], r["dtype"])) - r["median_ms"]) < 1e-9
        assert r["loss_error"] < (1e-5 if r["dtype"] == "float32" else 1e-2)
        assert r["dh_error"] < (1e-5 if r["dtype"] == "float32" else 2e-2)
    report = (tmp_path / "report.md").read_text()
    assert "## bfloat16, N=96" in report and "| opsdl lean (256 MiB) |" in report and "--vocab 500" in report
