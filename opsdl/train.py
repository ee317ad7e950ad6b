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
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from opsdl_kernels import fused_rkl_loss, fused_token_logprobs

from .data import Example, answer_found, load_examples, make_examples
from .model import LMHead, lm_head, load_model, packed_hidden_states
from .options import option
from .packing import pack
from .rollout import prompt_ids, sample, stop_ids, turn_end_id



@dataclass
class TrainConfig:
    model: str = option("smollm2-135m", "local path, hub id, 'smollm2-135m' (embedded) or 'tiny:<family>' (random)")
    data: Optional[str] = option(None, "JSONL of {id, long_context, short_context, question[, answer]}; "
                                     "default: synthetic --task examples")
    task: str = option("multikey", "synthetic task when --data is not given", ("multikey", "multivalue", "vartrack"))
    context_tokens: int = option(1024, "length of the synthetic long contexts, in tokens")
    num_examples: int = option(64, "number of synthetic examples")
    allow_noncontiguous: bool = option(False, "accept a short_context that is not a segment of long_context")
    objective: str = option("opsdl", "opsdl: self-distillation; sft: cross-entropy on the gold answers under "
                                      "the long context (the baseline; needs answers)", ("opsdl", "sft"))
    rope_factor: float = option(1.0, "stretch the RoPE window by this factor (linear scaling) before training")
    teacher: str = option("frozen", "live: current weights (the paper); frozen: initial weights; ema: moving average",
                        ("live", "frozen", "ema"))
    ema_decay: float = option(0.99, "decay of the EMA teacher")
    estimator: str = option("full", "full: exact reverse KL; sampled: the paper's single-sample estimator",
                          ("full", "sampled"))
    steps: int = option(5, "optimizer steps")
    batch_size: int = option(2, "prompts per micro-batch")
    samples_per_prompt: int = option(1, "rollouts per prompt")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-5, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)")
    temperature: float = option(0.7, "rollout sampling temperature (0: greedy)")
    top_p: float = option(1.0, "rollout nucleus sampling")
    max_new_tokens: int = option(24, "rollout length limit")
    max_length: int = option(8192, "longest student sequence (prompt + answer) allowed")
    truncate: str = option("error", "an example longer than --max-length: error, or drop it (counted)",
                         ("error", "drop"))
    seed: int = option(0, "seed of data order, sampling and tiny-model weights")
    device: str = option("auto", "cpu, cuda, or auto")
    bf16: bool = option(False, "bf16 autocast (CUDA)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward")
    impl: str = option("auto", "fused loss implementation", ("auto", "triton", "torch"))
    out: str = option("runs/opsdl", "output folder: log.jsonl, checkpoints")
    save_every: int = option(0, "checkpoint every K steps (0: at the end only)")
    resume: bool = option(False, "continue from the latest checkpoint in --out")


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
                      compute_dtype):
    """The mean per-token loss over the response rows and, from the same fused call, the per-row
    sampled log-ratio log p_s(y) - log p_t(y) (logged; the loss itself when --estimator sampled).
    The teacher scores with its own lm-head: a frozen or EMA teacher's head, not the student's
    live one (with tied embeddings the student's head moves every step)."""
    if teacher_head.softcap != head.softcap:
        raise ValueError(f"teacher: its final-logit softcap {teacher_head.softcap} differs from the student's "
                         f"{head.softcap}; the fused loss applies one softcap to both")

    def cast(t):
        return None if t is None else t.to(compute_dtype)

    shared = teacher_head.weight is head.weight  # the live teacher: one weight, read once
    return fused_rkl_loss(student_rows.to(compute_dtype), teacher_rows.to(compute_dtype), cast(head.weight),
                          None if shared else cast(teacher_head.weight), targets=targets, estimator=cfg.estimator,
                          softcap=head.softcap, bias=cast(head.bias), teacher_bias=cast(teacher_head.bias),
                          impl=cfg.impl, return_log_ratio=True)


def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer, ema_teacher, cfg: TrainConfig) -> Path:
    """checkpoint-<step>/ (safetensors weights, tokenizer, optimizer state, EMA teacher), written
    under a temporary name and renamed, then the ``latest`` pointer replaced: a kill at any moment
    leaves the previous checkpoint intact."""
    final, tmp = out / f"checkpoint-{step:06d}", out / f".tmp-checkpoint-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if ema_teacher is not None:
        ema_teacher.save_pretrained(tmp / "ema", safe_serialization=True)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg)},
               tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = out / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, out / "latest")
    return final


