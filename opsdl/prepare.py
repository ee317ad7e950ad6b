"""(long context, short context, question) triplets from a user's own long documents.

The paper's data step: for each long document C_L take contiguous segments C_S that fit the model's
well-trained window, have the model itself write a pool of questions about C_S (Self-Instruct), and
keep the ones that pass simple filters. No answers and no external labeller. The output is the
training JSONL of ``opsdl train --data``, with provenance: the source documents and the character
offsets of C_S in C_L (``long_context[start:end] == short_context``).
"""
from __future__ import annotations

import json
import os
import pydoc
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tqdm import tqdm

from .data import DataError, check_input_file, read_jsonl
from .files import write_atomic
from .options import PrepareConfig

DEFAULT_TEMPLATE = (
    "Read the passage below and write {n} different questions that can be answered using only this "
    "passage. Write one question per line, each ending with a question mark.\n\nPassage:\n{segment}"
)
_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+|\n\s*\n")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{3,}")
_STOPWORDS = frozenset(
    "this that with from what which when where does have about these those their there would could should "
    "into your will been were they them than then each other such only also more most some many much".split())


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass
class PrepareStats:
    documents: int = 0
    segments: int = 0
    generated: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"documents": self.documents, "segments": self.segments, "generated": self.generated,
                "kept": self.kept, "dropped": dict(self.dropped)}


# ---- reading documents ------------------------------------------------------------------------

