"""The documented experiment script, end to end on a tiny random model (its ``smoke`` preset)."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "opsdl_experiment.py"


def load_script():
    spec = importlib.util.spec_from_file_location("opsdl_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_experiment_trains_four_ways_evaluates_five_and_resumes(tmp_path):
    experiment = load_script()
    argv = ["--preset", "smoke", "--model", "tiny:llama", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]
    assert experiment.main(argv) == 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["command"] == "python examples/opsdl_experiment.py " + " ".join(argv)
    assert set(run["train_seconds"]) == {"opsdl-full", "opsdl-sampled", "opsdl-ema", "sft"}
    assert all(seconds > 0 for seconds in run["train_seconds"].values())
    assert run["eval_seconds"]["timed_cells"] == run["eval_seconds"]["cells"] == 5 * 2  # 5 models x 2 lengths
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert {(r["model"], r["length"]) for r in rows} == {(m, n) for m in run["models"].values() for n in (64, 96)}
    untrained = json.loads((tmp_path / "out" / "untrained-vartrack" / "results.json").read_text())
    assert {(r["model"], r["task"], r["length"]) for r in untrained["rows"]} == \
        {(m, "vartrack", n) for m in run["models"].values() for n in (64, 96)}
    assert untrained["config"]["max_new_tokens"] == 5
    for name in ("opsdl-full", "opsdl-sampled", "opsdl-ema", "sft"):
        log = (tmp_path / "runs" / f"smoke-{name}" / "log.jsonl").read_text().splitlines()
        assert (tmp_path / "out" / "train_logs" / f"{name}.jsonl").read_text().splitlines() == log
        assert len(log) == 2 and experiment.step_seconds(tmp_path / "runs" / f"smoke-{name}" / "log.jsonl") == \
            run["train_seconds"][name]

    # a rerun finds every run trained and every cell measured: nothing is redone
    assert experiment.main(argv) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"] == rows
    for name in ("opsdl-full", "opsdl-sampled", "opsdl-ema", "sft"):
        assert len((tmp_path / "runs" / f"smoke-{name}" / "log.jsonl").read_text().splitlines()) == 2