def latest_checkpoint(out: Path) -> Optional[Path]:
    pointer = out / "latest"
    return out / pointer.read_text().strip() if pointer.exists() else None


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(cfg: TrainConfig) -> dict:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- model, tokenizer, resume point ------------------------------------------------------
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        print(f"opsdl train: --resume found no checkpoint in {out}; starting from step 0")
    # (a checkpoint's config already records its RoPE scaling)
    model, tokenizer = load_model(str(resume_from) if resume_from else cfg.model, device=device, seed=cfg.seed,
                                  rope_factor=1.0 if resume_from else cfg.rope_factor)
    state = torch.load(resume_from / "trainer_state.pt", weights_only=False) if resume_from else None
    start_step = state["step"] if state else 0
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    head = lm_head(model)

    # ---- teacher: the same weights (live), the initial weights (frozen), or their EMA ---------
    teacher, ema_teacher = model, None  # (the sft baseline has no teacher)
    if cfg.objective == "sft":
        pass
    elif cfg.teacher == "frozen":
        teacher = (load_model(cfg.model, device=device, seed=cfg.seed, rope_factor=cfg.rope_factor)[0]
                   if resume_from else copy.deepcopy(model))
    elif cfg.teacher == "ema":
        teacher = ema_teacher = (AutoModelForCausalLM.from_pretrained(resume_from / "ema").to(device)
                                 if resume_from else copy.deepcopy(model))
    if teacher is not model:
        teacher.eval().requires_grad_(False)
    teacher_head = lm_head(teacher)

    # ---- data ----------------------------------------------------------------------------------
    if cfg.data:
        examples = load_examples(cfg.data, cfg.allow_noncontiguous)
    else:
        def count_tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False).input_ids)

        examples = make_examples(cfg.task, cfg.num_examples, cfg.context_tokens, count_tokens, cfg.seed)
    items, dropped = prepare_prompts(cfg, examples, tokenizer)
    if cfg.objective == "sft" and not all(item.example.answers() for item in items):
        raise ValueError("--objective sft: every example needs an 'answer' (the gold target)")

    turn_end = turn_end_id(tokenizer, stop_ids(model, tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state:
        optimizer.load_state_dict(state["optimizer"])
    compute_dtype = torch.bfloat16 if cfg.bf16 and device.type == "cuda" else head.weight.dtype
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")
    log_path = out / "log.jsonl"
    print(f"opsdl train: {len(items)} examples ({dropped} dropped as too long), objective={cfg.objective}, "
          f"teacher={cfg.teacher}, estimator={cfg.estimator}, steps {start_step}->{cfg.steps}, device={device}, out={out}")

    history = []
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="opsdl train")
    for step in bar:
        started = time.perf_counter()
        # each step draws its prompts and its samples from its own seed: a resumed run repeats them
        picker = random.Random(f"{cfg.seed}:{step}")
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        stats = {"tokens": 0, "rows": 0, "loss_sum": 0.0, "log_ratio_sum": 0.0, "found": [], "resp_len": []}
        for _ in range(cfg.grad_accum):
            batch = [items[picker.randrange(len(items))] for _ in range(cfg.batch_size)]

            if cfg.objective == "sft":
                # baseline: cross-entropy on the gold answers under the long context, no teacher
                owners = batch
                responses = [gold_answer_ids(tokenizer, o.example, turn_end) for o in owners]
                targets = torch.tensor([t for r in responses for t in r], device=device)
                with autocast:
                    student_rows = packed_rows(model, [o.student for o in owners], responses, device)
                loss = -fused_token_logprobs(student_rows.to(compute_dtype), head.weight.to(compute_dtype),
                                             targets, softcap=head.softcap, impl=cfg.impl, reduction="mean",
                                             bias=None if head.bias is None else head.bias.to(compute_dtype))
                log_ratio = torch.zeros(len(targets))
                (loss / cfg.grad_accum).backward()
                stats["tokens"] += sum(len(o.student) + len(r) for o, r in zip(owners, responses))
            else:
                # 1. on-policy rollouts under the long context
                rollouts = sample(model, tokenizer, [b.student for b in batch], temperature=cfg.temperature,
                                  top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                  samples_per_prompt=cfg.samples_per_prompt)
                responses = [r.tokens for r in rollouts]
                owners = [batch[r.prompt_index] for r in rollouts]
                targets = torch.tensor([t for r in responses for t in r], device=device)

                # 2. teacher: [short-context prompt ; y], no gradient
                with torch.no_grad(), autocast:
                    teacher_rows = packed_rows(teacher, [o.teacher for o in owners], responses, device)

                # 3. student: [long-context prompt ; y], with gradient
                with autocast:
                    student_rows = packed_rows(model, [o.student for o in owners], responses, device)

                # 4. per-token reverse KL at the response rows; mean over this micro-batch's tokens
                loss, log_ratio = distillation_loss(cfg, head, teacher_head, student_rows, teacher_rows, targets,
                                                    compute_dtype)
                (loss / cfg.grad_accum).backward()
                stats["tokens"] += sum(len(o.student) + len(o.teacher) + 2 * len(r)
                                       for o, r in zip(owners, responses))

            stats["rows"] += len(targets)
            stats["loss_sum"] += float(loss.detach()) * len(targets)
            stats["log_ratio_sum"] += float(log_ratio.sum())
            stats["resp_len"] += [len(r) for r in responses]
            if cfg.objective == "opsdl":  # the drift signal: do the model's own answers hold the expected ones?
                stats["found"] += [answer_found(tokenizer.decode(r, skip_special_tokens=True), o.example.answers())
                                   for o, r in zip(owners, responses)]

        # 5. AdamW step with clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema_teacher is not None:
            with torch.no_grad():
                for p_ema, p in zip(ema_teacher.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1.0 - cfg.ema_decay)

        seconds = time.perf_counter() - started
        found = [f for f in stats["found"] if f is not None]
        record = {
            "step": step + 1,
            "loss": stats["loss_sum"] / stats["rows"],
            "kl_estimate": stats["loss_sum"] / stats["rows"] if cfg.estimator == "full"
            else stats["log_ratio_sum"] / stats["rows"],
            "mean_advantage": -stats["log_ratio_sum"] / stats["rows"],
            "response_length": sum(stats["resp_len"]) / len(stats["resp_len"]),
            "answer_rate": sum(found) / len(found) if found else None,
            "grad_norm": float(grad_norm),
            "seconds": seconds,
            "tokens_per_s": stats["tokens"] / seconds,
            "peak_memory_mib": peak_memory_mib(device),
        }
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"step {step + 1}: the loss is {record['loss']}; stopping (see {log_path})")
        history.append(record)
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4f}", answers=record["answer_rate"], tok_s=f"{record['tokens_per_s']:.0f}")

        # 6. checkpoint
        done = step + 1
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            save_checkpoint(out, done, model, tokenizer, optimizer, ema_teacher, cfg)

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
