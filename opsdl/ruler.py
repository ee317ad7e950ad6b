"""RULER's 13 synthetic long-context tasks (Hsieh et al., 2024; github.com/NVIDIA/RULER), generated
offline and scored as RULER scores them.

The tasks, their arguments (RULER's ``scripts/synthetic.yaml``), templates, answer prefixes and
answer budgets (``scripts/data/synthetic/constants.py``) and scoring (``scripts/eval``):

- niah_*: needles "One of the special magic {numbers|uuids} for {key} is: {value}." in an essay,
  a repeated noise paragraph, or other needles; answers every value of the queried key(s).
- vt: a chain of 5 variables ("VAR X = 12345", "VAR Y = VAR X ", ...) in the noise paragraph,
  after one worked example; answers the 5 names.
- cwe: a numbered list of words in which 10 repeat most; answers those 10 (after one worked example).
- fwe: coded words drawn with Zipf counts; answers the 3 most frequent after the noise word '...'.
- qa_1, qa_2: a SQuAD or HotpotQA question among its gold documents and distractors.
- scoring: string_match_all (the share of expected answers found in the prediction,
  case-insensitive) for NIAH, VT, CWE and FWE; string_match_part (1 if any is found) for QA.

Each sample is drawn from its own ``random.Random``, seeded by (task, seed, index) and, for CWE, by
which of RULER's two forms the length selects (below 4096 tokens or not): its keys, values, depths,
insertion points (as fractions of the haystack) and distractors are drawn before its haystack size
n is chosen, so a sample grows monotonically with n, sample i asks the same question at every
length, and the largest n whose prompt (with the caller's chat template and the answer prefix) plus
the answer budget fits the requested length is found by search, as RULER does. The departures from
RULER are noted where they are made (sentences split by a regular expression in place of NLTK
punkt; the default essay text; per-sample in place of fixed-seed shuffles; a search per sample).
Nothing here imports torch.
"""
from __future__ import annotations

import math
import random
import re
import string
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .ruler_sources import (HOTPOTQA_EXPECTED, QASet, RulerSources, SQUAD_EXPECTED, load_sources,
                            split_sentences, wonderwords_list)

__all__ = ["RULER_TASKS", "QA_TASKS", "QA_OPTIONS", "RulerSample", "RulerSources", "answer_budget",
           "check_ruler_options", "load_sources", "make_samples", "minimum_length", "score", "postprocess_pred",
           "too_short_error"]

CountTokens = Callable[[str, str], int]

RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2")
QA_TASKS = ("qa_1", "qa_2")
QA_OPTIONS = {"qa_1": "--squad", "qa_2": "--hotpotqa"}  # the option that gives each QA task its file

# RULER's scripts/data/synthetic/constants.py: template, answer prefix, tokens to generate.
_NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                  "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                  "{type_needle_v} for {query} mentioned in the provided text?")
_NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
_VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
                "Question: Find all variables that are assigned the value {query} in the text above.")
_VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
              "assigned the value {query}, they are: ")
_CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                 "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
                 "list?")
_CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
_FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                 "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                 "the dots '....'. What are the three most frequently appeared words in the above coded text?")
_FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
_QA_TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do not output any "
                "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
                "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}")
_QA_PREFIX = " Answer:"
_QA_DOCUMENT = "Document {i}:\n{document}"

_BUDGET = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}

_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# np.round(np.linspace(0, 100, num=40)).astype(int): no value is a tie, so Python's round agrees.
DEPTHS = tuple(int(round(100 * i / 39)) for i in range(40))


@dataclass(frozen=True)
class _Niah:
    haystack: str  # essay, noise or needle
    type_k: str    # words or uuids
    type_v: str    # numbers or uuids
    num_k: int
    num_v: int
    num_q: int


