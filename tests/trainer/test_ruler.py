"""opsdl.ruler: RULER's 13 tasks generated offline, checked against RULER's definitions
(NVIDIA/RULER scripts/synthetic.yaml, scripts/data/synthetic/*.py, scripts/eval/synthetic/constants.py)."""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from opsdl.ruler import (DEPTHS, QA_TASKS, RULER_TASKS, answer_budget, check_ruler_options, load_sources,
                         make_samples, minimum_length, score, zeta)
from opsdl.ruler_sources import split_sentences

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_TASKS = RULER_TASKS[:8]
GPU_TOKENIZER = Path(__file__).resolve().parents[2] / ".gpu" / "tokenizer"


def _words(prompt: str, answer_prefix: str) -> int:
    """A deterministic stand-in tokenizer: one token per whitespace-separated word."""
    return len(prompt.split()) + len(answer_prefix.split())


@pytest.fixture(scope="module")
def sources():
    return load_sources()


@pytest.fixture(scope="module")
def smol_count_tokens():
    """count_tokens with the SmolLM2 tokenizer and its chat template (the prompt as the user turn,
    the generation prompt, then the answer prefix), as ``opsdl eval`` counts."""
    if GPU_TOKENIZER.is_dir():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(GPU_TOKENIZER))
    else:  # the same tokenizer, parsed from the embedded GGUF (slower)
        from opsdl.model import load_tokenizer
        tokenizer = load_tokenizer()

    from opsdl.eval_ruler import ruler_prompt_ids

    def count(prompt: str, answer_prefix: str) -> int:
        return len(ruler_prompt_ids(tokenizer, prompt, answer_prefix))
    count.tokenizer = tokenizer
    return count


def _context(prompt: str) -> str:
    """The NIAH context: between the template's first line and its question line."""
    return prompt.split("\n", 1)[1].rsplit("\n", 1)[0]


# ---------------------------------------------------------------------------------------------
# Task list, budgets, scoring

def test_tasks_budgets_and_depth_grid_are_rulers():
    assert RULER_TASKS == ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                           "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2")
    assert QA_TASKS == ("qa_1", "qa_2")
    assert [answer_budget(t) for t in RULER_TASKS] == [128] * 8 + [30, 120, 50, 32, 32]
    # np.round(np.linspace(0, 100, 40)).astype(int), written out at both ends
    assert len(DEPTHS) == 40 and DEPTHS[:6] == (0, 3, 5, 8, 10, 13) and DEPTHS[-3:] == (95, 97, 100)
    assert abs(zeta(2.0) - math.pi ** 2 / 6) < 1e-12 and abs(zeta(3.0) - 1.2020569031595942) < 1e-12


def test_scoring_matches_string_match_all_and_part_on_hand_made_cases():
    # string_match_all: the share of references found, case-insensitive
    refs = ["1234567", "7654321", "1111111", "2222222"]
    assert score("niah_multivalue", "They are 1234567 and 7654321.", refs) == 0.5  # 2 of 4
    assert score("vt", "answer: abcde, FGHIJ", ["ABCDE", "fghij", "KLMNO"]) == pytest.approx(2 / 3)
    assert score("cwe", "", ["apple"]) == 0.0
    assert score("fwe", "  xxyyzz aabbcc ddeeff\n", ["AABBCC", "ddeeff", "xxyyzz"]) == 1.0
    # string_match_part: 1 if any reference is found
    assert score("qa_1", "It is PARIS.", ["Paris", "London"]) == 1.0
    assert score("qa_2", "Rome", ["Paris", "London"]) == 0.0
    # RULER's postprocess_pred: strip, control characters (\x00-\x1f) become newlines
    assert score("niah_single_1", "\t 12\x0534 ", ["12\n34"]) == 1.0
    assert score("niah_single_1", "\t 12\x0534 ", ["12\x0534"]) == 0.0
    with pytest.raises(ValueError, match="--tasks"):
        score("niah_single_4", "x", ["x"])


# ---------------------------------------------------------------------------------------------
# NIAH

