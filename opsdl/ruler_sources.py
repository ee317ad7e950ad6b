"""Haystacks, word lists and QA sets for ``opsdl.ruler``, all offline.

- Essays (the NIAH "essay" haystack): RULER reads Paul Graham's essays; the default here is the
  English prose of CPython's ``pydoc_data.topics`` (the Python Language Reference, shipped with
  every CPython), or ``--essays`` (a folder of .txt files, or RULER's ``PaulGrahamEssays.json``).
- Words: wonderwords' adjective, noun and verb lists, read from the installed package's ``assets``.
- QA: a SQuAD v2 dev JSON (qa_1) and a HotpotQA dev-distractor JSON (qa_2), read as RULER's
  ``read_squad`` and ``read_hotpotqa`` do: every distinct paragraph is a document, each question
  keeps the index of its gold document(s) (and, for SQuAD, the other paragraphs of its article).
- Sentences: RULER splits the essay haystack with NLTK's punkt model, which is a download; this
  module splits with a small regular expression instead (see ``split_sentences``).
Nothing here imports torch.
"""
from __future__ import annotations

import functools
import importlib.resources
import json
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class QA:
    query: str
    outputs: tuple[str, ...]
    context: tuple[int, ...]           # the gold documents, indexes into QASet.docs
    more_context: tuple[int, ...] = ()  # SQuAD: the other paragraphs of the same article


@dataclass(frozen=True)
class QASet:
    docs: tuple[str, ...]  # every distinct document, sorted (as RULER sorts them)
    qas: tuple[QA, ...]


@dataclass(frozen=True)
class RulerSources:
    essay_words: tuple[str, ...]
    essay_source: str
    squad: Optional[QASet] = None
    hotpotqa: Optional[QASet] = None
    squad_source: Optional[str] = None
    hotpotqa_source: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# Sentences

# Words after which a period does not end a sentence (a short list: the texts here are English prose).
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "cf", "al", "fig", "vol",
    "inc", "ltd", "corp", "jan", "feb", "apr", "jun", "jul", "aug", "sept", "oct", "nov", "approx", "u.s", "u.k",
})
# End punctuation, any closing quotes or brackets, whitespace, then what can start a sentence: a
# capital or a digit (after an optional opening quote or bracket), an opening quote or bracket, or
# a ">>>" prompt.
_BOUNDARY = re.compile(r"""([.!?]+["'\u201d\u2019)\]]*)\s+(?=["'\u201c\u2018(\[]?[A-Z0-9]|["'\u201c\u2018(\[]\S|>>>)""")


def split_sentences(text: str) -> list[str]:
    """Split English prose into sentences with a regular expression, in place of RULER's NLTK
    punkt model (which would need a download): a sentence ends at ``.``, ``!`` or ``?`` (and any
    closing quotes or brackets) followed by whitespace and a capital letter, a digit, an opening
    quote or bracket, or a ``>>>`` prompt, unless the word before the period is a common abbreviation or a single
    capital initial. The pieces are stripped; on whitespace-collapsed text ``" ".join`` of them
    gives the text back. Like punkt, it does not split before a lowercase word."""
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        end = m.end(1)
        if m.group(1)[0] == ".":
            before = text[start:m.start(1)].split()
            last_word = before[-1].lstrip("\"'(\u201c\u2018[") if before else ""
            if last_word.lower() in _ABBREVIATIONS or re.fullmatch(r"[A-Z]", last_word):
                continue
        piece = text[start:end].strip()
        if piece:
            sentences.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


# ---------------------------------------------------------------------------------------------
# Words

@functools.lru_cache(maxsize=None)
def wonderwords_list(name: str) -> tuple[str, ...]:
    """One of wonderwords' word lists ("nounlist.txt", "adjectivelist.txt", "verblist.txt"), each
    line right-stripped as wonderwords reads it, read from the installed package (no network)."""
    try:
        text = (importlib.resources.files("wonderwords") / "assets" / name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise ValueError("RULER's word lists come from the wonderwords package: `pip install wonderwords`") from None
    return tuple(w.rstrip() for w in text.splitlines() if w.strip())


# ---------------------------------------------------------------------------------------------
# Essays

_ESSAYS_EXPECTED = "a folder of .txt files, a .txt file, or RULER's PaulGrahamEssays.json ({\"text\": ...})"


def _essay_text(path: str) -> tuple[str, str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix == ".txt")
        if not files:
            raise ValueError(f"--essays {path}: expected {_ESSAYS_EXPECTED}, got a folder with no .txt files")
        text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
        return text, f"{len(files)} .txt files in {p}"
    if not p.exists():
        raise ValueError(f"--essays {path}: expected {_ESSAYS_EXPECTED}, got no such file or folder")
    if p.suffix == ".txt":
        return p.read_text(encoding="utf-8", errors="replace"), str(p)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--essays {path}: expected {_ESSAYS_EXPECTED}, got a file that is not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        got = f"keys {sorted(data)[:5]}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"--essays {path}: expected {_ESSAYS_EXPECTED}, got JSON without a \"text\" string ({got})")
    return data["text"], str(p)