# RULER's scripts/synthetic.yaml
_NIAH = {
    "niah_single_1": _Niah("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": _Niah("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": _Niah("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": _Niah("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": _Niah("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": _Niah("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": _Niah("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": _Niah("essay", "words", "numbers", 1, 1, 4),
}
_VT_HOPS, _VT_CHAINS = 4, 1
_VT_ICL_TOKENS = 500  # RULER builds its in-context example with max_seq_length=500
_CWE_NUM = 10
_FWE_ALPHA, _FWE_WORDLEN = 2.0, 6


def _family(task: str) -> str:
    if task in _NIAH:
        return "niah"
    if task in QA_TASKS:
        return "qa"
    if task in ("vt", "cwe", "fwe"):
        return task
    raise ValueError(f"--tasks: expected tasks among {', '.join(RULER_TASKS)}, got {task}")


def answer_budget(task: str) -> int:
    """RULER's tokens_to_generate for the task."""
    return _BUDGET[_family(task)]


@dataclass(frozen=True)
class RulerSample:
    task: str
    index: int
    prompt: str                       # the user turn: template with context and query (VT/CWE worked example first)
    answer_prefix: str                # RULER's answer prefix, to append after the chat template's assistant header
    answers: tuple[str, ...]
    evidence_prompt: Optional[str]    # the same with only the evidence as context; None for CWE and FWE
    max_new_tokens: int
    depths: tuple[float, ...]         # NIAH/VT: each needle/statement's place in the haystack, in %;
                                      # QA: each gold document's first place among the documents, in %
    length: int                       # count_tokens(prompt, answer_prefix) + max_new_tokens


@dataclass(frozen=True)
class _Rendered:
    prompt: str
    answer_prefix: str
    answers: tuple[str, ...]
    evidence_prompt: Optional[str]
    depths: tuple[float, ...]


class _TooLong(Exception):
    """A haystack size beyond what the task's sources can give (CWE: more distinct words than the lists hold)."""


# ---------------------------------------------------------------------------------------------
# Scoring (RULER's scripts/eval)

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(prediction: str) -> str:
    """RULER's postprocess_pred: strip, turn control characters into newlines, strip again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def score(task: str, prediction: str, answers: Sequence[str]) -> float:
    """One sample's score in [0, 1]: RULER's string_match_part for QA (1 if any expected answer
    occurs in the prediction, case-insensitive), string_match_all otherwise (the share that occur)."""
    family = _family(task)
    if not answers:
        raise ValueError(f"{task}: expected at least one reference answer, got none")
    pred = postprocess_pred(prediction).lower()
    found = [a.lower() in pred for a in answers]
    return float(any(found)) if family == "qa" else sum(found) / len(found)


# ---------------------------------------------------------------------------------------------
# Options

def check_ruler_options(tasks: list[str], essays: Optional[str], squad: Optional[str], hotpotqa: Optional[str],
                        explicit_tasks: bool) -> list[str]:
    """Refuse, without torch, what ``make_samples`` would refuse later: unknown tasks, missing
    files, and a QA task asked for by name without its file. Returns the tasks that will run (in
    the order given, once each): with ``explicit_tasks=False`` (the default list) QA tasks whose
    file is not given are left out (the caller reports them as not run)."""
    unknown = [t for t in tasks if t not in RULER_TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks: expected tasks among {', '.join(RULER_TASKS)}, got {', '.join(unknown) or 'none'}")
    if essays is not None and not Path(essays).exists():
        raise ValueError(f"--essays {essays}: expected a folder of .txt files or RULER's PaulGrahamEssays.json, "
                         "got no such file or folder")
    files = {"qa_1": ("--squad", squad, SQUAD_EXPECTED), "qa_2": ("--hotpotqa", hotpotqa, HOTPOTQA_EXPECTED)}
    for option, path, expected in files.values():
        if path is not None and not Path(path).is_file():
            got = "a folder" if Path(path).is_dir() else "no such file"
            raise ValueError(f"{option} {path}: expected {expected}, got {got}")
    run = []
    for task in dict.fromkeys(tasks):
        if task in files and files[task][1] is None:
            option, _, expected = files[task]
            if explicit_tasks:
                raise ValueError(f"{option}: {task} needs {expected}; got no {option} file")
            continue
        run.append(task)
    return run


# ---------------------------------------------------------------------------------------------
# Shared pieces

def _sample_rng(task: str, length: int, seed: int, index: int) -> random.Random:
    """Sample ``index``'s generator. The requested length enters only where it changes what is
    drawn (CWE's two forms, below and from 4096 tokens): every other draw is a prefix-consistent
    sequence, so sample i has the same keys, values, depths, chain, words or question at every
    length (only the haystack size differs), and minimum_length measures the very samples that
    make_samples builds."""
    form = ("short" if length < 4096 else "long") if task == "cwe" else ""
    # A str seed is hashed with SHA-512 by random.seed: the same draws in every process.
    return random.Random(f"opsdl.ruler/{task}/{form}/{seed}/{index}")


def _insert_lines(lines: list[str], needles: list[str], fractions: list[float]) -> tuple[list[str], list[float]]:
    """Needles (in order) before lines int(f * n) for the sorted fractions f, as RULER inserts
    them at random line positions; returns the lines and each needle's place in % of the haystack."""
    n = len(lines)
    positions = [int(f * n) for f in fractions]
    out, j = [], 0
    for i, line in enumerate(lines):
        while j < len(needles) and positions[j] == i:
            out.append(needles[j])
            j += 1
        out.append(line)
    out.extend(needles[j:])
    return out, [100.0 * p / n if n else 0.0 for p in positions]


def _random_name(rng: random.Random, k: int) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=k))


def _distinct(draw: Callable[[], str], count: int) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        item = draw()
        if item not in out:
            out.append(item)
    return out


class _LazyDraws:
    """An endless sequence from its own generator, extended on demand: the first n items are the
    same whatever n is asked for later."""

    def __init__(self, draw: Callable[[random.Random], str], rng: random.Random):
        self._draw, self._rng, self.items = draw, rng, []

    def first(self, n: int) -> list[str]:
        while len(self.items) < n:
            self.items.append(self._draw(self._rng))
        return self.items[:n]


# ---------------------------------------------------------------------------------------------
# NIAH (RULER's niah.py)

_ADJECTIVES_NOUNS: Optional[tuple[tuple[str, ...], tuple[str, ...]]] = None


def _adjectives_nouns() -> tuple[tuple[str, ...], tuple[str, ...]]:
    global _ADJECTIVES_NOUNS
    if _ADJECTIVES_NOUNS is None:
        _ADJECTIVES_NOUNS = (tuple(sorted(set(wonderwords_list("adjectivelist.txt")))),
                             tuple(sorted(set(wonderwords_list("nounlist.txt")))))
    return _ADJECTIVES_NOUNS


def _niah_random(rng: random.Random, kind: str) -> str:
    if kind == "numbers":  # 7 digits
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    # RULER draws uniformly from the sorted set of every "adjective-noun"; drawing the adjective and
    # the noun uniformly is the same distribution up to the rare pairs that coincide.
    adjectives, nouns = _adjectives_nouns()
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


def _niah(task: str, length: int, rng: random.Random, sources: RulerSources, shared: dict):
    cfg = _NIAH[task]
    num_k = max(cfg.num_k, cfg.num_q)
    # Distinct keys (RULER does not check; a repeated key would make the expected answers ambiguous).
    keys = _distinct(lambda: _niah_random(rng, cfg.type_k), num_k)
    values = [[_niah_random(rng, cfg.type_v) for _ in range(cfg.num_v)] for _ in keys]
    needles = [_NEEDLE.format(type_needle_v=cfg.type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)  # RULER shuffles with a fixed seed; here with the sample's generator
    queried = rng.sample(range(num_k), cfg.num_q)
    queries = [keys[i] for i in queried]
    answers = tuple(v for i in queried for v in values[i])
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]

    template, prefix, type_v = _NIAH_TEMPLATE, _NIAH_PREFIX, cfg.type_v
    if cfg.num_q * cfg.num_v == 1:  # RULER's rewrite to the singular, on the template and the answer prefix
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(old, new), prefix.replace(old, new)
        type_v = type_v[:-1]
    answer_prefix = prefix.format(type_needle_v=type_v, query=query)

    def prompt(context: str) -> str:
        return template.format(type_needle_v=type_v, context=context, query=query)

    if cfg.haystack == "essay":
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        words = sources.essay_words
        evidence = prompt(" ".join(needles))

        def render(n: int) -> _Rendered:
            text = " ".join(words[i % len(words)] for i in range(n)) if n > len(words) else " ".join(words[:n])
            sentences = split_sentences(text)
            cuts = [int(len(sentences) * (d / 100)) for d in depths]
            bounds = [0] + cuts + [len(sentences)]
            parts = []
            for i in range(1, len(bounds)):  # RULER's join, empty pieces (depth 0 or 100) included
                parts.append(" ".join(sentences[bounds[i - 1]:bounds[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            landed = tuple(100.0 * c / len(sentences) if sentences else 0.0 for c in cuts)
            return _Rendered(prompt(" ".join(parts)), answer_prefix, answers, evidence, landed)
    else:
        fractions = sorted(rng.random() for _ in needles)
        evidence = prompt("\n".join(needles))
        if cfg.haystack == "needle":
            real_keys = set(keys)

            def distractor(r: random.Random) -> str:
                # A distractor never carries a real key (RULER does not check; a clash is ~impossible with
                # its key spaces but would make the answer ambiguous).
                key = _niah_random(r, cfg.type_k)
                while key in real_keys:
                    key = _niah_random(r, cfg.type_k)
                return _NEEDLE.format(type_needle_v=cfg.type_v, key=key, value=_niah_random(r, cfg.type_v))

            distractors = _LazyDraws(distractor, random.Random(rng.getrandbits(64)))
            haystack = distractors.first
        else:
            def haystack(n: int) -> list[str]:
                return [_NOISE] * n

        def render(n: int) -> _Rendered:
            lines, landed = _insert_lines(haystack(n), needles, fractions)
            return _Rendered(prompt("\n".join(lines)), answer_prefix, answers, evidence, tuple(landed))
    return 0, None, render


# ---------------------------------------------------------------------------------------------
# Variable tracking (RULER's variable_tracking.py, noise haystack, 1 chain of 4 hops)

def _vt_chain(names: list[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(len(names) - 1)]


def _vt_texts(names: list[str], value: str, fractions: list[float], n: int) -> tuple[str, str, list[float]]:
    """The task text (template with the chain in n noise lines), its answer prefix, and where each
    statement landed (in % of the noise lines)."""
    lines, landed = _insert_lines([_NOISE] * n, _vt_chain(names, value), fractions)
    context = "\n".join(lines).replace(". \n", ".\n")
    num_v = len(names)
    return (_VT_TEMPLATE.format(context=context, query=value, num_v=num_v),
            _VT_PREFIX.format(query=value, num_v=num_v), landed)


def _vt_icl(count_tokens: CountTokens, seed: int) -> tuple[list[float], int]:
    """RULER's in-context example: a chain of 3-letter names with the value 12345 in as many noise
    lines as fit in 500 tokens (the example's own template and answer prefix, no chat template),
    built once; every sample then renames its variables and value (RULER's randomize_icl).
    Returns the example's statement positions (fractions) and its number of noise lines."""
    rng = random.Random(f"opsdl.ruler/vt-icl/{seed}")
    names = _distinct(lambda: _random_name(rng, 3), _VT_HOPS + 1)
    fractions = sorted(rng.random() for _ in range(_VT_HOPS + 1))
    empty = count_tokens("", "")

    def fits(n: int) -> bool:
        prompt, prefix, _ = _vt_texts(names, "12345", fractions, n)
        return count_tokens(prompt, prefix) - empty <= _VT_ICL_TOKENS

    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return fractions, lo


def _vt(task: str, length: int, rng: random.Random, sources: RulerSources, shared: dict):
    icl_fractions, icl_n = shared["vt_icl"]
    # randomize_icl: new 3-letter names and a new value for the example, per sample
    icl_names = _distinct(lambda: _random_name(rng, 3), _VT_HOPS + 1)
    icl_value = str(rng.randrange(10000, 99999))
    icl_prompt, icl_prefix, _ = _vt_texts(icl_names, icl_value, icl_fractions, icl_n)
    icl = icl_prompt + icl_prefix + " " + " ".join(icl_names) + "\n"

    names = _distinct(lambda: _random_name(rng, 5), _VT_HOPS + 1)
    value = str(rng.randrange(10000, 99999))  # np.random.randint(10000, 99999): 99999 excluded
    fractions = sorted(rng.random() for _ in names)
    evidence, prefix, _ = _vt_texts(names, value, fractions, 0)

    def render(n: int) -> _Rendered:
        prompt, prefix, landed = _vt_texts(names, value, fractions, n)
        # RULER puts the example (and a newline) before the task's template
        return _Rendered(icl + "\n" + prompt, prefix, tuple(names), icl + "\n" + evidence, tuple(landed))
    return 0, None, render


# ---------------------------------------------------------------------------------------------
# Common words (RULER's common_words_extraction.py: freq_cw 30, freq_ucw 3, num_cw 10, one example)

_CWE_WORDS: Optional[tuple[str, ...]] = None


def _cwe_words() -> tuple[str, ...]:
    global _CWE_WORDS
    if _CWE_WORDS is None:
        _CWE_WORDS = tuple(sorted(set(wonderwords_list("nounlist.txt") + wonderwords_list("adjectivelist.txt")
                                      + wonderwords_list("verblist.txt"))))
    return _CWE_WORDS


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _cwe(task: str, length: int, rng: random.Random, sources: RulerSources, shared: dict):
    words = list(_cwe_words())
    rng.shuffle(words)  # this sample's order of the word list: its first n are its n words
    if length < 4096:  # RULER: (20, 3, 1) for the example and (n, 6, 1) below 4096 tokens
        example_n, example_common, example_rare, common_repeats, rare_repeats = 20, 3, 1, 6, 1
    else:
        example_n, example_common, example_rare, common_repeats, rare_repeats = 40, 10, 3, 30, 3
    chosen = rng.sample(words, example_n)
    listed = chosen[:_CWE_NUM] * example_common + chosen[_CWE_NUM:] * example_rare
    rng.shuffle(listed)
    example = (_CWE_TEMPLATE.format(context=_numbered(listed)) + _CWE_PREFIX + " " + _numbered(chosen[:_CWE_NUM]))
    order_seed = rng.getrandbits(64)
    common = tuple(words[:_CWE_NUM])

    def render(n: int) -> _Rendered:
        if n > len(words):
            raise _TooLong(n, None)
        listed = list(common) * common_repeats + words[_CWE_NUM:n] * rare_repeats
        random.Random(f"{order_seed}/{n}").shuffle(listed)
        prompt = example + "\n" + _CWE_TEMPLATE.format(context=_numbered(listed))
        return _Rendered(prompt, _CWE_PREFIX, common, None, ())
    return _CWE_NUM, len(words), render


# ---------------------------------------------------------------------------------------------
# Frequent words (RULER's freq_words_extraction.py: alpha 2, 6-letter coded words)

def zeta(s: float) -> float:
    """Riemann zeta for s > 1 (Euler-Maclaurin with 20 terms and four Bernoulli corrections; about
    1e-15 relative error for s >= 1.1), in place of scipy.special.zeta."""
    n = 20
    total = sum(k ** -s for k in range(1, n)) + n ** (1 - s) / (s - 1) + n ** -s / 2
    rising, factorial = 1.0, 1.0
    for j, b in enumerate((1 / 6, -1 / 30, 1 / 42, -1 / 30), start=1):
        rising *= (s + 2 * j - 2) if j == 1 else (s + 2 * j - 3) * (s + 2 * j - 2)
        factorial *= (2 * j - 1) * (2 * j)
        total += b / factorial * rising * n ** (-s - 2 * j + 1)
    return total


def _fwe_min_words(alpha: float = _FWE_ALPHA) -> int:
    """The smallest n from which the 4th-ranked word (vocab[3], the third answer) always has more
    copies than the 5th, so that the three answers are the three most frequent after '...'."""
    return math.ceil(zeta(alpha) / (4 ** -alpha - 5 ** -alpha))


def _fwe(task: str, length: int, rng: random.Random, sources: RulerSources, shared: dict):
    vocab_size = (length - 50) // 50  # RULER's default: (max_seq_length - tokens_to_generate) // 50
    if vocab_size < 4:
        raise _TooLong(0, None)
    order_seed = rng.getrandbits(64)
    # Distinct coded words ranked in the order drawn: a uniformly random set in a uniformly random
    # order, as RULER's sorted-then-shuffled set, and the first ranks are the same for any vocab_size.
    vocab = _distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=_FWE_WORDLEN)), vocab_size)
    vocab[0] = "..."  # the top-ranked word is noise
    z = zeta(_FWE_ALPHA)
    answers = tuple(vocab[1:4])

    def render(n: int) -> _Rendered:
        counts = [int(n * (k ** -_FWE_ALPHA) / z) for k in range(1, len(vocab) + 1)]
        coded = [w for w, c in zip(vocab, counts) for _ in range(c)]
        random.Random(f"{order_seed}/{n}").shuffle(coded)
        return _Rendered(_FWE_TEMPLATE.format(context=" ".join(coded)), _FWE_PREFIX, answers, None, ())
    return _fwe_min_words(), None, render


# ---------------------------------------------------------------------------------------------
# QA (RULER's qa.py)

def _qa(task: str, length: int, rng: random.Random, sources: RulerSources, shared: dict):
    qaset: Optional[QASet] = sources.squad if task == "qa_1" else sources.hotpotqa
    if qaset is None:
        raise ValueError(f"{QA_OPTIONS[task]}: {task} needs "
                         f"{SQUAD_EXPECTED if task == 'qa_1' else HOTPOTQA_EXPECTED}; got no {QA_OPTIONS[task]} file")
    qa = qaset.qas[shared["index"] % len(qaset.qas)]  # RULER takes the questions in the file's order
    docs = qaset.docs
    gold = list(qa.context)
    more = [i for i in qa.more_context if i not in gold]
    rng.shuffle(more)
    taken = set(gold) | set(more)
    others = [i for i in range(len(docs)) if i not in taken]
    others_rng = random.Random(rng.getrandbits(64))
    drawn = [0]  # others[:drawn[0]] is a uniform sample, drawn by a Fisher-Yates shuffle run lazily
    order_seed = rng.getrandbits(64)
    gold_set = set(gold)

    def render(n: int) -> _Rendered:
        if n < len(docs):
            if n - len(gold) > len(more):
                need = n - len(gold) - len(more)
                for i in range(drawn[0], need):
                    j = others_rng.randrange(i, len(others))
                    others[i], others[j] = others[j], others[i]
                drawn[0] = max(drawn[0], need)
                picked = gold + more + others[:need]
            else:
                picked = gold + more[:n - len(gold)]
        else:  # RULER repeats the whole document list
            picked = [i % len(docs) for i in range(n)]
        random.Random(f"{order_seed}/{n}").shuffle(picked)
        context = "\n\n".join(_QA_DOCUMENT.format(i=i + 1, document=docs[d]) for i, d in enumerate(picked))
        first: dict[int, int] = {}  # each gold document's first place (RULER's repeated list can hold it twice)
        for i, d in enumerate(picked):
            if d in gold_set:
                first.setdefault(d, i)
        places = sorted(first.values())
        evidence_docs = [docs[picked[i]] for i in places]
        evidence = _QA_TEMPLATE.format(context="\n\n".join(_QA_DOCUMENT.format(i=i + 1, document=d)
                                                          for i, d in enumerate(evidence_docs)), query=qa.query)
        return _Rendered(_QA_TEMPLATE.format(context=context, query=qa.query), _QA_PREFIX, tuple(qa.outputs),
                         evidence, tuple(100.0 * i / len(picked) for i in places))
    return len(gold), None, render


_BUILDERS = {"niah": _niah, "vt": _vt, "cwe": _cwe, "fwe": _fwe, "qa": _qa}


# ---------------------------------------------------------------------------------------------
# Length fitting

def _fit(render: Callable[[int], _Rendered], count_tokens: CountTokens, budget: int, length: int, n_min: int,
         n_max: Optional[int], hint: Optional[int], smallest: _Rendered, smallest_tokens: int
         ) -> tuple[int, _Rendered, int]:
    """The largest haystack size n in [n_min, n_max] whose prompt plus answer budget fits in
    ``length`` tokens, given that n_min fits (``smallest``, ``smallest_tokens``): a search that
    first probes ``hint`` (sample 0's n) or n_min + 16, then the size that the tokens per
    unit measured so far point to, until a size that fits and the next one that does not are known
    (every third step in that bracket bisects, so it ends in logarithmic time whatever the token
    counts do). Raises _TooLong(n_max, its tokens) when n_max itself fits."""
    memo: dict[int, tuple[_Rendered, int]] = {n_min: (smallest, smallest_tokens)}

    def tokens(n: int) -> int:
        if n not in memo:
            r = render(n)
            memo[n] = (r, count_tokens(r.prompt, r.answer_prefix) + budget)
        return memo[n][1]

    lo, hi, steps = n_min, None, 0  # lo fits; hi (once known) does not
    probe = hint if hint is not None and hint > n_min else n_min + 16
    while True:
        if n_max is not None:
            if lo >= n_max:
                raise _TooLong(n_max, memo[lo][1])
            probe = min(probe, n_max)
        probe = max(probe, lo + 1) if hi is None else min(max(probe, lo + 1), hi - 1)
        if tokens(probe) <= length:
            lo = probe
        else:
            hi = probe
        if hi is not None and hi - lo <= 1:
            break
        t_lo = memo[lo][1]
        if hi is None:  # not yet bracketed: aim a little past where the rate so far says length is reached
            rate = (t_lo - smallest_tokens) / (lo - n_min)
            probe = 2 * lo + 16 if rate <= 0 else lo + math.ceil((length - t_lo) / rate * 1.05) + 1
        else:
            steps += 1
            if steps % 3 == 0:
                probe = (lo + hi) // 2
            else:
                rate = (memo[hi][1] - t_lo) / (hi - lo)
                probe = lo + int((length - t_lo) / rate) if rate > 0 else (lo + hi) // 2
    rendered, total = memo[lo]
    return lo, rendered, total


def _shared(task: str, count_tokens: CountTokens, seed: int) -> dict:
    return {"vt_icl": _vt_icl(count_tokens, seed)} if task == "vt" else {}


def _smallest(task: str, length: int, seed: int, index: int, count_tokens: CountTokens, sources: RulerSources,
              shared: dict):
    rng = _sample_rng(task, length, seed, index)
    n_min, n_max, render = _BUILDERS[_family(task)](task, length, rng, sources, dict(shared, index=index))
    smallest = render(n_min)
    return n_min, n_max, render, smallest, count_tokens(smallest.prompt, smallest.answer_prefix) + answer_budget(task)


_MIN_SAMPLES = 4


def minimum_length(task: str, count_tokens: CountTokens, sources: RulerSources) -> int:
    """The fewest tokens that samples 0-3 of the task (seed 0) need: the prompt and answer prefix
    with the smallest haystack (NIAH and VT: none; CWE: its 10 common words only; FWE: the fewest
    words for which its three answers are the most frequent; QA: the gold documents only), plus
    the answer budget. The samples' draws do not depend on the length, so make_samples with seed 0
    builds these at any length; other seeds' samples can need a few tokens more or less (their
    keys, values, names and questions differ), and make_samples then names what they need. FWE's
    vocabulary of (length - 50) // 50 coded words must hold its 4 ranks: at least 250."""
    shared = _shared(task, count_tokens, 0)

    def need(length: int) -> int:
        return max(_smallest(task, length, 0, i, count_tokens, sources, shared)[4] for i in range(_MIN_SAMPLES))

    if task != "fwe":
        return need(0)
    # The smallest haystack's words only reach the ranks with a copy; past those, a larger
    # vocabulary (a longer length) adds nothing to the prompt.
    n = _fwe_min_words()
    ranks = max(k for k in range(1, n + 1) if int(n * (k ** -_FWE_ALPHA) / zeta(_FWE_ALPHA)) >= 1)
    for vocab_size in range(4, max(ranks, 4) + 1):
        low = 50 * vocab_size + 50  # the lengths with this vocabulary size
        length = max(low, need(low))
        if vocab_size == max(ranks, 4) or length < low + 50:
            return length
    raise AssertionError("unreachable")


def too_short_error(task: str, length: int, minimum: int) -> ValueError:
    """The refusal of a length below ``minimum`` (``minimum_length``, or what a sample needs)."""
    return ValueError(f"--lengths {length}: expected at least {minimum} tokens for {task} (its template, needles and "
                      f"{answer_budget(task)}-token answer budget), got {length}")


def make_samples(task: str, length: int, count: int, count_tokens: CountTokens, seed: int,
                 sources: RulerSources) -> list[RulerSample]:
    """``count`` samples of ``task`` whose prompt (through ``count_tokens``, which applies the chat
    template and appends the answer prefix) plus the answer budget is as close to ``length``
    tokens as the haystack's unit allows, without going over: each has the largest haystack size n
    that fits, with n + 1 measured not to fit. Deterministic in (task, length, seed, index): sample
    i is the same whatever ``count`` is (sample 0 is searched from scratch and its n is where the
    search for every later sample starts)."""
    budget = answer_budget(task)

    def too_short(need: int) -> ValueError:
        return too_short_error(task, length, max(need, minimum_length(task, count_tokens, sources)))

    if _family(task) == "qa":
        qaset = sources.squad if task == "qa_1" else sources.hotpotqa
        if qaset is not None and count > len(qaset.qas):
            source = sources.squad_source if task == "qa_1" else sources.hotpotqa_source
            raise ValueError(f"--samples {count}: expected at most {len(qaset.qas)} for {task} (the answerable questions "
                             f"in {source}), got {count}")
    shared = _shared(task, count_tokens, seed)
    samples, hint = [], None
    for index in range(count):
        try:
            n_min, n_max, render, smallest, need = _smallest(task, length, seed, index, count_tokens, sources, shared)
        except _TooLong:  # FWE: too few tokens for RULER's vocabulary to hold the answers
            raise too_short(0) from None
        if need > length:
            raise too_short(need)
        try:
            n, rendered, tokens = _fit(render, count_tokens, budget, length, n_min, n_max, hint, smallest, need)
        except _TooLong as e:
            words, most = e.args
            raise ValueError(f"--lengths {length}: expected at most {most} tokens for {task} (all {words} distinct "
                             "words of wonderwords' noun, adjective and verb lists; RULER falls back to a larger "
                             f"English word list, not included here), got {length}") from None
        if index == 0:  # later samples start from sample 0's size: each sample depends on its index only
            hint = n
        samples.append(RulerSample(task=task, index=index, prompt=rendered.prompt,
                                   answer_prefix=rendered.answer_prefix, answers=rendered.answers,
                                   evidence_prompt=rendered.evidence_prompt, max_new_tokens=budget,
                                   depths=rendered.depths, length=tokens))
    return samples