@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_answers_come_from_needles_of_the_queried_keys_at_their_depths(task, sources):
    samples = make_samples(task, 12000, 3, _words, seed=0, sources=sources)
    for s in samples:
        question = s.prompt.rsplit("\n", 1)[1]
        query = re.fullmatch(r"What (?:are all|is) the special magic \w+ for (.+) mentioned in the provided text\?",
                             question).group(1)
        keys = re.split(r", and |, ", query)
        needle = re.compile(r"One of the special magic (numbers|uuids) for (.+?) is: (\d+|[0-9a-f-]{36})\.")
        context = _context(s.prompt)
        found = needle.findall(context)
        of_queried = [v for _, k, v in found if k in keys]
        assert sorted(of_queried) == sorted(s.answers) and len(set(s.answers)) == len(s.answers)
        value_type = "uuids" if task in ("niah_single_3", "niah_multikey_3") else "numbers"
        assert all(t == value_type for t, _, _ in found)
        for v in s.answers:
            assert re.fullmatch(r"\d{7}" if value_type == "numbers" else
                                r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", v)
        if task != "niah_multikey_3":
            assert all(re.fullmatch(r"[a-zA-Z -]+-[a-zA-Z -]+", k) for k in keys)  # adjective-noun
        # the singular rewrite when one value is asked for, on the template and the answer prefix
        single = len(s.answers) == 1
        kind = value_type[:-1] if single else value_type
        assert s.prompt.startswith(f"A special magic {kind} is hidden" if single else
                                   f"Some special magic {kind} are hidden")
        assert s.answer_prefix == (f" The special magic {kind} for {query} mentioned in the provided text "
                                   + ("is" if single else "are"))
        if task == "niah_multiquery":
            assert len(keys) == 4 and query == f"{keys[0]}, {keys[1]}, {keys[2]}, and {keys[3]}"
        real = [m.group(0) for m in needle.finditer(context) if task not in ("niah_multikey_2", "niah_multikey_3")
                or m.group(2) in keys]
        assert s.evidence_prompt == s.prompt.replace(context, (" " if "essay" in _haystack(task) else "\n").join(real))
        assert len(s.depths) == len(real) == {"niah_multikey_1": 4, "niah_multivalue": 4,
                                              "niah_multiquery": 4}.get(task, 1)
        _check_depths(task, context, real, s.depths)


def _haystack(task: str) -> str:
    return {"niah_single_1": "noise", "niah_multikey_2": "needle", "niah_multikey_3": "needle"}.get(task, "essay")


def _check_depths(task: str, context: str, needles: list[str], depths: tuple[float, ...]):
    if _haystack(task) == "essay":
        # each needle sits between sentences, at sentence int(n_sentences * depth / 100)
        rest = context
        for needle in needles:
            rest = rest.replace(needle, "\0")
        sentences = split_sentences(rest.replace("\0", " "))
        count = len(sentences)
        before = [len(split_sentences(rest[:i].replace("\0", " "))) for i, c in enumerate(rest) if c == "\0"]
        for place, depth in zip(before, depths):
            assert depth == pytest.approx(100 * place / count)  # where it landed
            # RULER's insertion point for a depth d of its grid: sentence int(n_sentences * d / 100),
            # within one sentence of d%
            assert any(place == int(count * d / 100) for d in DEPTHS)
            assert min(abs(depth - d) for d in DEPTHS) <= 100 / count
        assert list(depths) == sorted(depths)
    else:
        lines = context.split("\n")
        haystack = [line for line in lines if line not in needles]
        if _haystack(task) == "noise":
            assert set(haystack) == {NOISE}
        for needle, depth in zip(needles, depths):
            place = [line for line in lines[:lines.index(needle)] if line not in needles]
            assert depth == pytest.approx(100 * len(place) / len(haystack))


def test_niah_distractor_haystack_grows_as_a_prefix(sources):
    """multikey_2: the distractor needles (keys and values from the sample's own generator) are the
    same first ones at every length; the real needle is never among the distractors' keys."""
    short = _context(make_samples("niah_multikey_2", 600, 1, _words, seed=3, sources=sources)[0].prompt).split("\n")
    s = make_samples("niah_multikey_2", 1200, 1, _words, seed=3, sources=sources)[0]
    long = _context(s.prompt).split("\n")
    key = s.answer_prefix.split(" for ")[1].split(" mentioned")[0]
    real = [line for line in long if f" for {key} is: " in line]
    assert len(real) == 1 and real[0].endswith(f"is: {s.answers[0]}.")
    assert [x for x in short if x != real[0]] == [x for x in long if x != real[0]][:len(short) - 1]
    assert len(long) > len(short) > 10


# ---------------------------------------------------------------------------------------------
# VT, CWE, FWE

def _follow_chain(text: str, value: str) -> list[str]:
    """Names that get `value`, in the order the assignments are followed."""
    direct = dict(re.findall(r"VAR ([A-Z]+) = (\d+)", text))
    copies = re.findall(r"VAR ([A-Z]+) = VAR ([A-Z]+) ", text)
    names = [name for name, v in direct.items() if v == value]
    changed = True
    while changed:
        changed = False
        for target, source in copies:
            if source in names and target not in names:
                names.append(target)
                changed = True
    return names


def test_vt_chain_gives_exactly_the_answers_after_a_worked_example(sources):
    template_start = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    example_values = set()
    for s in make_samples("vt", 1500, 3, _words, seed=0, sources=sources):
        example, task_text = s.prompt.split("\n\n" + template_start)
        assert example.startswith(template_start)
        # the worked example: its own chain of 3-letter names, its answer after its answer prefix
        ex_value = re.search(r"assigned the value (\d+), they are: ", example).group(1)
        ex_answer = example.rsplit("they are: ", 1)[1].split()
        assert _follow_chain(example.split("\nQuestion:")[0], ex_value) == ex_answer
        assert len(ex_answer) == 5 and all(re.fullmatch(r"[A-Z]{3}", n) for n in ex_answer)
        example_values.add(ex_value)  # randomize_icl: a new value (and names) for each sample
        # built at RULER's 500 tokens (here: words): one more noise line would not fit
        example_input = example[:example.rindex("they are: ") + len("they are: ")]
        assert 500 - len(NOISE.split()) < _words(example_input, "") <= 500
        # the task: the value in the question, the chain in the context
        value = re.search(r"assigned the value (\d+) in the text above\.$", task_text).group(1)
        assert 10000 <= int(value) <= 99998
        assert _follow_chain(task_text, value) == list(s.answers)
        assert len(s.answers) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in s.answers)
        assert s.answer_prefix == (" Answer: According to the chain(s) of variable assignment in the text above, "
                                   f"5 variables are assigned the value {value}, they are: ")
        lines = task_text.split("\n")[:-1]
        statements = [line for line in lines if line.startswith("VAR ")]
        assert statements == [f"VAR {s.answers[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in
                                                                    zip(s.answers, s.answers[1:])]
        noise = [line for line in lines if line and not line.startswith("VAR ")]
        assert set(noise) == {NOISE} and len(noise) > 30
        places = [sum(1 for x in lines[:lines.index(st)] if x == NOISE) for st in statements]
        assert [pytest.approx(100 * p / len(noise)) for p in places] == list(s.depths)
        assert s.evidence_prompt == s.prompt.replace("\n".join(lines), "\n".join(statements))
    assert len(example_values) == 3 and all(10000 <= int(v) <= 99998 for v in example_values)


