"""opsdl prepare: documents -> (C_L, C_S, Q) triplets in the training format."""
from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from opsdl.data import DataError, load_examples
from opsdl.prepare import (PrepareConfig, check_prepare_options, filter_questions, parse_questions, pick_segments,
                           prepare, pydoc_documents, read_documents, sentence_spans)
from opsdl.rollout import Rollout


def _words(text: str) -> int:
    return len(text.split())


def test_segments_are_whole_sentences_seeded_and_disjoint():
    text = pydoc_documents(["textwrap"])[0].text
    a = pick_segments(text, 60, 3, _words, random.Random(1))
    assert a == pick_segments(text, 60, 3, _words, random.Random(1)) and len(a) == 3
    assert a != pick_segments(text, 60, 3, _words, random.Random(2))
    ends = {e for _, e in sentence_spans(text)}
    starts = {s for s, _ in sentence_spans(text)}
    for (s, e), (s2, _) in zip(a, a[1:] + [(len(text) + 1, 0)]):
        assert s in starts and e in ends and e <= s2 and 30 <= _words(text[s:e]) <= 160


def test_question_parsing_and_filters_on_hand_written_outputs():
    out = "1. What does dedent remove?\n- What does dedent remove?\n2) Tell me about it.\n\n" \
          "Q: Why is the sky blue today in Paris?\n3. What is the width argument of wrap used for, and " + \
          "how " * 60 + "?\n4. ?\n5. How does fill differ from wrap?"
    candidates = parse_questions(out)
    assert candidates[0] == "What does dedent remove?" and candidates[2] == "Tell me about it."
    dropped: Counter = Counter()
    segment = "textwrap.dedent(text) removes common leading whitespace. fill() wraps and joins; wrap() returns lines."
    kept = filter_questions(candidates, segment, set(), 48, _words, dropped)
    assert kept == ["What does dedent remove?", "How does fill differ from wrap?"]
    assert dropped == Counter({"duplicate": 1, "not a question": 1, "nothing from the segment": 1,
                               "too long": 1, "empty": 1})


def test_bad_documents_name_file_and_line(tmp_path):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(DataError, match=r"docs.jsonl:2: field 'text'"):
        read_documents(bad)
    bad.write_text('{"text": "fine"}\n\n{"text": "   "}\n')
    with pytest.raises(DataError, match=r"docs.jsonl:3: field 'text': the document is empty"):
        read_documents(bad)
    bad.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(DataError, match=r"docs.jsonl:2: not valid JSON"):
        read_documents(bad)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.md").write_text("")
    with pytest.raises(DataError, match=r"a.md: the document is empty"):
        read_documents(folder)
    with pytest.raises(DataError, match=r"^--docs .*empty_folder: expected a folder with .txt or .md files"):
        (tmp_path / "empty_folder").mkdir()
        read_documents(tmp_path / "empty_folder")
    with pytest.raises(DataError, match=r"^--docs .*missing.jsonl: no such file or folder$"):
        read_documents(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="pydoc"):
        pydoc_documents(["no_such_module_here"])


class EchoModel:
    """Stands in for the question writer (hand-written outputs): asks about words of the segment."""

    def __init__(self, fail_after: int = 10**9):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, model, tokenizer, prompts, **kwargs):
        self.calls += 1
        if self.calls > self.fail_after:
            raise KeyboardInterrupt("killed")
        out = []
        for p in prompts:
            passage = tokenizer.decode(p).split("Passage:")[-1]
            words = re.findall(r"[A-Za-z]{5,}", passage)
            text = f"1. What is {words[0]}?\n2. What is {words[1]}?\n3. Nonsense\n"
            out.append(Rollout(0, tokenizer(text, add_special_tokens=False).input_ids, False))
        return out


CONFIG = dict(pydoc="json,textwrap,heapq", model="tiny:llama", context_tokens=3000, segment_tokens=80,
              segments_per_doc=2, questions_per_segment=2, device="cpu", max_new_tokens=8)


def test_output_is_training_data_with_true_offsets(tmp_path, monkeypatch):
    monkeypatch.setattr("opsdl.rollout.sample", EchoModel())
    out = tmp_path / "t.jsonl"
    stats = prepare(PrepareConfig(**CONFIG, out=str(out)))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats.kept == len(records) > 0 and stats.dropped["not a question"] > 0
    for r in records:
        assert r["long_context"][r["source"]["start"]:r["source"]["end"]] == r["short_context"]
    assert len(load_examples(out)) == len(records)  # exactly what `opsdl train --data` reads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]  # the progress file went, nothing else is left


def test_resume_after_interruption_neither_redoes_nor_duplicates(tmp_path, monkeypatch):
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    uninterrupted = EchoModel()
    monkeypatch.setattr("opsdl.rollout.sample", uninterrupted)
    prepare(PrepareConfig(**CONFIG, out=str(whole)))
    killer = EchoModel(fail_after=1)
    monkeypatch.setattr("opsdl.rollout.sample", killer)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareConfig(**CONFIG, out=str(resumed)))
    assert (tmp_path / "resumed.jsonl.progress.json").exists()  # interrupted: kept for the resume
    with resumed.open("a") as f:
        f.write('{"id": "half-written')  # a line cut short by the kill
    again = EchoModel()
    monkeypatch.setattr("opsdl.rollout.sample", again)
    prepare(PrepareConfig(**CONFIG, out=str(resumed)))
    assert resumed.read_text() == whole.read_text()
    # one generate call per document group here: the group finished before the kill is not redone
    assert uninterrupted.calls == 2 and again.calls == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed.jsonl", "whole.jsonl"]  # both completed
    # a completed output is not appended to: refused before anything loads, then --overwrite starts over
    with pytest.raises(DataError, match=r"--out .*whole.jsonl: exists and has no progress file \(a finished run\); "
                                        "pass --overwrite"):
        prepare(PrepareConfig(**CONFIG, out=str(whole)))
    assert again.calls == 1
    prepare(PrepareConfig(**CONFIG, out=str(whole), overwrite=True))
    assert whole.read_text() == resumed.read_text() and again.calls == 3


