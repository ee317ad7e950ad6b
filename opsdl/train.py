"""The OPSDL reference training loop, to be read top to bottom.

Per step: sample answers y under (long context, question) with the current model (on-policy) ->
score [short-context prompt ; y] with the teacher, no gradient -> run [long-context prompt ; y]
with gradient -> per-token reverse KL between the two at the response rows (``fused_rkl_loss``;
``--estimator sampled`` is the paper's single-sample estimator, ``full`` the exact KL) -> AdamW.

    opsdl train                      # SmolLM2-135M on synthetic needle retrieval, ~1K tokens, CPU
    python -m opsdl.train --help
"""
from __future__ import annotations

import copy
import json
import math
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from opsdl_kernels import fused_rkl_loss, fused_token_logprobs

from .checkpoint import (append_log, claim_output_dir, is_sharded, latest_checkpoint, load_trainer_state,
                         prune_checkpoints, resume_point, rewind_log, save_checkpoint)
from .data import Example, answer_found, load_examples, make_examples
from .model import (LMHead, check_model_source, enable_checkpointing, lm_head, load_model, packed_hidden_states,
                    resolve_device)
from .options import TrainConfig, check_train_options
from .packing import pack
from .rollout import prompt_ids, sample, stop_ids, turn_end_id

__all__ = ["TrainConfig", "train", "latest_checkpoint"]


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


def gold_answer_ids(tokenizer, example: Example, turn_end: int) -> list[int]:
    """The SFT target: the expected answer(s), comma-separated, then the token that ends the turn."""
    return tokenizer(", ".join(example.answers()), add_special_tokens=False).input_ids + [turn_end]


def response_rows(prompt_lengths: list[int], response_lengths: list[int], starts: list[int]) -> torch.Tensor:
    """Rows of a packed pass whose hidden states predict the response tokens: in a causal LM the
    state at position P - 1 + k predicts y_k, so sequence i contributes start_i + P_i - 1 + k."""
    return torch.cat([torch.arange(s + p - 1, s + p - 1 + r) for s, p, r in zip(starts, prompt_lengths,
                                                                                    response_lengths)])


def packed_rows(model, prompts: list[list[int]], responses: list[list[int]], device) -> torch.Tensor:
    """Final hidden states at the response rows of [prompt ; response] sequences, packed in one row."""
    packed = pack([p + r for p, r in zip(prompts, responses)], device=device)
    hidden = packed_hidden_states(model, packed)
    rows = response_rows([len(p) for p in prompts], [len(r) for r in responses], packed.cu_seqlens[:-1].tolist())
    return hidden[rows.to(device)]


def distillation_loss(cfg: TrainConfig, head: LMHead, teacher_head: LMHead, student_rows, teacher_rows, targets,
                      compute_dtype, reduction: str = "mean"):
    """The per-token loss over the response rows (mean, or sum) and, from the same fused call, the
    per-row sampled log-ratio log p_s(y) - log p_t(y) (logged; the loss itself when --estimator sampled).
    The teacher scores with its own lm-head: a frozen or EMA teacher's head, not the student's
    live one (with tied embeddings the student's head moves every step)."""
    if teacher_head.softcap != head.softcap:
        raise ValueError(f"teacher: its final-logit softcap {teacher_head.softcap} differs from the student's "
                         f"{head.softcap}; the fused loss applies one softcap to both")
    shared = teacher_head.weight is head.weight  # the live teacher: one weight, read once
    teacher_weight = None if shared else _cast(teacher_head.weight, compute_dtype)
    return fused_rkl_loss(student_rows.to(compute_dtype), teacher_rows.to(compute_dtype),
                          _cast(head.weight, compute_dtype), teacher_weight, targets=targets,
                          estimator=cfg.estimator, softcap=head.softcap, bias=_cast(head.bias, compute_dtype),
                          teacher_bias=_cast(teacher_head.bias, compute_dtype), impl=cfg.impl, reduction=reduction,
                          return_log_ratio=True)


def sft_loss(cfg: TrainConfig, head: LMHead, student_rows, targets, compute_dtype, reduction: str = "mean"):
    """The baseline: cross-entropy of the gold answer tokens under the long context (mean, or sum)."""
    return -fused_token_logprobs(student_rows.to(compute_dtype), _cast(head.weight, compute_dtype), targets,
                                 softcap=head.softcap, impl=cfg.impl, reduction=reduction,
                                 bias=_cast(head.bias, compute_dtype))


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


@dataclass
class Teacher:
    model: torch.nn.Module  # the student itself when live
    head: LMHead
    ema: bool  # updated after every optimizer step


