"""Accuracy by context length on the synthetic long-context tasks, and a short-context check.

For each model, task and length: fresh evaluation examples (their own seed space, disjoint from any
training seed), greedy answers under the long context, scored by exact match of every expected
value in the output; the short-context check asks the same questions with only the evidence.
Writes ``results.json``, ``results.md`` (task x length per model, each accuracy with its 95% Wilson
interval) and ``accuracy.png`` (when matplotlib is installed: ``pip install matplotlib``).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from .data import answer_found, make_examples
from .files import write_atomic
from .options import EvalConfig, check_device_option

# torch, transformers and the model code load in the functions that need them, so that
# check_eval_options (and ``opsdl eval`` refusing an option) answers without them.
TASKS = ("multikey", "multivalue", "vartrack")


def _csv(text: str, name: str, kind=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{name}: expected a comma-separated list, got {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise ValueError(f"--{name}: expected {kind.__name__} values, got {text!r}") from None


def accuracy(model, tokenizer, contexts: list[str], questions: list[str], answers: list[list[str]],
             batch_size: int, max_new_tokens: int) -> tuple[float, list[str]]:
    """Greedy answers in batches; the share whose text holds every expected answer."""
    from .rollout import prompt_ids, sample

    outputs = []
    for i in range(0, len(questions), batch_size):
        prompts = [prompt_ids(tokenizer, c, q) for c, q in zip(contexts[i:i + batch_size], questions[i:i + batch_size])]
        rollouts = sample(model, tokenizer, prompts, temperature=0.0, max_new_tokens=max_new_tokens)
        outputs += [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in rollouts]
    hits = [answer_found(text, expected) for text, expected in zip(outputs, answers)]
    return sum(bool(h) for h in hits) / len(hits), outputs


def check_eval_options(cfg: EvalConfig) -> tuple[list[str], list[str], list[int]]:
    """Every option that can be refused without torch, before any model loads (``opsdl eval`` runs
    it before importing the rest): the models, tasks and lengths it will evaluate."""
    models, tasks = _csv(cfg.model, "model"), _csv(cfg.tasks, "tasks")
    lengths = _csv(cfg.lengths, "lengths", int)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks: expected tasks among {', '.join(TASKS)}, got {', '.join(unknown)}")
    short = [n for n in lengths if n < 64]
    if short:
        raise ValueError(f"--lengths: expected lengths >= 64 tokens, got {', '.join(map(str, short))}")
    for name in ("samples", "batch_size", "max_new_tokens"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value!r}")
    if not cfg.rope_factor >= 1:
        raise ValueError(f"--rope-factor: expected a number >= 1, got {cfg.rope_factor!r}")
    check_device_option(cfg.device)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ValueError(f"--out {cfg.out}: expected a folder, got a file")
    return models, tasks, lengths


def evaluate(cfg: EvalConfig) -> dict:
    models, tasks, lengths = check_eval_options(cfg)
    from .model import check_model_source, load_model, resolve_device

    for name in models:  # a missing checkpoint is said now, not after the models before it have run
        check_model_source(name)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _finished_rows(out / "results.json", cfg)
    for name in models:
        cells = [(t, n) for t in tasks for n in lengths
                 if not any((r["model"], r["task"], r["length"]) == (name, t, n) for r in rows)]
        if not cells:
            continue
        model, tokenizer = load_model(name, device=device, rope_factor=cfg.rope_factor)

        def count_tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False).input_ids)

        for task, length in tqdm(cells, desc=f"opsdl eval {name}"):
            examples = make_examples(task, cfg.samples, length, count_tokens, cfg.seed, split="eval")
            answers = [e.answers() for e in examples]
            questions = [e.question for e in examples]
            row = {"model": name, "task": task, "length": length, "samples": len(examples)}
            started = time.perf_counter()
            row["accuracy"], outputs = accuracy(model, tokenizer, [e.long_context for e in examples], questions,
                                                answers, cfg.batch_size, cfg.max_new_tokens)
            if cfg.short_context_check:
                row["short_accuracy"], _ = accuracy(model, tokenizer, [e.short_context for e in examples],
                                                    questions, answers, cfg.batch_size, cfg.max_new_tokens)
            row["seconds"] = time.perf_counter() - started
            row["examples"] = [{"id": e.id, "answer": a, "output": o} for e, a, o in zip(examples[:3], answers, outputs)]
            rows.append(row)
            # every finished cell is saved: a killed evaluation continues where it stopped
            write_atomic(out / "results.json", json.dumps({"config": asdict(cfg), "rows": rows}, indent=1))
        del model
    result = {"config": asdict(cfg), "rows": rows}
    write_atomic(out / "results.json", json.dumps(result, indent=1))
    write_atomic(out / "results.md", markdown(rows))
    if importlib.util.find_spec("matplotlib") is not None:
        plot(rows, out / "accuracy.png")
    else:
        print(f"opsdl eval: matplotlib is not installed, so no {out / 'accuracy.png'} "
              "(`pip install matplotlib` to get the plot; the tables are in results.md)")
    print(markdown(rows))
    return result


# settings that change what a cell measures: rows saved under other values are not reused
_CELL_SETTINGS = ("samples", "seed", "max_new_tokens", "short_context_check", "rope_factor")


def _finished_rows(path: Path, cfg: EvalConfig) -> list[dict]:
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    if any(saved["config"].get(k) != getattr(cfg, k) for k in _CELL_SETTINGS):
        return []
    return saved["rows"]


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``hits / n`` (sound at 0 and n, unlike p +- 2 SE)."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _with_interval(accuracies: list[float], counts: list[int]) -> str:
    """Pooled accuracy over cells and its interval: '0.78 [0.63, 0.88]'."""
    hits, n = sum(round(a * c) for a, c in zip(accuracies, counts)), sum(counts)
    low, high = wilson_interval(hits, n)
    return f"{hits / n:.2f} [{low:.2f}, {high:.2f}]"


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
            by_length = " | ".join(_with_interval([cells[n]["accuracy"]], [cells[n]["samples"]]) if n in cells
                                   else "-" for n in lengths)
            short = [c for c in cells.values() if "short_accuracy" in c]
            evidence = _with_interval([c["short_accuracy"] for c in short], [c["samples"] for c in short]) \
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