def test_a_run_killed_in_its_first_group_or_before_its_last_unlink_resumes(tmp_path, monkeypatch):
    out, whole = tmp_path / "t.jsonl", tmp_path / "whole.jsonl"
    monkeypatch.setattr("opsdl.rollout.sample", EchoModel())
    prepare(PrepareConfig(**CONFIG, out=str(whole)))
    monkeypatch.setattr("opsdl.rollout.sample", EchoModel(fail_after=0))
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareConfig(**CONFIG, out=str(out)))
    assert out.read_text() == "" and (tmp_path / "t.jsonl.progress.json").exists()
    # killed after the last group was written but before its progress file was removed
    monkeypatch.setattr("opsdl.prepare._finish", lambda out: None)
    monkeypatch.setattr("opsdl.rollout.sample", EchoModel())
    prepare(PrepareConfig(**CONFIG, out=str(out)))
    assert (tmp_path / "t.jsonl.progress.json").exists()
    monkeypatch.undo()
    nothing_left = EchoModel()
    monkeypatch.setattr("opsdl.rollout.sample", nothing_left)
    prepare(PrepareConfig(**CONFIG, out=str(out)))
    assert nothing_left.calls == 0 and out.read_text() == whole.read_text()
    assert not (tmp_path / "t.jsonl.progress.json").exists()


@pytest.mark.parametrize("change,message", [
    (dict(pydoc=None), r"give exactly one of --docs PATH and --pydoc MODULES \(got neither\)"),
    (dict(docs="x.jsonl"), r"exactly one .*\(got both: --docs x.jsonl --pydoc json\)"),
    (dict(pydoc=None, docs="{tmp}/missing.jsonl"), r"^--docs .*missing.jsonl: no such file or folder$"),
    (dict(pydoc=" , "), r"^--pydoc: expected comma-separated module names, got ' , '$"),
    (dict(segment_tokens=0), r"^--segment-tokens: expected an integer >= 1, got 0$"),
    (dict(temperature=-1.0), r"^--temperature: expected a number >= 0 \(0: greedy\), got -1.0$"),
    (dict(device="gpu"), r"^--device: expected cpu, cuda, cuda:N or auto, got 'gpu'$"),
    (dict(template="{tmp}/missing.txt"), r"^--template .*missing.txt: no such file$"),
    (dict(template="{tmp}"), r"^--template .*: expected a file, got a folder$"),
    (dict(template="{tmp}/t.txt"), r"^--template .*t.txt: expected a \{segment\} placeholder, got none$"),
    (dict(template="{tmp}/braces.txt"), r"^--template .*braces.txt: expected only the \{n\} and \{segment\} "
                                        r"placeholders .*KeyError: 'topic'$"),
    (dict(out="{tmp}"), r"^--out .*: expected a JSONL file path, got a folder$"),
    (dict(out="{tmp}/done.jsonl"), r"^--out .*done.jsonl: exists and has no progress file"),
])
def test_bad_options_name_the_option_before_anything_loads(tmp_path, change, message):
    (tmp_path / "t.txt").write_text("Write {n} questions.")
    (tmp_path / "braces.txt").write_text("About {topic}: {segment}")
    (tmp_path / "done.jsonl").write_text('{"id": "a"}\n')
    change = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in change.items()}
    cfg = PrepareConfig(**{"pydoc": "json", "out": str(tmp_path / "new.jsonl"), **change})
    with pytest.raises(DataError, match=message):
        check_prepare_options(cfg)
    with pytest.raises(DataError, match=message):  # prepare itself checks first, before torch is used
        prepare(cfg)
    assert not (tmp_path / "new.jsonl").exists()


def test_a_good_template_and_an_empty_out_pass(tmp_path):
    (tmp_path / "t.txt").write_text("Write {n} questions about:\n{segment}")
    (tmp_path / "empty.jsonl").write_text("")  # a run killed before its first group: nothing to lose
    check_prepare_options(PrepareConfig(pydoc="json", template=str(tmp_path / "t.txt"),
                                        out=str(tmp_path / "empty.jsonl")))


def test_tiny_model_generation_plumbing_and_determinism(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        stats = prepare(PrepareConfig(**{**CONFIG, "pydoc": "textwrap", "max_new_tokens": 12}, out=str(out)))
        runs.append((stats.as_dict(), out.read_text()))
    assert runs[0] == runs[1] and runs[0][0]["segments"] == 2


def test_smollm2_writes_questions_about_stdlib_docs(tmp_path):
    out = tmp_path / "q.jsonl"
    stats = prepare(PrepareConfig(pydoc="textwrap", out=str(out), context_tokens=2000, segment_tokens=120,
                                  segments_per_doc=1, questions_per_segment=3, max_new_tokens=80, device="cpu"))
    assert stats.segments == 1 and stats.generated > 0
    assert stats.kept + sum(stats.dropped.values()) >= stats.generated