def load_teacher_model(cfg: TrainConfig, student, tokenizer, dtype, device):
    """--teacher-model, refused unless it shares the student's tokenizer and vocabulary."""
    teacher, teacher_tokenizer = load_model(cfg.teacher_model, dtype=dtype, device=device,
                                            trust_remote_code=cfg.trust_remote_code)
    student_vocab = lm_head(student).weight.shape[0]
    if lm_head(teacher).weight.shape[0] != student_vocab:
        raise ValueError(f"--teacher-model {cfg.teacher_model}: its vocabulary has "
                         f"{lm_head(teacher).weight.shape[0]} entries, the student's {student_vocab}; "
                         "the teacher must share the student's tokenizer")
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"--teacher-model {cfg.teacher_model}: its tokenizer differs from the student's; the "
                         "teacher scores the student's tokens, so both need the same tokenizer")
    return teacher


def build_teacher(cfg: TrainConfig, student, tokenizer, resume_from: Optional[Path], device,
                  dtype) -> Optional[Teacher]:
    """live: the student's current weights; frozen: its initial weights (reloaded on resume), or
    --teacher-model; ema: a moving average, restored from the checkpoint on resume. A separate
    teacher is checked to share the student's tokenizer and vocabulary."""
    if cfg.objective == "sft":
        return None
    if cfg.teacher == "live":
        return Teacher(student, lm_head(student), ema=False)
    if cfg.teacher_model:
        teacher = load_teacher_model(cfg, student, tokenizer, dtype, device)
    elif cfg.teacher == "ema" and resume_from is not None:
        teacher = AutoModelForCausalLM.from_pretrained(resume_from / "ema", dtype=dtype).to(device)
    elif resume_from is not None:  # frozen: the initial weights, as the first run had them
        teacher = load_model(cfg.model, dtype=dtype, device=device, seed=cfg.seed, rope_factor=cfg.rope_factor,
                             trust_remote_code=cfg.trust_remote_code)[0]
    else:
        teacher = copy.deepcopy(student)
    teacher.eval().requires_grad_(False)
    return Teacher(teacher, lm_head(teacher), ema=cfg.teacher == "ema" and not cfg.teacher_model)


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
    rollout_seconds: float = 0.0

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
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def synthetic_examples(cfg: TrainConfig, tokenizer) -> list[Example]:
    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    return make_examples(cfg.task, cfg.num_examples, cfg.context_tokens, count_tokens, cfg.seed)