def _numbered_list(text: str) -> list[str]:
    items = re.split(r"(?:^| )(\d+)\. ", text)[1:]
    numbers, words = items[0::2], items[1::2]
    assert numbers == [str(i + 1) for i in range(len(numbers))]  # "1. w 2. w ..."
    return words


@pytest.mark.parametrize("length, example, repeats", [(1500, (20, 3, 1), (6, 1)), (5000, (40, 10, 3), (30, 3))])
def test_cwe_counts_give_the_ten_answers(length, example, repeats, sources):
    header = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
              "ones that appear most often.\n")
    question = "\nQuestion: What are the 10 most common words in the above list?"
    prefix = " Answer: The top 10 words that appear most often in the list are:"
    for s in make_samples("cwe", length, 2, _words, seed=0, sources=sources):
        assert s.answer_prefix == prefix and s.evidence_prompt is None and len(s.answers) == 10
        shot, main = s.prompt.split("\n" + header)
        assert main.endswith(question)
        counts = Counter(_numbered_list(main[:-len(question)]))
        top = {w for w, _ in counts.most_common(10)}
        assert top == set(s.answers)
        assert min(counts[w] for w in s.answers) == repeats[0] and max(
            c for w, c in counts.items() if w not in s.answers) == repeats[1]
        # the worked example: template, answer prefix, then its own 10 answers numbered
        shot_list, shot_answer = shot[len(header):].split(question + prefix + " ")
        shot_counts = Counter(_numbered_list(shot_list))
        assert len(shot_counts) == example[0]
        assert set(_numbered_list(shot_answer)) == {w for w, c in shot_counts.items() if c == example[1]}
        assert sorted(set(shot_counts.values())) == sorted({example[1], example[2]})


