"""Training examples: the JSONL schema, its validation, and synthetic long-context tasks.

One example per line: ``{"id", "long_context", "short_context", "question"}`` and an optional
``"answer"`` (a string or a list of strings, used for evaluation and the drift signal only).
``short_context`` is the paper's C_S, a contiguous segment of the long context C_L holding the
evidence; validation checks that it occurs in ``long_context`` unless ``allow_noncontiguous``.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from .files import write_atomic

Answer = Union[str, list[str], None]
REQUIRED_FIELDS = ("id", "long_context", "short_context", "question")


class DataError(ValueError):
    """Bad training data; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Example:
    id: str
    long_context: str
    short_context: str
    question: str
    answer: Answer = None

    def answers(self) -> list[str]:
        if self.answer is None:
            return []
        return [self.answer] if isinstance(self.answer, str) else list(self.answer)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, ensure_ascii=False)


def validate(record: object, where: str, allow_noncontiguous: bool = False) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in record:
            raise DataError(f"{where}: field '{field}' is missing (required: {', '.join(REQUIRED_FIELDS)})")
        value = record[field]
        if field == "id" and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field '{field}': expected a non-empty string, got {value!r:.80}")
    answer = record.get("answer")
    if answer is not None and not (isinstance(answer, str) or (
            isinstance(answer, list) and answer and all(isinstance(a, str) and a for a in answer))):
        raise DataError(f"{where}: field 'answer': expected a string or a non-empty list of strings, got {answer!r:.80}")
    if not allow_noncontiguous and record["short_context"] not in record["long_context"]:
        raise DataError(f"{where}: field 'short_context' does not occur in 'long_context' (C_S must be a "
                        "contiguous segment of C_L; pass allow_noncontiguous / --allow-noncontiguous to opt out)")
    return Example(str(record["id"]), record["long_context"], record["short_context"], record["question"], answer)


def read_jsonl(path: Path) -> Iterator[tuple[int, str, object]]:
    """(line number, ``file:line``, parsed object) for each non-blank line; bad JSON names its line."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield lineno, where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def check_input_file(option: str, path: Union[str, Path]) -> Path:
    """An input file that must exist: the refusal names the option and the path
    (``--data runs/x.jsonl: no such file``). Touches nothing but the file system."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{option} {path}: expected a file, got a folder")
    if not path.is_file():
        raise DataError(f"{option} {path}: {'no such file' if not path.exists() else 'not a regular file'}")
    return path


def load_examples(path: Union[str, Path], allow_noncontiguous: bool = False, option: str = "--data") -> list[Example]:
    """The examples of a training JSONL; ``option`` is the flag that named the file, for the errors."""
    path = check_input_file(option, path)
    examples, seen = [], set()
    for _, where, record in read_jsonl(path):
        example = validate(record, where, allow_noncontiguous)
        if example.id in seen:
            raise DataError(f"{where}: field 'id': {example.id!r} appears twice")
        seen.add(example.id)
        examples.append(example)
    if not examples:
        raise DataError(f"{option} {path}: no examples (the file is empty)")
    return examples


def write_examples(examples: Sequence[Example], path: Union[str, Path]) -> None:
    write_atomic(Path(path), "".join(e.to_json() + "\n" for e in examples))


# --------------------------------------------------------------------------------------------
# Synthetic tasks (RULER-style): needles and variable chains in varied filler made here.
# --------------------------------------------------------------------------------------------

_SUBJECTS = ["The committee", "A young engineer", "The old lighthouse keeper", "Our neighbour", "The museum guide",
             "A travelling botanist", "The night-shift nurse", "The orchestra", "A retired sailor", "The baker",
             "The city council", "A curious student", "The river ferry", "The village doctor", "A quiet librarian",
             "The mountain rescue team", "The apprentice carpenter", "A wandering photographer", "The school choir",
             "The farmer next door", "A visiting professor", "The harbour master", "The tram driver", "Grandmother"]
_VERBS = ["repaired", "described", "painted", "measured", "questioned", "celebrated", "carried", "studied",
          "ignored", "rebuilt", "photographed", "organised", "discovered", "counted", "polished", "visited",
          "borrowed", "explained", "sketched", "rearranged"]
_OBJECTS = ["the broken clock tower", "an old map of the coast", "a basket of autumn apples", "the stone bridge",
            "the winter schedule", "a box of forgotten letters", "the garden wall", "a faded photograph",
            "the copper kettle", "a stack of weather reports", "the wooden canoe", "the festival banners",
            "a jar of wild honey", "the railway timetable", "an unfinished quilt", "the lantern by the gate",
            "a crate of seedlings", "the chapel organ", "the fishing nets", "a notebook of bird songs"]
_TAILS = ["before the first snow arrived", "while the market was closing", "during a long rainy afternoon",
          "as the tide went out", "without telling anyone", "after a heated debate", "with surprising care",
          "under the flickering street lamps", "on the morning of the fair", "for the third time that year",
          "while humming an old tune", "in front of a small crowd", "despite the strong wind",
          "just after sunrise", "with the help of two volunteers", "near the edge of the forest"]
_REMARKS = ["Nobody could remember when it had last happened.", "It was, by all accounts, an ordinary week.",
            "Some people found this more interesting than others.", "The weather stayed mild for days.",
            "Later that evening the streets were quiet again.", "Everyone agreed it could have gone worse.",
            "A few visitors stopped to watch.", "The local paper mentioned it briefly.",
            "Children kept asking questions about it.", "It became the topic of many conversations."]