def read_documents(path: Path) -> list[Document]:
    """A JSONL file of {"text"[, "id"]} objects, or a folder of .txt/.md files (sorted by name): what
    ``--docs`` names, and the errors say so."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise DataError(f"--docs {path}: expected a folder with .txt or .md files, got none in it")
        docs = []
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                raise DataError(f"{f}: the document is empty")
            docs.append(Document(str(f.relative_to(path)), text))
        return docs
    if not path.is_file():
        raise DataError(f"--docs {path}: no such file or folder")
    docs = []
    for lineno, where, record in read_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{where}: field 'text': expected an object with a string 'text'")
        if not record["text"].strip():
            raise DataError(f"{where}: field 'text': the document is empty")
        docs.append(Document(str(record.get("id", f"line{lineno}")), record["text"]))
    if not docs:
        raise DataError(f"--docs {path}: no documents (the file is empty)")
    return docs


def pydoc_documents(modules: Sequence[str]) -> list[Document]:
    """Python's own documentation as real long text: pydoc's plain-text rendering of each module."""
    docs = []
    for name in modules:
        try:
            text = pydoc.render_doc(name, renderer=pydoc.plaintext)
        except (ImportError, pydoc.ErrorDuringImport) as e:
            raise DataError(f"--pydoc: module {name!r} cannot be documented: {e}") from None
        docs.append(Document(f"pydoc:{name}", text))
    return docs


# ---- long contexts and segments ---------------------------------------------------------------

def long_contexts(docs: Sequence[Document], target_tokens: int,
                  count_tokens: Callable[[str], int]) -> Iterator[tuple[list[str], str]]:
    """Documents used whole, or consecutive ones joined (blank line between) until the target
    length is reached; yields (source ids, text)."""
    group, text, tokens = [], "", 0
    for doc in docs:
        group.append(doc.id)
        text = doc.text if not text else text + "\n\n" + doc.text
        tokens += count_tokens(doc.text)
        if tokens >= target_tokens:
            yield group, text
            group, text, tokens = [], "", 0
    if group:
        yield group, text


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of sentences and paragraphs: a segment never starts or ends inside one."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if text[start:m.start()].strip():
            spans.append((start, m.start()))
        start = m.end()
    if text[start:].strip():
        spans.append((start, len(text.rstrip())))
    return spans


def pick_segments(text: str, segment_tokens: int, count: int, count_tokens: Callable[[str], int],
                  rng: random.Random) -> list[tuple[int, int]]:
    """Up to ``count`` non-overlapping segments of about ``segment_tokens`` tokens, each a run of
    whole sentences: (start, end) character offsets into ``text``."""
    spans = sentence_spans(text)
    sizes = [count_tokens(text[a:b]) for a, b in spans]
    candidates = []
    for i in range(len(spans)):
        total, j = 0, i
        while j < len(spans) and total < segment_tokens:
            total += sizes[j]
            j += 1
        if total >= segment_tokens // 2:
            candidates.append((i, j))
    rng.shuffle(candidates)
    chosen: list[tuple[int, int]] = []
    for i, j in candidates:
        if len(chosen) == count:
            break
        if all(j <= a or i >= b for a, b in chosen):
            chosen.append((i, j))
    return sorted((spans[i][0], spans[j - 1][1]) for i, j in chosen)


# ---- question filters --------------------------------------------------------------------------

def parse_questions(generated: str) -> list[str]:
    """One candidate per line, list markers ("1.", "-", "Q:") stripped."""
    out = []
    for line in generated.splitlines():
        line = re.sub(r"^\s*(?:\d+[.)]|[-*•]|Q\d*[:.)]|Question\s*\d*[:.)])\s*", "", line).strip()
        if line:
            out.append(line)
    return out


def content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)} - _STOPWORDS


def filter_questions(candidates: Sequence[str], segment: str, seen: set[str], max_tokens: int,
                     count_tokens: Callable[[str], int], dropped: Counter) -> list[str]:
    """Keep questions that are non-empty, end with '?', are not over-long, are new (case and spacing
    folded), and share a content word with the segment; count why the rest were dropped."""
    words = content_words(segment)
    kept = []
    for q in candidates:
        key = " ".join(q.lower().split())
        if not q.strip("?").strip():
            dropped["empty"] += 1
        elif not q.endswith("?"):
            dropped["not a question"] += 1
        elif count_tokens(q) > max_tokens:
            dropped["too long"] += 1
        elif key in seen:
            dropped["duplicate"] += 1
        elif not content_words(q) & words:
            dropped["nothing from the segment"] += 1
        else:
            seen.add(key)
            kept.append(q)
    return kept


# ---- checks before anything loads ------------------------------------------------------------

def read_template(cfg: PrepareConfig) -> str:
    """The question prompt: ``--template FILE`` or the default; it must format with {n} and {segment}."""
    if not cfg.template:
        return DEFAULT_TEMPLATE
    template = check_input_file("--template", cfg.template).read_text(encoding="utf-8", errors="replace")
    if "{segment}" not in template:
        raise DataError(f"--template {cfg.template}: expected a {{segment}} placeholder, got none")
    try:
        template.format(n=1, segment="")
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"--template {cfg.template}: expected only the {{n}} and {{segment}} placeholders (write "
                        f"other braces as {{{{ and }}}}), got {type(e).__name__}: {e}") from None
    return template


def check_prepare_options(cfg: PrepareConfig) -> None:
    """Everything about the options that can be refused without torch, before the model loads:
    ``opsdl prepare`` runs it before importing the rest. Each message names the option, what it
    expects and what it got."""
    if bool(cfg.docs) == bool(cfg.pydoc):
        raise DataError("give exactly one of --docs PATH and --pydoc MODULES" +
                        (f" (got both: --docs {cfg.docs} --pydoc {cfg.pydoc})" if cfg.docs else " (got neither)"))
    if cfg.docs and not Path(cfg.docs).exists():
        raise DataError(f"--docs {cfg.docs}: no such file or folder")
    if cfg.pydoc is not None and not [m for m in cfg.pydoc.split(",") if m.strip()]:
        raise DataError(f"--pydoc: expected comma-separated module names, got {cfg.pydoc!r}")
    for name in ("context_tokens", "segment_tokens", "segments_per_doc", "questions_per_segment", "pool_size",
                 "max_question_tokens", "max_new_tokens", "batch_size"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value!r}")
    if not cfg.temperature >= 0:
        raise DataError(f"--temperature: expected a number >= 0 (0: greedy), got {cfg.temperature!r}")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise DataError(f"--device: expected cpu, cuda, cuda:N or auto, got {cfg.device!r}")
    read_template(cfg)
    _check_out(Path(cfg.out), cfg.overwrite)


# ---- the driver ----------------------------------------------------------------------------------


def _progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress.json")


def _check_out(out: Path, overwrite: bool) -> dict | None:
    """--out is new, an interrupted run's (it has a progress file: returned), empty, or --overwrite
    was given. A finished run's output has no progress file: it is refused, not appended to."""
    if out.is_dir():
        raise DataError(f"--out {out}: expected a JSONL file path, got a folder")
    progress = _progress_path(out)
    if progress.exists():
        try:
            state = json.loads(progress.read_text())
            recorded = state["bytes"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"--out {out}: its progress file {progress} is unreadable; remove it and pass "
                            "--overwrite to start over") from None
        if not out.is_file() or out.stat().st_size < recorded:
            raise DataError(f"--out {out}: shorter than its progress file records ({recorded} bytes); remove "
                            f"{progress} to start over")
        return state
    if out.exists() and out.stat().st_size and not overwrite:
        raise DataError(f"--out {out}: exists and has no progress file (a finished run); pass --overwrite to start "
                        "over, or give another --out")
    return None