def test_fwe_counts_give_the_three_answers(sources):
    for s in make_samples("fwe", 2000, 2, _words, seed=0, sources=sources):
        start = "Find the three most frequently appeared coded words. "
        coded = s.prompt.split(start)[1].split("\nQuestion:")[0].split(" ")
        counts = Counter(coded)
        assert counts.most_common(1)[0][0] == "..."
        ranked = [c for w, c in counts.most_common() if w != "..."]
        assert {w for w, _ in counts.most_common() if w != "..."} >= set(s.answers)
        assert {w for w, c in counts.items() if w != "..." and c >= ranked[2]} == set(s.answers)
        assert ranked[2] > ranked[3]  # strictly the three most frequent
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in counts if w != "...")
        assert counts[s.answers[0]] >= counts[s.answers[1]] >= counts[s.answers[2]]
        # Zipf counts, alpha 2, over RULER's (length - 50) // 50 = 39 words: the k-th word int(n * k^-2 / zeta(2))
        # times for some n (the '...' count int(n / zeta(2)) bounds it)
        by_rank = sorted(counts.values(), reverse=True)
        candidates = range(int(by_rank[0] * zeta(2.0)), int((by_rank[0] + 1) * zeta(2.0)) + 1)
        assert any(by_rank == [c for c in (int(n * k ** -2.0 / zeta(2.0)) for k in range(1, 40)) if c]
                   for n in candidates)


# ---------------------------------------------------------------------------------------------
# QA

def _squad(path: Path) -> Path:
    def para(text, qas):
        return {"context": text, "qas": qas}

    def q(question, answers, impossible=False):
        return {"question": question, "id": question, "is_impossible": impossible,
                "answers": [] if impossible else [{"text": a, "answer_start": 0} for a in answers]}
    data = {"version": "v2.0", "data": [
        {"title": "Rivers", "paragraphs": [
            para("The Nile flows north into the Mediterranean Sea.", [q("Where does the Nile flow?", ["north"]),
                                                                      q("Who dammed the Nile in 1066?", [], True)]),
            para("The Amazon carries more water than any other river.", [q("Which river carries most water?",
                                                                           ["The Amazon", "Amazon"])]),
            para("The Danube passes through ten countries.", [])]},
        {"title": "Mountains", "paragraphs": [
            para("Everest is the highest mountain above sea level.", [q("What is the highest mountain?", ["Everest"])]),
            para("K2 is the second highest mountain.", []),
            para("Denali is the highest peak in North America.", [])]},
        {"title": "Lakes", "paragraphs": [para(f"Lake number {i} is deep and cold.", []) for i in range(12)]},
    ]}
    path.write_text(json.dumps(data))
    return path


def _hotpotqa(path: Path) -> Path:
    data = [
        {"_id": "a", "question": "Which city hosts both museums?", "answer": "Paris",
         "context": [["Louvre", ["The Louvre is in Paris. ", "It opened in 1793."]],
                     ["Orsay", ["The Musee d'Orsay is also in Paris."]],
                     ["Prado", ["The Prado is in Madrid."]]]},
        {"_id": "b", "question": "Which river runs through Vienna?", "answer": "Danube",
         "context": [["Vienna", ["Vienna lies on the Danube."]], ["Prado", ["The Prado is in Madrid."]],
                     ["Thames", ["The Thames runs through London."]]]},
    ]
    path.write_text(json.dumps(data))
    return path


