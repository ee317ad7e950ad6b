"""The training-step memory benchmark runs end to end (tiny model, CPU): what it reports is what it ran."""
import json
import subprocess
import sys
from pathlib import Path


def test_one_training_step_is_measured_in_a_fresh_process(tmp_path):
    out = tmp_path / "rows.jsonl"
    subprocess.run([sys.executable, "-m", "benchmarks.train_memory", "--model", "tiny:llama", "--dtype", "float32",
                    "--tokens", "90,384", "--response", "16", "--device", "cpu", "--out", str(out)], check=True,
                   capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    too_few, row = [json.loads(line) for line in out.read_text().splitlines()]
    assert "error" not in row, row
    assert too_few["tokens"] == 90 and "expected more than" in too_few["error"]
    assert (row["tokens"], row["sequences"], row["response_tokens"], row["layers"]) == (384, 4, 16, 2)
    assert row["dtype"] == "torch.float32" and row["parameters"] > 1_000_000
    assert 0.1 < row["peak_gib"] < 8 and row["second_step_s"] > 0
