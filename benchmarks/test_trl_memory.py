"""The TRL memory benchmarks run end to end (tiny models, CPU): each trainer runs in its own process
and the report holds what it ran."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]


def run(module: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_trl_opsdl_memory_runs_both_trainers(tmp_path):
    out = tmp_path / "report.json"
    printed = run("benchmarks.trl_opsdl_memory", "--model", "tiny:qwen2", "--no-bf16", "--context", "64",
                  "--completion", "4", "--batch", "1", "--device", "cpu", "--out", str(out))
    report = json.loads(out.read_text())
    opsdl, sdft = report["rows"]
    assert (opsdl["trainer"], sdft["trainer"]) == ("OPSDLTrainer", "SDFTTrainer")
    for row in (opsdl, sdft):
        assert len(row["losses"]) == 2 and all(loss >= 0 for loss in row["losses"])  # a KL, two steps
        assert row["peak_bytes"] >= row["held_before_training_bytes"] > 0
    assert report["settings"]["model"] == "tiny:qwen2" and "peak: SDFT full logits" in printed


def test_trl_gkd_memory_runs_both_losses(tmp_path):
    out = tmp_path / "report.json"
    run("benchmarks.trl_gkd_memory", "--vocab", "1024", "--prompt", "8", "--completion", "64", "--device", "cpu",
        "--out", str(out))
    report = json.loads(out.read_text())
    trl_row, fused_row = report["rows"]
    assert (trl_row["trainer"], fused_row["trainer"]) == ("GKDTrainer", "FusedGKDTrainer")
    assert report["loss_relative_difference"] < 1e-5  # the same loss, computed two ways in float32