def default_essays() -> tuple[str, str]:
    """The Python Language Reference's topics from CPython's ``pydoc_data`` (no download)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ValueError("--essays: expected a folder of .txt files or RULER's PaulGrahamEssays.json; this Python "
                         "has no pydoc_data.topics to use by default") from None
    text = "\n".join(topics[k] for k in sorted(topics))
    return text, f"CPython {platform.python_version()} pydoc_data.topics (Python Language Reference)"


def essay_words(text: str) -> tuple[str, ...]:
    """RULER's essay haystack: the text's words after collapsing whitespace."""
    collapsed = re.sub(r"\s+", " ", text).strip()
    return tuple(collapsed.split(" ")) if collapsed else ()


# ---------------------------------------------------------------------------------------------
# QA sets

def _load_json(path: str, option: str, expected: str):
    p = Path(path)
    if not p.is_file():
        got = "a folder" if p.is_dir() else "no such file"
        raise ValueError(f"{option} {path}: expected {expected}, got {got}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{option} {path}: expected {expected}, got a file that is not JSON ({e})") from None


SQUAD_EXPECTED = "a SQuAD v2 dev JSON (RULER's squad.json: dev-v2.0.json, {\"data\": [{\"paragraphs\": ...}]})"
HOTPOTQA_EXPECTED = ("a HotpotQA dev JSON (RULER's hotpotqa.json: hotpot_dev_distractor_v1.json, "
                     "[{\"question\", \"answer\", \"context\": [[title, sentences]]}])")


def read_squad(path: str) -> QASet:
    """RULER's read_squad: every distinct paragraph is a document (sorted); each answerable
    question has its paragraph as gold and the other paragraphs of its article as more_context."""
    data = _load_json(path, "--squad", SQUAD_EXPECTED)
    try:
        articles = data["data"]
        docs = sorted({p["context"] for d in articles for p in d["paragraphs"]})
        index = {c: i for i, c in enumerate(docs)}
        qas = []
        for d in articles:
            article_docs = [index[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                gold = index[p["context"]]
                for q in p["qas"]:
                    if q.get("is_impossible", False):
                        continue
                    outputs = tuple(a["text"] for a in q["answers"])
                    if not outputs:
                        continue
                    qas.append(QA(q["question"], outputs, (gold,), tuple(i for i in article_docs if i != gold)))
    except (KeyError, TypeError) as e:
        raise ValueError(f"--squad {path}: expected {SQUAD_EXPECTED}, got JSON without the field {e}") from None
    if not qas:
        raise ValueError(f"--squad {path}: expected {SQUAD_EXPECTED}, got no answerable question")
    return QASet(tuple(docs), tuple(qas))


def read_hotpotqa(path: str) -> QASet:
    """RULER's read_hotpotqa: every distinct "title\\nparagraph" is a document (sorted); each
    question's gold documents are all the paragraphs of its context."""
    data = _load_json(path, "--hotpotqa", HOTPOTQA_EXPECTED)
    try:
        def doc(t, p):
            return f"{t}\n{''.join(p)}"
        docs = sorted({doc(t, p) for d in data for t, p in d["context"]})
        index = {c: i for i, c in enumerate(docs)}
        qas = [QA(d["question"], (d["answer"],), tuple(index[doc(t, p)] for t, p in d["context"])) for d in data]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--hotpotqa {path}: expected {HOTPOTQA_EXPECTED}, got JSON that does not match "
                         f"({type(e).__name__}: {e})") from None
    if not qas:
        raise ValueError(f"--hotpotqa {path}: expected {HOTPOTQA_EXPECTED}, got no questions")
    return QASet(tuple(docs), tuple(qas))


def load_sources(essays: Optional[str] = None, squad: Optional[str] = None,
                 hotpotqa: Optional[str] = None) -> RulerSources:
    text, source = _essay_text(essays) if essays is not None else default_essays()
    words = essay_words(text)
    if not words:
        raise ValueError(f"--essays {essays}: expected {_ESSAYS_EXPECTED} with some text, got no words")
    return RulerSources(
        essay_words=words, essay_source=source,
        squad=read_squad(squad) if squad is not None else None,
        hotpotqa=read_hotpotqa(hotpotqa) if hotpotqa is not None else None,
        squad_source=str(Path(squad)) if squad is not None else None,
        hotpotqa_source=str(Path(hotpotqa)) if hotpotqa is not None else None,
    )
