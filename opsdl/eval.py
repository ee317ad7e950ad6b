"""``opsdl eval``: accuracy by context length, and a short-context check, on a suite of tasks: our
synthetic needle tasks (``--suite synthetic``) or RULER's 13 (``--suite ruler``, ``opsdl.eval_ruler``).

For each model, task and length: fresh evaluation samples (their own seed space, disjoint from any
training seed; the same for every model with the same tokenizer), greedy answers under the long
context from the rollout engine (``opsdl.eval_answers``: vLLM where installed), scored per sample;
the short-context check asks the same questions with only the evidence. Every finished cell is
saved with its time. Synthetic: ``results.json``, ``results.md`` (task x length per model, each
accuracy with its 95% Wilson interval) and ``accuracy.png`` (when matplotlib is installed: ``pip
install matplotlib``); RULER: ``ruler.json`` and ``ruler.md``, so both can share one --out.
"""
from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from .files import write_atomic
from .options import VLLM_NOT_INSTALLED, EvalConfig, check_device_option, eval_wording

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


def check_eval_options(cfg: EvalConfig) -> tuple[list[str], list[str], list[int]]:
    """Every option that can be refused without torch, before any model loads (``opsdl eval`` runs
    it before importing the rest): the models, tasks and lengths it will evaluate."""
    models, lengths = _csv(cfg.model, "model"), _csv(cfg.lengths, "lengths", int)
    requested = _csv(cfg.tasks, "tasks") if cfg.tasks is not None else None
    if cfg.suite == "ruler":
        from .ruler import RULER_TASKS, check_ruler_options

        tasks = check_ruler_options(requested or list(RULER_TASKS), cfg.essays, cfg.squad, cfg.hotpotqa,
                                    explicit_tasks=requested is not None)
    else:
        tasks = requested or list(TASKS)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"--tasks: expected tasks among {', '.join(TASKS)}, got {', '.join(unknown)}")
        given = [name for name in ("essays", "squad", "hotpotqa") if getattr(cfg, name) is not None]
        if given:
            raise ValueError(f"--{given[0]}: expected only with --suite ruler, got --suite {cfg.suite}")
    short = [n for n in lengths if n < 64]
    if short:
        raise ValueError(f"--lengths: expected lengths >= 64 tokens, got {', '.join(map(str, short))}")
    for name in ("samples", "batch_size", "max_new_tokens"):
        value = getattr(cfg, name)
        if name == "max_new_tokens" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value!r}")
    if not cfg.rope_factor >= 1:
        raise ValueError(f"--rope-factor: expected a number >= 1, got {cfg.rope_factor!r}")
    if not cfg.cache_gib > 0:
        raise ValueError(f"--cache-gib: expected a number > 0, got {cfg.cache_gib!r}")
    if cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError(eval_wording(f"--rollout-engine vllm: {VLLM_NOT_INSTALLED}"))
    check_device_option(cfg.device)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ValueError(f"--out {cfg.out}: expected a folder, got a file")
    return models, tasks, lengths


def _suite(cfg: EvalConfig):
    if cfg.suite == "ruler":
        from .eval_ruler import RulerSuite

        return RulerSuite(cfg)
    from .eval_synthetic import SyntheticSuite

    return SyntheticSuite(cfg)