def _load_progress(out: Path, overwrite: bool) -> tuple[set[str], PrepareStats]:
    """Resume: cut --out back to the last finished document group and skip the groups done."""
    state = _check_out(out, overwrite)
    if state is not None:
        os.truncate(out, state["bytes"])  # drops a document group whose writing was cut short
        stats = PrepareStats(**{k: v for k, v in state["stats"].items() if k != "dropped"})
        stats.dropped.update(state["stats"]["dropped"])
        return set(state["done"]), stats
    out.write_text("")
    _save_progress(out, set(), PrepareStats())  # a run killed in its first group resumes too
    return set(), PrepareStats()


def _save_progress(out: Path, done: set[str], stats: PrepareStats) -> None:
    write_atomic(_progress_path(out),
                 json.dumps({"done": sorted(done), "bytes": out.stat().st_size, "stats": stats.as_dict()}))


def _finish(out: Path) -> None:
    """Every group is written and synced to disk: the progress file goes (one unlink, atomic), and
    the folder is synced so that it stays gone. A run killed before this keeps it, and its rerun
    finds every group done and finishes here."""
    _progress_path(out).unlink(missing_ok=True)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare(cfg: PrepareConfig) -> PrepareStats:
    check_prepare_options(cfg)  # options, documents and template are refused before torch loads
    docs = read_documents(Path(cfg.docs)) if cfg.docs else pydoc_documents(
        [m.strip() for m in cfg.pydoc.split(",") if m.strip()])
    template = read_template(cfg)

    import torch

    from .model import load_model, resolve_device
    from .rollout import chat_ids, sample

    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, device=device, seed=cfg.seed)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    out = Path(cfg.out)
    done, stats = _load_progress(out, cfg.overwrite)
    groups = list(long_contexts(docs, cfg.context_tokens, count_tokens))
    for sources, text in tqdm(groups, desc="opsdl prepare"):
        key = "+".join(sources)
        if key in done:
            continue
        rng = random.Random(f"{cfg.seed}:{key}")
        segments = pick_segments(text, cfg.segment_tokens, cfg.segments_per_doc, count_tokens, rng)
        torch.manual_seed(rng.randrange(2**31))
        pools = []
        for i in range(0, len(segments), cfg.batch_size):
            batch = segments[i:i + cfg.batch_size]
            prompts = [chat_ids(tokenizer, template.format(n=cfg.pool_size, segment=text[a:b])) for a, b in batch]
            rollouts = sample(model, tokenizer, prompts, temperature=cfg.temperature,
                              max_new_tokens=cfg.max_new_tokens)
            pools += [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in rollouts]
        lines, seen = [], set()
        for (a, b), generated in zip(segments, pools):
            candidates = parse_questions(generated)
            stats.generated += len(candidates)
            kept = filter_questions(candidates, text[a:b], seen, cfg.max_question_tokens, count_tokens, stats.dropped)
            chosen = rng.sample(kept, min(cfg.questions_per_segment, len(kept)))
            if len(kept) > len(chosen):
                stats.dropped["beyond --questions-per-segment"] += len(kept) - len(chosen)
            for k, question in enumerate(chosen):
                lines.append(json.dumps({
                    "id": f"{key}@{a}-{b}#{k}", "long_context": text, "short_context": text[a:b],
                    "question": question, "source": {"documents": sources, "start": a, "end": b},
                }, ensure_ascii=False))
            stats.kept += len(chosen)
        stats.documents += len(sources)
        stats.segments += len(segments)
        with out.open("a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        done.add(key)
        _save_progress(out, done, stats)
    _finish(out)
    print(f"opsdl prepare: {stats.kept} questions kept from {stats.generated} generated over {stats.segments} "
          f"segments of {stats.documents} documents; dropped: {dict(stats.dropped) or 'none'} -> {out}")
    return stats
