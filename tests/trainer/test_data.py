"""Example validation and the synthetic tasks."""
from __future__ import annotations

import json
import re

import pytest

from opsdl.data import (DataError, Example, answer_found, check_input_file, load_examples, make_examples,
                        write_examples)

GOOD = {"id": "a", "long_context": "x y z. the key is 42. more text.", "short_context": "the key is 42.",
        "question": "What is the key?", "answer": "42"}


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_good_file_loads(tmp_path):
    path = _write(tmp_path, [json.dumps(GOOD), "", json.dumps({**GOOD, "id": 7, "answer": ["4", "2"]})])
    examples = load_examples(path)
    assert [e.id for e in examples] == ["a", "7"] and examples[1].answers() == ["4", "2"]


@pytest.mark.parametrize("line,message", [
    ("{not json", r"data.jsonl:2: not valid JSON"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "question"}), r"data.jsonl:2: field 'question' is missing"),
    (json.dumps({**GOOD, "long_context": "  "}), r"data.jsonl:2: field 'long_context': expected a non-empty string"),
    (json.dumps({**GOOD, "short_context": "not in there"}), r"data.jsonl:2: field 'short_context' does not occur"),
    (json.dumps({**GOOD, "answer": 42}), r"data.jsonl:2: field 'answer'"),
    (json.dumps(GOOD), r"data.jsonl:2: field 'id': 'a' appears twice"),
    ("[1, 2]", r"data.jsonl:2: expected a JSON object"),
])
def test_bad_lines_name_line_and_field(tmp_path, line, message):
    path = _write(tmp_path, [json.dumps(GOOD), line])
    with pytest.raises(DataError, match=message):
        load_examples(path)


def test_noncontiguous_opt_out_and_empty_file(tmp_path):
    path = _write(tmp_path, [json.dumps({**GOOD, "short_context": "elsewhere"})])
    assert load_examples(path, allow_noncontiguous=True)[0].short_context == "elsewhere"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        load_examples(empty)


def _count_words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("task", ["multikey", "multivalue", "vartrack"])
def test_synthetic_tasks_are_deterministic_contiguous_and_sized(task, tmp_path):
    a = make_examples(task, 5, 400, _count_words, seed=3)
    b = make_examples(task, 5, 400, _count_words, seed=3)
    c = make_examples(task, 5, 400, _count_words, seed=4)
    assert a == b and a != c
    for ex in a:
        assert ex.short_context in ex.long_context
        assert all(ans in ex.short_context for ans in ex.answers())
        assert 400 <= _count_words(ex.long_context) <= 460
        assert len(ex.short_context) < len(ex.long_context) / 5
    path = tmp_path / "syn.jsonl"
    write_examples(a, path)
    assert load_examples(path) == a


def test_filler_is_varied_not_one_repeated_sentence():
    text = make_examples("multikey", 1, 2000, _count_words, seed=0)[0].long_context
    sentences = [s for s in text.replace("\n\n", " ").split(". ") if s]
    assert len(set(sentences)) > 0.8 * len(sentences)


def test_multikey_distractors_are_present():
    ex = make_examples("multikey", 1, 300, _count_words, seed=1, num_keys=4)[0]
    assert ex.long_context.count("special magic numbers for") == 4
    assert ex.short_context.count("special magic numbers for") == 1


def test_answer_found():
    assert answer_found("it is 42 and 7", ["42", "7"]) is True
    assert answer_found("it is 42", ["42", "7"]) is False
    assert answer_found("anything", []) is None
    assert Example("i", "l", "l", "q").answers() == []


def test_a_missing_or_wrong_file_names_the_option(tmp_path):
    missing = tmp_path / "nonexistent.jsonl"
    with pytest.raises(DataError, match=rf"^--data {re.escape(str(missing))}: no such file$"):
        load_examples(missing)
    with pytest.raises(DataError, match=rf"^--data {re.escape(str(tmp_path))}: expected a file, got a folder$"):
        load_examples(tmp_path)
    with pytest.raises(DataError, match=rf"^--eval-data {re.escape(str(missing))}: no such file$"):
        load_examples(missing, option="--eval-data")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"^--data .*empty.jsonl: no examples \(the file is empty\)$"):
        load_examples(tmp_path / "empty.jsonl")
    assert check_input_file("--template", tmp_path / "empty.jsonl") == tmp_path / "empty.jsonl"