def evaluate(cfg: EvalConfig) -> dict:
    models, tasks, lengths = check_eval_options(cfg)
    from .eval_answers import Answerer
    from .model import check_model_source, load_tokenizer, resolve_device

    for name in models:  # a missing checkpoint is said now, not after the models before it have run
        check_model_source(name)
    device = resolve_device(cfg.device)
    suite = _suite(cfg)
    tokenizers = {name: load_tokenizer(name) for name in models}
    for tokenizer in tokenizers.values():  # a length too short for a task: said before any model loads
        suite.check_lengths(tokenizer, tasks, lengths)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / f"{suite.results_name}.json"
    rows = _finished_rows(results, cfg, suite.describe())

    def save() -> None:
        write_atomic(results, json.dumps({"config": asdict(cfg), **suite.describe(), "rows": rows}, indent=1))

    for name in models:
        cells = [(t, n) for t in tasks for n in lengths
                 if not any((r["model"], r["task"], r["length"]) == (name, t, n) for r in rows)]
        if not cells:
            continue
        # every prompt first: the engine is sized to the longest
        items = {cell: suite.items(*cell, tokenizers[name]) for cell in tqdm(cells, desc=f"opsdl eval: samples for {name}")}
        longest = max(len(p) + i.max_new_tokens for cell in items.values() for i in cell
                      for p in (i.prompt, i.evidence_prompt or []))
        answerer = Answerer(cfg, name, device, longest)
        print(f"opsdl eval: {name}: {answerer.description}")
        try:
            for task, length in tqdm(cells, desc=f"opsdl eval {name}"):
                row = _measure(cfg, suite, answerer, name, task, length, items.pop((task, length)))
                rows.append(row)
                tqdm.write(f"opsdl eval: {name} {task} {length} tokens: {row['accuracy']:.3f} "
                           f"({row['samples']} samples, {row['seconds']:.1f} s)")
                save()  # every finished cell is saved: a killed evaluation continues where it stopped
        finally:
            answerer.close()
    save()
    table = suite.report(rows)
    write_atomic(out / f"{suite.results_name}.md", table)
    suite.draw(rows, out)
    print(table)
    return {"config": asdict(cfg), **suite.describe(), "rows": rows}


def _measure(cfg: EvalConfig, suite, answerer, name: str, task: str, length: int, items: list) -> dict:
    """One cell: greedy answers under the long context and, with --short-context-check, under the
    evidence alone (one engine call for both), scored per sample."""
    started = time.perf_counter()
    evidence = [i for i in items if i.evidence_prompt is not None] if cfg.short_context_check else []
    outputs = answerer.answers([i.prompt for i in items] + [i.evidence_prompt for i in evidence],
                               items[0].max_new_tokens)
    long_outputs, short_outputs = outputs[:len(items)], outputs[len(items):]
    scores = [suite.score(task, o, i.answers) for o, i in zip(long_outputs, items)]
    row = {"model": name, "task": task, "length": length, "samples": len(items),
           "prompt_tokens": round(sum(len(i.prompt) for i in items) / len(items), 1),
           "accuracy": sum(scores) / len(scores), "scores": scores}
    if evidence:
        short_scores = [suite.score(task, o, i.answers) for o, i in zip(short_outputs, evidence)]
        row["short_accuracy"], row["short_scores"] = sum(short_scores) / len(short_scores), short_scores
    row["seconds"] = time.perf_counter() - started
    row["engine"] = answerer.description
    row["examples"] = [{"id": i.id, "answer": list(i.answers), "output": o} for i, o in zip(items, long_outputs)]
    return row


# settings that change what a cell measures: rows saved under other values are not reused
_CELL_SETTINGS = ("suite", "samples", "seed", "max_new_tokens", "short_context_check", "rope_factor", "bf16", "essays",
                  "squad", "hotpotqa")


def _finished_rows(path: Path, cfg: EvalConfig, described: dict) -> list[dict]:
    """The cells a killed or earlier evaluation into --out finished, when measured as this one would
    measure them; a file measured otherwise is refused, naming the setting, never overwritten."""
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    old_defaults = {"suite": "synthetic"}  # files from before the option existed
    for key in _CELL_SETTINGS:
        then, now = saved["config"].get(key, old_defaults.get(key, "(not recorded)")), getattr(cfg, key)
        if then != now:
            raise ValueError(f"--out {path.parent}: {path.name} holds cells measured with {key}={then!r}, not "
                             f"{now!r}; give another --out (or move {path.name} away) to measure anew")
    for key, now in described.get("sources", {}).items():
        then = saved.get("sources", {}).get(key)
        if then != now:
            raise ValueError(f"--out {path.parent}: {path.name} holds cells measured on {key} {then!r}, not {now!r}; "
                             "give another --out (or move it away) to measure anew")
    return saved["rows"]
