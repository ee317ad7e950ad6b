"""opsdl eval: deterministic samples, scoring, outputs; the SFT baseline objective."""
from __future__ import annotations

import json
import re

import pytest

from opsdl.cli import main
from opsdl.data import answer_found, make_examples
from opsdl.eval import EvalConfig, evaluate
from opsdl.eval_synthetic import markdown
from opsdl.train import TrainConfig, train


def _words(text: str) -> int:
    return len(text.split())


def test_eval_samples_are_deterministic_and_disjoint_from_training():
    a = make_examples("multikey", 4, 200, _words, seed=0, split="eval")
    assert a == make_examples("multikey", 4, 200, _words, seed=0, split="eval")
    train_ids = {e.long_context for e in make_examples("multikey", 50, 200, _words, seed=0)}
    assert not train_ids & {e.long_context for e in a}


def test_scoring_on_hand_written_outputs():
    assert answer_found("The special magic number is 8150097.", ["8150097"])
    assert not answer_found("The number is 815009.", ["8150097"])
    assert answer_found("TLISF, RWWIU, PFOGQ and BSDWD", ["TLISF", "RWWIU", "PFOGQ", "BSDWD"])
    assert not answer_found("TLISF, RWWIU", ["TLISF", "RWWIU", "PFOGQ"])
    table = markdown([{"model": "m", "task": "multikey", "length": 1024, "accuracy": 0.5, "short_accuracy": 1.0,
                       "samples": 40},
                      {"model": "m", "task": "multikey", "length": 2048, "accuracy": 0.25, "short_accuracy": 0.5,
                       "samples": 40}])
    # Wilson 95% intervals: 20/40, 10/40, and the evidence-only check pooled, 60/80
    assert "| m | multikey | 0.50 [0.35, 0.65] | 0.25 [0.14, 0.40] | 0.75 [0.65, 0.83] |" in table


def test_wilson_interval_against_the_closed_form_and_the_edges():
    from opsdl.intervals import wilson_interval

    low, high = wilson_interval(0, 40)
    assert low == 0.0 and abs(high - 1.96**2 / (40 + 1.96**2)) < 1e-12  # k = 0: upper = z^2 / (n + z^2)
    low, high = wilson_interval(40, 40)
    assert high == 1.0 and abs(low - 40 / (40 + 1.96**2)) < 1e-12
    low, high = wilson_interval(31, 40)
    assert low < 31 / 40 < high and abs((low + high) / 2 - (31 / 40 + 1.96**2 / 80) / (1 + 1.96**2 / 40)) < 1e-12


def test_tiny_model_end_to_end_and_cli(tmp_path):
    cfg = EvalConfig(model="tiny:llama", tasks="multikey,vartrack", lengths="64,128", samples=3,
                     max_new_tokens=4, out=str(tmp_path / "e"), device="cpu")
    result = evaluate(cfg)
    assert len(result["rows"]) == 4 and all(0 <= r["accuracy"] <= 1 and r["seconds"] > 0 for r in result["rows"])
    saved = json.loads((tmp_path / "e" / "results.json").read_text())
    assert saved["rows"] == result["rows"]
    assert (tmp_path / "e" / "accuracy.png").stat().st_size > 1000
    assert "| tiny:llama | vartrack |" in (tmp_path / "e" / "results.md").read_text()
    code = main(["eval", "--model", "tiny:llama", "--lengths", "64,x", "--out", str(tmp_path / "f")])
    assert code == 2


def test_sft_objective_trains_on_gold_answers(tmp_path):
    summary = train(TrainConfig(model="tiny:llama", objective="sft", context_tokens=64, num_examples=4, steps=2,
                                batch_size=2, lr=1e-3, device="cpu", out=str(tmp_path)))
    assert summary["steps_run"] == 2 and summary["first_loss"] > summary["last_loss"] > 0
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(r["answer_rate"] is None for r in log)  # gold targets say nothing about drift


def test_eval_resumes_finished_cells(tmp_path, monkeypatch):
    from opsdl.eval_answers import Answerer

    calls = []
    real = Answerer.answers

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(Answerer, "answers", counting)
    cfg = dict(model="tiny:llama", tasks="multikey", samples=2, max_new_tokens=3, out=str(tmp_path), device="cpu",
               short_context_check=False)
    evaluate(EvalConfig(**cfg, lengths="64"))
    assert len(calls) == 1
    result = evaluate(EvalConfig(**cfg, lengths="64,96"))  # only the new length is measured
    assert len(calls) == 2 and sorted(r["length"] for r in result["rows"]) == [64, 96]
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ValueError, match=r"results\.json holds cells measured with samples=2, not 3; give another --out"):
        evaluate(EvalConfig(**{**cfg, "samples": 3}, lengths="64"))  # other settings: refused, the file kept
    assert len(calls) == 2 and (tmp_path / "results.json").read_text() == before


def test_without_matplotlib_the_tables_are_written_and_the_missing_plot_is_said(tmp_path, monkeypatch, capsys):
    import importlib.util

    import opsdl.eval_synthetic as ev

    real = importlib.util.find_spec
    monkeypatch.setattr(ev.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    evaluate(EvalConfig(model="tiny:llama", tasks="multikey", lengths="64", samples=2, max_new_tokens=3,
                        out=str(tmp_path), device="cpu", short_context_check=False))
    assert (tmp_path / "results.md").exists() and not (tmp_path / "accuracy.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


@pytest.mark.parametrize("change,message", [
    (dict(tasks="multikey,needles"), "--tasks: expected tasks among multikey, multivalue, vartrack, got needles"),
    (dict(lengths="1024,32"), "--lengths: expected lengths >= 64 tokens, got 32"),
    (dict(lengths=" , "), "--lengths: expected a comma-separated list, got ' , '"),
    (dict(samples=0), "--samples: expected an integer >= 1, got 0"),
    (dict(batch_size=0), "--batch-size: expected an integer >= 1, got 0"),
    (dict(max_new_tokens=0), "--max-new-tokens: expected an integer >= 1, got 0"),
    (dict(rope_factor=0.5), "--rope-factor: expected a number >= 1, got 0.5"),
    (dict(device="gpu"), "--device: expected cpu, cuda, cuda:N or auto, got 'gpu'"),
])
def test_bad_options_are_refused_before_any_model(tmp_path, change, message):
    from opsdl.eval import check_eval_options

    cfg = EvalConfig(**{"model": "tiny:llama", "out": str(tmp_path / "e"), **change})
    with pytest.raises(ValueError) as refused:
        check_eval_options(cfg)
    assert str(refused.value) == message
    assert not (tmp_path / "e").exists()


def test_out_that_is_a_file_and_a_missing_model_are_refused_before_the_first_model_runs(tmp_path, monkeypatch):
    from opsdl.eval_answers import Answerer

    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"^--out .*file: expected a folder, got a file$"):
        evaluate(EvalConfig(model="tiny:llama", out=str(tmp_path / "file")))
    monkeypatch.setattr(Answerer, "__init__", lambda *a, **k: pytest.fail("a model was loaded before all were checked"))
    missing = tmp_path / "runs" / "checkpoint-000005"
    with pytest.raises(ValueError, match=rf"^--model {re.escape(str(missing))}: no such model folder"):
        evaluate(EvalConfig(model=f"tiny:llama,{missing}", lengths="64", samples=1, out=str(tmp_path / "e"),
                            device="cpu"))
