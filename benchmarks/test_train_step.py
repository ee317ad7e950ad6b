"""The step benchmark runs `opsdl train` end to end (tiny model, CPU): what it reports is what ran."""
import json
import subprocess
import sys
from pathlib import Path


def test_each_setting_is_a_real_run_split_into_phases(tmp_path):
    out = tmp_path / "rows.jsonl"
    subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--model", "tiny:llama", "--contexts", "64",
                    "--engines", "hf", "--compute", "float32", "--steps", "2", "--device", "cpu",
                    "--extra", "--max-new-tokens 3 --num-examples 4", "--out", str(out)],
                   check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    header, row = [json.loads(line) for line in out.read_text().splitlines()]
    assert header["machine"]["cores"] >= 1 and "cpu_bf16_units" in header["machine"]
    assert "error" not in row, row
    assert (row["engine"], row["compute"], row["context_tokens"]) == ("hf", "float32", 64)
    assert row["setting"].startswith("compute: float32 (--no-bf16") and row["setting"].endswith("rollouts: hf")
    phases = ("rollout", "teacher", "student", "loss", "backward", "optimizer")
    assert all(row[f"{p}_seconds"] > 0 for p in phases), row
    assert sum(row[f"{p}_seconds"] for p in phases) <= row["step_seconds"]