_KEY_WORDS = ["amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
              "kestrel", "lantern", "maple", "nimbus", "onyx", "pepper", "quartz", "raven", "saffron", "tundra",
              "umber", "violet", "willow", "zephyr"]
_VAR_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _filler_sentence(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return rng.choice(_REMARKS)
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."


def _key(rng: random.Random, used: set) -> str:
    while True:
        key = f"{rng.choice(_KEY_WORDS)}-{rng.choice(_KEY_WORDS)}"
        if key not in used:
            used.add(key)
            return key


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _document(rng: random.Random, count_tokens: Callable[[str], int], target_tokens: int,
              evidence: list[str], distractors: list[str]) -> tuple[str, str]:
    """Filler of about ``target_tokens`` with the evidence sentences placed together (one filler
    sentence between each) at a random depth and distractors scattered elsewhere. Returns
    (long_context, short_context), short_context being the evidence with one sentence either side."""
    budget = target_tokens - sum(count_tokens(s) for s in evidence + distractors)
    sentences: list[str] = []
    while budget > 0 or len(sentences) < 3:  # at least a sentence on each side of the evidence
        sentence = _filler_sentence(rng)
        sentences.append(sentence)
        budget -= count_tokens(" " + sentence)
    for d in distractors:
        sentences.insert(rng.randrange(len(sentences) + 1), d)
    block = []
    for i, e in enumerate(evidence):
        block += [e] if i == len(evidence) - 1 else [e, _filler_sentence(rng)]
    at = rng.randrange(1, len(sentences))
    units = sentences[:at] + block + sentences[at:]
    lo, hi = at - 1, at + len(block)  # one sentence of context either side
    # paragraphs every 4-7 sentences, never inside the evidence window
    text, spans = "", []
    next_break = rng.randint(4, 7)
    for i, unit in enumerate(units):
        if i:
            breakable = i >= next_break and not (lo < i <= hi)
            text += "\n\n" if breakable else " "
            if breakable:
                next_break = i + rng.randint(4, 7)
        spans.append((len(text), len(text) + len(unit)))
        text += unit
    return text, text[spans[lo][0]:spans[hi][1]]


def make_examples(task: str, count: int, context_tokens: int, count_tokens: Callable[[str], int],
                  seed: int, num_keys: int = 4, split: str = "train") -> list[Example]:
    """Synthetic examples: ``multikey`` (one value per key, ask one key among ``num_keys``),
    ``multivalue`` (one key with three values, distractor keys elsewhere), ``vartrack`` (a chain of
    variable assignments, a distractor chain elsewhere). Same seed, same examples on any machine;
    each ``split`` ("train", "eval") draws from its own seed space, so they never share an example."""
    makers = {"multikey": _multikey, "multivalue": _multivalue, "vartrack": _vartrack}
    if task not in makers:
        raise ValueError(f"task: expected one of {sorted(makers)}, got {task!r}")
    if context_tokens < 64:
        raise ValueError(f"context_tokens: expected at least 64, got {context_tokens}")
    examples = []
    for i in range(count):
        rng = random.Random(f"{split}:{task}:{seed}:{i}")
        long_ctx, short_ctx, question, answer = makers[task](rng, count_tokens, context_tokens, num_keys)
        examples.append(Example(f"{split}-{task}-{seed}-{i}", long_ctx, short_ctx, question, answer))
    return examples


def _multikey(rng, count_tokens, tokens, num_keys):
    used: set = set()
    keys = [_key(rng, used) for _ in range(num_keys)]
    values = [_number(rng) for _ in keys]
    asked = rng.randrange(num_keys)
    needles = [_needle(k, v) for k, v in zip(keys, values)]
    long_ctx, short_ctx = _document(rng, count_tokens, tokens, [needles[asked]],
                                    needles[:asked] + needles[asked + 1:])
    question = (f"What is the special magic number for {keys[asked]} mentioned in the provided text? "
                "Answer with the number only.")
    return long_ctx, short_ctx, question, values[asked]


def _multivalue(rng, count_tokens, tokens, num_keys):
    used: set = set()
    key = _key(rng, used)
    values = [_number(rng) for _ in range(3)]
    others = [_needle(_key(rng, used), _number(rng)) for _ in range(max(0, num_keys - 1))]
    long_ctx, short_ctx = _document(rng, count_tokens, tokens, [_needle(key, v) for v in values], others)
    question = (f"What are all the special magic numbers for {key} mentioned in the provided text? "
                "List every one of them.")
    return long_ctx, short_ctx, question, values


def _variable(rng: random.Random, used: set) -> str:
    while True:
        name = "".join(rng.choice(_VAR_LETTERS) for _ in range(5))
        if name not in used:
            used.add(name)
            return name


def _vartrack(rng, count_tokens, tokens, num_keys):
    used: set = set()
    value, other_value = _number(rng)[:5], _number(rng)[:5]
    chain = [_variable(rng, used) for _ in range(4)]
    statements = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
    decoy = [_variable(rng, used) for _ in range(2)]
    decoys = [f"VAR {decoy[0]} = {other_value}.", f"VAR {decoy[1]} = VAR {decoy[0]}."]
    long_ctx, short_ctx = _document(rng, count_tokens, tokens, statements, decoys)
    question = f"Which variables are assigned the value {value}? List all of them."
    return long_ctx, short_ctx, question, chain


def answer_found(text: str, answers: Sequence[str]) -> Optional[bool]:
    """Whether every expected answer string occurs in ``text``; None when there are none."""
    return all(a in text for a in answers) if answers else None
