"""``opsdl eval --suite synthetic``: our needle tasks (``opsdl.data``: multikey, multivalue, vartrack),
accuracy = every expected value in the answer; ``results.md`` (task x length per model with 95%
Wilson intervals) and ``accuracy.png``."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .data import answer_found, make_examples
from .eval_answers import EvalItem
from .intervals import with_interval
from .options import EvalConfig


class SyntheticSuite:
    """Our needle tasks (``opsdl.data``): accuracy = every expected value in the answer."""

    results_name = "results"

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.max_new_tokens = cfg.max_new_tokens or 64

    def check_lengths(self, tokenizer, tasks: list[str], lengths: list[int]) -> None:
        pass  # any length >= 64 (check_eval_options) holds the synthetic tasks

    def items(self, task: str, length: int, tokenizer) -> list[EvalItem]:
        from .rollout import prompt_ids

        def count_tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False).input_ids)

        examples = make_examples(task, self.cfg.samples, length, count_tokens, self.cfg.seed, split="eval")
        return [EvalItem(e.id, prompt_ids(tokenizer, e.long_context, e.question),
                         prompt_ids(tokenizer, e.short_context, e.question), tuple(e.answers()), self.max_new_tokens)
                for e in examples]

    def score(self, task: str, output: str, answers: tuple[str, ...]) -> float:
        return float(bool(answer_found(output, answers)))

    def describe(self) -> dict:
        return {}

    def report(self, rows: list[dict]) -> str:
        return markdown(rows)

    def draw(self, rows: list[dict], out: Path) -> None:
        if importlib.util.find_spec("matplotlib") is not None:
            plot(rows, out / "accuracy.png")
        else:
            print(f"opsdl eval: matplotlib is not installed, so no {out / 'accuracy.png'} "
                  "(`pip install matplotlib` to get the plot; the tables are in results.md)")


def markdown(rows: list[dict]) -> str:
    """Accuracy per model, task and length, and the evidence-only accuracy pooled over lengths;
    each with its 95% interval in brackets."""
    lengths = sorted({r["length"] for r in rows})
    lines = ["| model | task | " + " | ".join(f"{n} tokens" for n in lengths) + " | evidence only |",
             "|---|---|" + "---|" * (len(lengths) + 1)]
    for model in dict.fromkeys(r["model"] for r in rows):
        for task in dict.fromkeys(r["task"] for r in rows):
            cells = {r["length"]: r for r in rows if r["model"] == model and r["task"] == task}
            if not cells:
                continue
            by_length = " | ".join(with_interval([cells[n]["accuracy"]], [cells[n]["samples"]]) if n in cells
                                   else "-" for n in lengths)
            short = [c for c in cells.values() if "short_accuracy" in c]
            evidence = with_interval([c["short_accuracy"] for c in short], [c["samples"] for c in short]) \
                if short else "-"
            lines.append(f"| {model} | {task} | {by_length} | {evidence} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for model in dict.fromkeys(r["model"] for r in rows):
            points = sorted((r["length"], r["accuracy"]) for r in rows if r["model"] == model and r["task"] == task)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_title(task)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
