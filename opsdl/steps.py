"""Step bookkeeping of the training loops: prompts and their draw, the learning-rate schedule, what
a step adds up to and logs, checkpoint cadence, interruption and the run's summary."""
from __future__ import annotations

import contextlib
import hashlib
import math
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from .checkpoint import latest_checkpoint
from .data import Example, make_examples
from .options import TrainConfig
from .rollout import prompt_ids


@dataclass
class Prompted:
    example: Example
    student: list[int]  # prompt under the long context
    teacher: list[int]  # prompt under the short context


def prepare_prompts(cfg: TrainConfig, examples: list[Example], tokenizer) -> tuple[list[Prompted], int]:
    """Tokenised student and teacher prompts; examples too long for --max-length raise, or are
    dropped and counted with --truncate drop."""
    kept, dropped = [], 0
    for ex in examples:
        item = Prompted(ex, prompt_ids(tokenizer, ex.long_context, ex.question),
                        prompt_ids(tokenizer, ex.short_context, ex.question))
        longest = len(item.student) + cfg.max_new_tokens
        if longest > cfg.max_length:
            if cfg.truncate == "error":
                raise ValueError(f"example {ex.id!r}: prompt of {len(item.student)} tokens + --max-new-tokens "
                                 f"{cfg.max_new_tokens} exceeds --max-length {cfg.max_length}; raise --max-length "
                                 "or pass --truncate drop to skip such examples")
            dropped += 1
            continue
        kept.append(item)
    if not kept:
        raise ValueError(f"no example fits --max-length {cfg.max_length} ({dropped} dropped)")
    return kept, dropped


def sampling_seed(seed: int, step: int, rank: int, micro_batch: int) -> int:
    """The rollouts' seed of one micro-batch of a step on a rank, drawn from all four: no two ranks,
    steps or micro-batches share one, and a resumed run draws the samples it would have drawn."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}:{micro_batch}".encode()).digest()[:7], "big")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The rate of optimizer step ``step`` (0-based), as Hugging Face schedules it: linear warmup
    from 0 over --warmup-steps, then constant, or linear / cosine decay to 0 at --steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.lr_scheduler == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    if cfg.lr_scheduler == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


@dataclass
class StepStats:
    """What a step's micro-batches add up to: sums only, so that ranks combine theirs in one all-reduce."""
    tokens: float = 0.0  # tokens through the models (prompts and responses)
    rows: float = 0.0  # response tokens trained on (one loss row each)
    loss_sum: float = 0.0
    log_ratio_sum: float = 0.0
    responses: float = 0.0
    answers_found: float = 0.0  # responses holding the expected answer(s), of
    answers_checked: float = 0.0  # the responses that could be checked
    # seconds of each phase (``timed``); the rest of a step is bookkeeping
    rollout_seconds: float = 0.0
    teacher_seconds: float = 0.0
    student_seconds: float = 0.0  # the student's forward to its final hidden states
    loss_seconds: float = 0.0  # the fused loss's forward
    backward_seconds: float = 0.0  # the loss's and the student's backward
    optimizer_seconds: float = 0.0  # clipping, AdamW, the EMA update
    push_seconds: float = 0.0  # the new weights into the rollout engine

    def add(self, loss_sum: float, log_ratio_sum: float, responses: list[list[int]], tokens: int,
            found: list[Optional[bool]]) -> None:
        self.tokens += tokens
        self.rows += sum(len(r) for r in responses)
        self.loss_sum += loss_sum
        self.log_ratio_sum += log_ratio_sum
        self.responses += len(responses)
        checked = [f for f in found if f is not None]
        self.answers_found += sum(checked)
        self.answers_checked += len(checked)


PHASES = ("rollout", "teacher", "student", "loss", "backward", "optimizer", "push")


@contextlib.contextmanager
def timed(stats: StepStats, phase: str, device: torch.device) -> Iterator[None]:
    """Adds the block's seconds to ``stats.<phase>_seconds``; on CUDA it waits for the queued work
    before and after (one synchronisation per phase, a few per step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        name = f"{phase}_seconds"
        setattr(stats, name, getattr(stats, name) + time.perf_counter() - started)


def step_record(cfg: TrainConfig, stats: StepStats, step: int, lr: float, grad_norm: float, seconds: float,
                device: torch.device, out: Path) -> dict:
    """One line of log.jsonl: the step's means, rates and peak memory; a loss that is not finite
    stops the run."""
    if not math.isfinite(stats.loss_sum / stats.rows):
        raise FloatingPointError(f"step {step + 1}: the loss is {stats.loss_sum / stats.rows}; stopping "
                                 f"(see {out / 'log.jsonl'})")
    return {
        "step": step + 1,
        "loss": stats.loss_sum / stats.rows,
        "kl_estimate": (stats.loss_sum if cfg.estimator == "full" else stats.log_ratio_sum) / stats.rows,
        "mean_advantage": -stats.log_ratio_sum / stats.rows,
        "response_length": stats.rows / stats.responses,
        "answer_rate": stats.answers_found / stats.answers_checked if stats.answers_checked else None,
        "grad_norm": grad_norm,
        "lr": lr,
        "seconds": seconds,
        "rollout_seconds": stats.rollout_seconds,
        "phase_seconds": {phase: getattr(stats, f"{phase}_seconds") for phase in PHASES},
        "tokens_per_s": stats.tokens / seconds,
        "peak_memory_mib": peak_memory_mib(device),
    }


def checkpoint_due(cfg: TrainConfig, done: int) -> bool:
    """After ``done`` steps: every --save-every steps, and at the end."""
    return bool(cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps


def interrupted(cfg: TrainConfig, step: int, out: Path) -> KeyboardInterrupt:
    """Ctrl-C: where the run stood, and how --resume continues it."""
    last = latest_checkpoint(out)
    return KeyboardInterrupt(f"during step {step + 1} of {cfg.steps}; " + (
        f"the last checkpoint is {last}: run the same command with --resume to continue from it"
        if last else "no checkpoint was written yet (--save-every K writes one every K steps)"))


def draw_prompts(items: list[Prompted], picker: random.Random, count: int) -> list[Prompted]:
    """A micro-batch's prompts, drawn with replacement by the step's own generator."""
    return [items[picker.randrange(len(items))] for _ in range(count)]


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: the allocator's peak. CPU: this process's peak resident size, VmHWM where /proc has it
    (ru_maxrss keeps, across exec, the peak of the process that spawned this one: a large parent's)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def synthetic_examples(cfg: TrainConfig, tokenizer) -> list[Example]:
    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    return make_examples(cfg.task, cfg.num_examples, cfg.context_tokens, count_tokens, cfg.seed)


def summarize(history: list[dict], out: Path) -> dict:
    if not history:
        return {"steps_run": 0, "out": str(out)}
    mean = lambda key: sum(h[key] for h in history) / len(history)  # noqa: E731
    return {
        "steps_run": len(history),
        "first_loss": history[0]["loss"],
        "last_loss": history[-1]["loss"],
        "mean_seconds_per_step": mean("seconds"),
        "mean_tokens_per_s": mean("tokens_per_s"),
        "peak_memory_mib": max(h["peak_memory_mib"] for h in history),
        "checkpoint": str(latest_checkpoint(out)),
    }
