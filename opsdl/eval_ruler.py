"""``opsdl eval --suite ruler``: RULER's 13 tasks (built offline by ``opsdl.ruler``) as RULER asks them
of a chat model (the task text as the user's turn, RULER's answer prefix after the assistant's turn
opens), scored as RULER scores them, reported in RULER's shape: per model a task x length table
with the per-length average, each score x100 with its 95% interval; the per-length averages of all
models side by side; and each model against the first one on the same samples."""
from __future__ import annotations

import hashlib
import json
from typing import Callable

from .eval_answers import EvalItem
from .intervals import paired_difference, sign_test, wilson_interval
from .options import EvalConfig
from .ruler import QA_OPTIONS, RULER_TASKS, load_sources, make_samples, minimum_length, score, too_short_error


def ruler_prompt_ids(tokenizer, prompt: str, answer_prefix: str) -> list[int]:
    """The prompt RULER sends: the model's chat template around ``prompt`` with the answer prefix
    after the assistant's turn opens; RULER's 'base' template (the bare text and the prefix) when the
    tokenizer has no chat template. Tokenized as one text, as RULER counts it."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer(text + answer_prefix, add_special_tokens=False).input_ids
    return tokenizer(prompt + answer_prefix, add_special_tokens=True).input_ids


def _tokenizer_key(tokenizer) -> str:
    """Tokenizers that split and wrap text alike get the same key: their samples are shared."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((vocab + str(tokenizer.chat_template) + type(tokenizer).__name__).encode()).hexdigest()


class RulerSuite:
    results_name = "ruler"

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.sources = load_sources(cfg.essays, cfg.squad, cfg.hotpotqa)
        files = {"qa_1": cfg.squad, "qa_2": cfg.hotpotqa}
        # the default task list leaves out the QA tasks whose files are not given: said in the report
        self.not_run = {} if cfg.tasks is not None else \
            {task: f"no {QA_OPTIONS[task]} file given" for task, path in files.items() if path is None}
        self._samples: dict[tuple[str, str, int], list] = {}

    def _count_tokens(self, tokenizer) -> Callable[[str, str], int]:
        return lambda prompt, answer_prefix: len(ruler_prompt_ids(tokenizer, prompt, answer_prefix))

    def check_lengths(self, tokenizer, tasks: list[str], lengths: list[int]) -> None:
        """A length too short for a task's template, needles and answer budget, refused in one line."""
        count = self._count_tokens(tokenizer)
        for task in tasks:
            need = minimum_length(task, count, self.sources)
            short = [n for n in lengths if n < need]
            if short:
                raise too_short_error(task, short[0], need)

    def items(self, task: str, length: int, tokenizer) -> list[EvalItem]:
        key = (_tokenizer_key(tokenizer), task, length)
        if key not in self._samples:  # the same samples for every model with this tokenizer
            self._samples[key] = make_samples(task, length, self.cfg.samples, self._count_tokens(tokenizer),
                                              self.cfg.seed, self.sources)
        return [EvalItem(f"{task}-{length}-{s.index}", ruler_prompt_ids(tokenizer, s.prompt, s.answer_prefix),
                         None if s.evidence_prompt is None
                         else ruler_prompt_ids(tokenizer, s.evidence_prompt, s.answer_prefix),
                         tuple(s.answers), self.cfg.max_new_tokens or s.max_new_tokens)
                for s in self._samples[key]]

    def score(self, task: str, output: str, answers: tuple[str, ...]) -> float:
        return score(task, output, answers)

    def describe(self) -> dict:
        return {"sources": {"essays": self.sources.essay_source, "squad": self.sources.squad_source,
                            "hotpotqa": self.sources.hotpotqa_source},
                "not_run": self.not_run}

    def report(self, rows: list[dict]) -> str:
        return markdown(rows, self.describe())

    def draw(self, rows: list[dict], out) -> None:
        pass  # the tables are the report