def train(cfg: TrainConfig) -> dict:
    # ---- everything that can be refused is refused before the model loads ----------------------
    check_train_options(cfg)
    device = resolve_device(cfg.device)
    check_model_source(cfg.model)
    if cfg.teacher_model:
        check_model_source(cfg.teacher_model, "--teacher-model")
    file_examples = load_examples(cfg.data, cfg.allow_noncontiguous) if cfg.data else None  # names a bad line
    out = Path(cfg.out)
    resume_from = resume_point(out, cfg.resume)
    if resume_from is not None and is_sharded(resume_from):
        raise ValueError(f"--resume {resume_from}: a sharded checkpoint of a torchrun run; continue it under torchrun "
                         "(`torchrun --nproc-per-node 1 -m opsdl train ...` runs it on one device)")
    claim_output_dir(out, cfg)
    if cfg.resume and resume_from is None:
        print(f"opsdl train: --resume found no checkpoint in {out}; starting from step 0")

    # ---- model, tokenizer, resume point ------------------------------------------------------
    # (a checkpoint's config already records its RoPE scaling)
    model, tokenizer = load_model(str(resume_from) if resume_from else cfg.model, dtype=cfg.dtype, device=device,
                                  seed=cfg.seed, rope_factor=1.0 if resume_from else cfg.rope_factor,
                                  trust_remote_code=cfg.trust_remote_code)
    state = load_trainer_state(resume_from) if resume_from else None
    start_step = state["step"] if state else 0
    if cfg.resume:  # the log lines after the checkpoint (all of them when there is none) are run again
        rewind_log(out, start_step)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    head = lm_head(model)

    # ---- teacher: the same weights (live), the initial weights or --teacher-model (frozen), EMA --
    teacher = build_teacher(cfg, model, tokenizer, resume_from, device, model.dtype)

    # ---- data ----------------------------------------------------------------------------------
    items, dropped = prepare_prompts(cfg, file_examples or synthetic_examples(cfg, tokenizer), tokenizer)
    if cfg.objective == "sft" and not all(item.example.answers() for item in items):
        raise ValueError("--objective sft: every example needs an 'answer' (the gold target)")

    turn_end = turn_end_id(tokenizer, stop_ids(model, tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    elif state:
        print(f"opsdl train: {resume_from} holds no optimizer state (--no-save-optimizer); AdamW starts afresh")
    compute_dtype = torch.bfloat16 if cfg.bf16 and device.type == "cuda" else head.weight.dtype
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")
    print(f"opsdl train: {len(items)} examples ({dropped} dropped as too long), objective={cfg.objective}, "
          f"teacher={cfg.teacher_model or cfg.teacher}, estimator={cfg.estimator}, steps {start_step}->{cfg.steps}, "
          f"device={device}, dtype={model.dtype}, out={out}")

    history = []
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="opsdl train")
    step = start_step
    try:
        for step in bar:
            started = time.perf_counter()
            # each step draws its prompts and its samples from its own seed: a resumed run repeats them
            picker = random.Random(f"{cfg.seed}:{step}")
            torch.manual_seed(cfg.seed * 1_000_003 + step)
            stats = StepStats()
            for _ in range(cfg.grad_accum):
                batch = draw_prompts(items, picker, cfg.batch_size)

                if cfg.objective == "sft":
                    # baseline: cross-entropy on the gold answers under the long context, no teacher
                    owners = batch
                    responses = [gold_answer_ids(tokenizer, o.example, turn_end) for o in owners]
                    targets = torch.tensor([t for r in responses for t in r], device=device)
                    with autocast:
                        student_rows = packed_rows(model, [o.student for o in owners], responses, device)
                    loss = sft_loss(cfg, head, student_rows, targets, compute_dtype)
                    log_ratio = torch.zeros(len(targets))
                    (loss / cfg.grad_accum).backward()
                    tokens = sum(len(o.student) + len(r) for o, r in zip(owners, responses))
                else:
                    # 1. on-policy rollouts under the long context
                    rollout_started = time.perf_counter()
                    rollouts = sample(model, tokenizer, [b.student for b in batch], temperature=cfg.temperature,
                                      top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                      samples_per_prompt=cfg.samples_per_prompt)
                    stats.rollout_seconds += time.perf_counter() - rollout_started
                    responses = [r.tokens for r in rollouts]
                    owners = [batch[r.prompt_index] for r in rollouts]
                    targets = torch.tensor([t for r in responses for t in r], device=device)

                    # 2. teacher: [short-context prompt ; y], no gradient
                    with torch.no_grad(), autocast:
                        teacher_rows = packed_rows(teacher.model, [o.teacher for o in owners], responses, device)

                    # 3. student: [long-context prompt ; y], with gradient
                    with autocast:
                        student_rows = packed_rows(model, [o.student for o in owners], responses, device)

                    # 4. per-token reverse KL at the response rows, the teacher with its own head; mean
                    #    over this micro-batch's tokens
                    loss, log_ratio = distillation_loss(cfg, head, teacher.head, student_rows, teacher_rows, targets,
                                                        compute_dtype)
                    (loss / cfg.grad_accum).backward()
                    tokens = sum(len(o.student) + len(o.teacher) + 2 * len(r) for o, r in zip(owners, responses))

                # the drift signal: do the model's own answers hold the expected ones?
                found = [answer_found(tokenizer.decode(r, skip_special_tokens=True), o.example.answers())
                         for o, r in zip(owners, responses)] if cfg.objective == "opsdl" else []
                stats.add(float(loss.detach()) * len(targets), float(log_ratio.sum()), responses, tokens, found)

            # 5. AdamW step at the scheduled rate, with clipping
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if teacher is not None and teacher.ema:
                with torch.no_grad():
                    for p_ema, p in zip(teacher.model.parameters(), model.parameters()):
                        p_ema.lerp_(p, 1.0 - cfg.ema_decay)

            record = step_record(cfg, stats, step, lr, float(grad_norm), time.perf_counter() - started, device, out)
            history.append(record)
            append_log(out, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", answers=record["answer_rate"],
                            tok_s=f"{record['tokens_per_s']:.0f}")

            # 6. checkpoint, keeping the newest --save-total-limit
            done = step + 1
            if checkpoint_due(cfg, done):
                save_checkpoint(out, done, model, tokenizer, optimizer if cfg.save_optimizer else None,
                                teacher.model if teacher is not None and teacher.ema else None, cfg)
                prune_checkpoints(out, cfg.save_total_limit)
    except KeyboardInterrupt:
        raise interrupted(cfg, step, out) from None

    summary = summarize(history, out)
    print(json.dumps(summary, indent=1))
    return summary


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


if __name__ == "__main__":
    from .cli import main

    raise SystemExit(main(["train", *__import__("sys").argv[1:]]))