def _documents(prompt: str) -> list[str]:
    body = prompt.split("The following are given documents.\n\n")[1].split("\n\nAnswer the question based")[0]
    parts = re.split(r"(?:^|\n\n)Document (\d+):\n", body)[1:]
    assert parts[0::2] == [str(i + 1) for i in range(len(parts) // 2)]
    return parts[1::2]


def test_qa_squad_gold_then_same_article_then_other_documents(tmp_path):
    src = load_sources(squad=str(_squad(tmp_path / "squad.json")))
    assert [q.query for q in src.squad.qas] == ["Where does the Nile flow?", "Which river carries most water?",
                                                "What is the highest mountain?"]  # the impossible one left out
    assert src.squad_source.endswith("squad.json") and src.hotpotqa is None
    article = {"The Nile flows north into the Mediterranean Sea.",
               "The Amazon carries more water than any other river.", "The Danube passes through ten countries."}
    sizes = set()
    minimum = minimum_length("qa_1", _words, src)
    with pytest.raises(ValueError, match=f"^--lengths {minimum - 1}: expected at least {minimum} tokens for qa_1"):
        make_samples("qa_1", minimum - 1, 3, _words, seed=0, sources=src)
    for length in range(minimum, minimum + 330, 3):
        s = make_samples("qa_1", length, 1, _words, seed=0, sources=src)[0]
        docs = _documents(s.prompt)
        sizes.add(len(docs))
        assert "The Nile flows north into the Mediterranean Sea." in docs
        if len(docs) <= 3:  # the gold paragraph, then the others of its article
            assert set(docs) <= article and len(set(docs)) == len(docs)
        else:
            assert article <= set(docs)
        if len(docs) < 18:
            assert len(set(docs)) == len(docs)
        assert s.answers == ("north",) and s.answer_prefix == " Answer:" and s.prompt.endswith(
            "\n\nQuestion: Where does the Nile flow?")
        assert _documents(s.evidence_prompt) == ["The Nile flows north into the Mediterranean Sea."]
        assert s.depths == (100 * docs.index("The Nile flows north into the Mediterranean Sea.") / len(docs),)
        assert s.evidence_prompt.replace(_documents(s.evidence_prompt)[0], "") == s.prompt.replace(
            s.prompt.split("given documents.\n\n")[1].split("\n\nAnswer the question")[0], "Document 1:\n")
        assert s.length == _words(s.prompt, s.answer_prefix) + 32 <= length
    assert {1, 2, 3, 6} <= sizes and max(sizes) > 18  # beyond all 18 paragraphs: RULER repeats the whole list
    s = make_samples("qa_1", 200, 2, _words, seed=0, sources=src)[1]
    assert s.answers == ("The Amazon", "Amazon") and score("qa_1", "amazon", s.answers) == 1.0


def test_qa_hotpotqa_all_context_paragraphs_are_gold(tmp_path):
    src = load_sources(hotpotqa=str(_hotpotqa(tmp_path / "hotpot.json")))
    assert len(src.hotpotqa.docs) == 5  # "Prado" appears twice, counted once
    s = make_samples("qa_2", 300, 1, _words, seed=0, sources=src)[0]
    gold = {"Louvre\nThe Louvre is in Paris. It opened in 1793.", "Orsay\nThe Musee d'Orsay is also in Paris.",
            "Prado\nThe Prado is in Madrid."}
    docs = _documents(s.prompt)
    assert len(docs) > 5 and set(docs) == gold | {"Vienna\nVienna lies on the Danube.",
                                                "Thames\nThe Thames runs through London."}
    assert _documents(s.evidence_prompt) == [d for i, d in enumerate(docs) if d in gold and d not in docs[:i]]
    assert s.answers == ("Paris",) and s.max_new_tokens == 32
    assert score("qa_2", " paris, France", s.answers) == 1.0


def test_qa_files_that_do_not_parse_are_refused_naming_the_option(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(ValueError, match=r"^--squad .*bad\.json: expected a SQuAD v2 dev JSON"):
        load_sources(squad=str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match=r"^--hotpotqa .*text\.json: expected a HotpotQA dev JSON.*not JSON"):
        load_sources(hotpotqa=str(tmp_path / "text.json"))
    with pytest.raises(ValueError, match=r"^--hotpotqa .*bad\.json"):
        load_sources(hotpotqa=str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match=r"^--squad: qa_1 needs"):
        make_samples("qa_1", 1000, 1, _words, seed=0, sources=load_sources())


# ---------------------------------------------------------------------------------------------
# Lengths, determinism, refusals

def test_sample_lengths_fill_the_requested_length_with_smollm2_and_its_chat_template(smol_count_tokens, sources,
                                                                                       tmp_path):
    """Every sample's length is count_tokens(prompt, prefix) + budget, at most the requested length
    and at least that minus one haystack unit: a noise line (niah_single_1, vt), a distractor needle
    (multikey_2/3: the longest line), a word of the essay (with the needles' neighbours: 16), a CWE
    word (24), an FWE step of n (several Zipf counts can step up together: 64), a QA document."""
    tok = smol_count_tokens.tokenizer
    length = 3000
    noise_line = len(tok(NOISE, add_special_tokens=False)["input_ids"]) + 2
    for task in RULER_TASKS[:11]:
        for s in make_samples(task, length, 2, smol_count_tokens, seed=0, sources=sources):
            assert s.length == smol_count_tokens(s.prompt, s.answer_prefix) + answer_budget(task) == \
                smol_count_tokens(s.prompt, s.answer_prefix) + s.max_new_tokens
            if task in ("niah_single_1", "vt"):
                margin = noise_line
            elif task in ("niah_multikey_2", "niah_multikey_3"):
                margin = max(len(tok(x, add_special_tokens=False)["input_ids"]) for x in s.prompt.split("\n")) + 2
            else:
                margin = {"cwe": 24, "fwe": 64}.get(task, 16)
            assert length - margin <= s.length <= length, (task, s.length, margin)
    src = load_sources(squad=str(_squad(tmp_path / "squad.json")))
    s = make_samples("qa_1", 300, 1, smol_count_tokens, seed=0, sources=src)[0]
    longest_doc = max(len(tok(d, add_special_tokens=False)["input_ids"]) for d in src.squad.docs) + 8
    assert 300 - longest_doc <= s.length == smol_count_tokens(s.prompt, s.answer_prefix) + 32 <= 300


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_3", "vt", "cwe", "fwe"])
def test_minimum_length_is_the_smallest_that_works(task, smol_count_tokens, sources):
    minimum = minimum_length(task, smol_count_tokens, sources)
    assert len(make_samples(task, minimum, 4, smol_count_tokens, seed=0, sources=sources)) == 4
    budget = answer_budget(task)
    message = (f"--lengths {minimum - 1}: expected at least {minimum} tokens for {task} (its template, needles and "
               f"{budget}-token answer budget), got {minimum - 1}")
    with pytest.raises(ValueError) as e:
        make_samples(task, minimum - 1, 4, smol_count_tokens, seed=0, sources=sources)
    assert str(e.value) == message


def test_samples_are_deterministic_by_task_length_seed_and_index(sources):
    for task in ("niah_multikey_1", "vt", "cwe", "fwe"):
        a = make_samples(task, 800, 3, _words, seed=0, sources=sources)
        assert a == make_samples(task, 800, 3, _words, seed=0, sources=sources)
        assert a[2] == make_samples(task, 800, 5, _words, seed=0, sources=sources)[2]
        assert a[0].prompt != a[1].prompt
        b = make_samples(task, 800, 3, _words, seed=1, sources=sources)
        assert all(x.prompt != y.prompt and x.answers != y.answers for x, y in zip(a, b))


def test_refusals_name_the_option(tmp_path, sources):
    all_tasks = ", ".join(RULER_TASKS)
    with pytest.raises(ValueError) as e:
        check_ruler_options(["niah_single_1", "foo"], None, None, None, explicit_tasks=True)
    assert str(e.value) == f"--tasks: expected tasks among {all_tasks}, got foo"
    assert check_ruler_options(list(RULER_TASKS), None, None, None, explicit_tasks=False) == list(RULER_TASKS[:11])
    squad = _squad(tmp_path / "squad.json")
    with_squad = check_ruler_options(list(RULER_TASKS), None, str(squad), None, explicit_tasks=False)
    assert with_squad == list(RULER_TASKS[:12])
    with pytest.raises(ValueError, match=r"^--squad: qa_1 needs a SQuAD v2 dev JSON"):
        check_ruler_options(["vt", "qa_1"], None, None, None, explicit_tasks=True)
    # more samples than the file has answerable questions: refused, not asked twice
    with pytest.raises(ValueError, match=r"^--samples 4: expected at most 3 for qa_1 \(the answerable questions in "):
        make_samples("qa_1", 4000, 4, _words, seed=0, sources=load_sources(squad=str(squad)))
    with pytest.raises(ValueError, match=r"^--hotpotqa: qa_2 needs a HotpotQA dev JSON"):
        check_ruler_options(["qa_2"], None, str(squad), None, explicit_tasks=True)
    with pytest.raises(ValueError, match=r"^--squad .*missing\.json: expected .*, got no such file"):
        check_ruler_options(["vt"], None, str(tmp_path / "missing.json"), None, explicit_tasks=False)
    with pytest.raises(ValueError, match=r"^--hotpotqa .*: expected .*, got a folder"):
        check_ruler_options(["vt"], None, None, str(tmp_path), explicit_tasks=False)
    with pytest.raises(ValueError, match=r"^--essays .*nowhere: expected .*, got no such file or folder"):
        check_ruler_options(["vt"], str(tmp_path / "nowhere"), None, None, explicit_tasks=False)
    with pytest.raises(ValueError, match=r"^--essays .*nowhere: expected .*, got no such file or folder"):
        load_sources(essays=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^--essays .*empty: expected a folder of \.txt files.*got a folder with no"):
        load_sources(essays=str(tmp_path / "empty"))
    (tmp_path / "essays.json").write_text(json.dumps({"essays": "x"}))
    with pytest.raises(ValueError, match=r"^--essays .*essays\.json: expected .*PaulGrahamEssays\.json.*got JSON"):
        load_sources(essays=str(tmp_path / "essays.json"))
    with pytest.raises(ValueError, match=r"^--lengths 100: expected at least \d+ tokens for niah_single_1 "):
        make_samples("niah_single_1", 100, 1, _words, seed=0, sources=sources)
    with pytest.raises(ValueError, match=r"^--lengths 200: expected at least 250 tokens for fwe"):
        make_samples("fwe", 200, 1, _words, seed=0, sources=sources)
    with pytest.raises(ValueError, match=r"^--lengths 90000: expected at most \d+ tokens for cwe \(all \d+ distinct"):
        make_samples("cwe", 90000, 1, _words, seed=0, sources=sources)


def test_essay_sources_and_repetition(tmp_path, sources):
    assert "pydoc_data.topics" in sources.essay_source and len(sources.essay_words) > 10000
    folder = tmp_path / "essays"
    folder.mkdir()
    (folder / "b.txt").write_text("Second essay here.\n")
    (folder / "a.txt").write_text("First essay,   with\n\nspaces. It ends.")
    (folder / "notes.md").write_text("ignored")
    src = load_sources(essays=str(folder))
    assert src.essay_words == ("First", "essay,", "with", "spaces.", "It", "ends.", "Second", "essay", "here.")
    (tmp_path / "PaulGrahamEssays.json").write_text(json.dumps({"text": "One. Two three."}))
    assert load_sources(essays=str(tmp_path / "PaulGrahamEssays.json")).essay_words == ("One.", "Two", "three.")
    s = make_samples("niah_single_2", 400, 1, _words, seed=0, sources=src)[0]
    assert _context(s.prompt).count("Second essay here.") > 10  # the text repeats to fill the length


def test_sentence_splitter():
    text = 'He met Mr. Smith at 5 p.m. today. "Fine," he said. It worked! Did it? yes. J. R. R. Tolkien wrote (1937).'
    assert split_sentences(text) == ['He met Mr. Smith at 5 p.m. today.', '"Fine," he said.', "It worked!",
                                     "Did it? yes.", "J. R. R. Tolkien wrote (1937)."]
    assert " ".join(split_sentences(text)) == text and split_sentences("") == []