def _cell(scores: list[float]) -> str:
    """Mean score x100 and its 95% interval: '62.5 [30.6, 86.3]'."""
    low, high = wilson_interval(sum(scores), len(scores))
    return f"{100 * sum(scores) / len(scores):.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _change(scores: list[float], baseline: list[float]) -> str:
    mean, low, high = paired_difference(scores, baseline)
    return f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def markdown(rows: list[dict], described: dict) -> str:
    """The tables of the module docstring, with the haystack source and the tasks not run."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    tasks = [t for t in RULER_TASKS if any(r["task"] == t for r in rows)]
    cell = {(r["model"], r["task"], r["length"]): r for r in rows}

    def length_scores(model: str, length: int, key: str = "scores") -> list[float]:
        """Every sample's score at one length, tasks in RULER's order (the average's samples)."""
        return [s for t in tasks if (model, t, length) in cell for s in cell[model, t, length].get(key, [])]

    sources = described["sources"]
    lines = ["# RULER, offline", "",
             f"Essay haystack: {sources['essays']}.",
             f"qa_1 (SQuAD): {sources['squad'] or 'not run: ' + described['not_run'].get('qa_1', 'not asked')}.",
             f"qa_2 (HotpotQA): {sources['hotpotqa'] or 'not run: ' + described['not_run'].get('qa_2', 'not asked')}.",
             "Scores: RULER's (string_match_all: the share of expected strings in the answer; string_match_part "
             "for QA: any), x100, the mean over samples with its 95% Wilson interval in brackets; the average of a "
             f"length is the mean over the {len(tasks)} of RULER's {len(RULER_TASKS)} tasks run here (equal samples "
             "per task), comparable to RULER's own average only when all 13 ran. Evidence only: the same questions "
             "with only the needles / chain / RULER's gold documents as context, pooled over lengths.", "",
             f"## Per-length average ({len(tasks)} of {len(RULER_TASKS)} tasks)", "",
             "| model | " + " | ".join(f"{n}" for n in lengths) + " | mean of lengths |",
             "|---|" + "---|" * (len(lengths) + 1)]
    for model in models:
        averages = [length_scores(model, n) for n in lengths]
        shown = [_cell(a) if a else "-" for a in averages]
        means = [sum(a) / len(a) for a in averages if a]
        overall = f"{100 * sum(means) / len(means):.1f}" if means else "-"
        lines.append(f"| {model} | " + " | ".join(shown) + f" | {overall} |")
    for model in models:
        lines += ["", f"## {model}", "", "| task | " + " | ".join(f"{n}" for n in lengths) + " | evidence only |",
                  "|---|" + "---|" * (len(lengths) + 1)]
        for task in tasks:
            by_length = [_cell(cell[model, task, n]["scores"]) if (model, task, n) in cell else "-" for n in lengths]
            evidence = [s for n in lengths if (model, task, n) in cell for s in cell[model, task, n].get("short_scores", [])]
            lines.append(f"| {task} | " + " | ".join(by_length) + f" | {_cell(evidence) if evidence else '-'} |")
        averages = [length_scores(model, n) for n in lengths]
        lines.append("| **average** | " + " | ".join(_cell(a) if a else "-" for a in averages) + " | |")
        seconds = sum(r["seconds"] for r in rows if r["model"] == model)
        lines += ["", f"Time: {seconds:.0f} s over {sum(r['model'] == model for r in rows)} cells "
                      f"({rows[[r['model'] for r in rows].index(model)]['engine']})."]
    if len(models) > 1:
        lines += _comparisons(models, tasks, lengths, cell, length_scores)
    return "\n".join(lines) + "\n"


def _comparisons(models, tasks, lengths, cell, length_scores) -> list[str]:
    """Each model against the first on the same samples: the cells where the exact sign test of the
    per-sample differences gives p < 0.05, and how many did not move."""
    base = models[0]
    lines = ["", f"## Against {base}, on the same samples", "",
             "Change in points with the 95% normal interval of the paired mean difference (mean +- 1.96 sd / "
             "sqrt(n)), and the two-sided exact sign test's p over the samples whose score changed; listed where "
             "p < 0.05.", "",
             "| model | task | length | change | sign test p |", "|---|---|---|---|---|"]
    unmoved = {}
    for model in models[1:]:
        unmoved[model] = 0
        for length in lengths:
            pairs = [(t, cell[model, t, length]["scores"], cell[base, t, length]["scores"]) for t in tasks
                     if (model, t, length) in cell and (base, t, length) in cell]
            ours, theirs = length_scores(model, length), length_scores(base, length)
            if len(ours) == len(theirs) and ours:
                pairs.append(("**average**", ours, theirs))
            for task, scores, baseline in pairs:
                if len(scores) != len(baseline):
                    continue  # other sample counts: not the same samples
                p = sign_test(scores, baseline)
                if p < 0.05:
                    lines.append(f"| {model} | {task} | {length} | {_change(scores, baseline)} | {p:.2g} |")
                else:
                    unmoved[model] += 1
    lines += [""] + [f"{model}: {count} other cells (task or average x length) with p >= 0.05."
                     for model, count in unmoved.items()]
    return lines

