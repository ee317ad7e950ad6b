"""The OPSDL reference training loop, to be read top to bottom.

Per step: sample answers y under (long context, question) with the current model (on-policy) ->
score [short-context prompt ; y] with the teacher, no gradient -> run [long-context prompt ; y]
with gradient -> per-token reverse KL between the two at the response rows (``fused_rkl_loss``;
``--estimator sampled`` is the paper's single-sample estimator, ``full`` the exact KL) -> AdamW.

    opsdl train                      # SmolLM2-135M on synthetic needle retrieval, ~1K tokens, CPU
    opsdl train --help
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import (append_log, claim_output_dir, is_sharded, latest_checkpoint, load_trainer_state,
                         prune_checkpoints, resume_point, rewind_log, save_checkpoint)
from .data import answer_found, load_examples
from .model import check_model_source, enable_checkpointing, lm_head, load_model, resolve_device
from .objective import ComputeHeads, build_teacher, distillation_loss, gold_answer_ids, packed_rows, sft_loss, update_ema
from .options import TrainConfig, check_train_options
from .precision import compute_dtype as choose_compute_dtype
from .rollout import stop_ids, turn_end_id
from .rollout_engines import open_rollout_engine, resolve_rollout_engine
from .steps import (StepStats, checkpoint_due, draw_prompts, interrupted, learning_rate, prepare_prompts,
                    sampling_seed, step_record, summarize, synthetic_examples, timed)

__all__ = ["TrainConfig", "train", "latest_checkpoint"]


def train(cfg: TrainConfig) -> dict:
    # ---- everything that can be refused is refused before the model loads ----------------------
    check_train_options(cfg)
    device = resolve_device(cfg.device)
    compute_dtype, precision = choose_compute_dtype(cfg.bf16, device)
    engine_name = resolve_rollout_engine(cfg, compute_dtype)
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
                                  trust_remote_code=cfg.trust_remote_code, tokenizer_path=cfg.tokenizer)
    state = load_trainer_state(resume_from) if resume_from else None
    start_step = state["step"] if state else 0
    if cfg.resume:  # the log lines after the checkpoint (all of them when there is none) are run again
        rewind_log(out, start_step)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != model.dtype)

    # ---- teacher: the same weights (live), the initial weights or --teacher-model (frozen), EMA --
    teacher = build_teacher(cfg, model, tokenizer, resume_from, device, compute_dtype)
    heads = ComputeHeads(lm_head(model), teacher.head if teacher else None, compute_dtype)

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
    # ---- rollouts: generate on this model, or a vLLM engine holding its own copy of the weights ---
    engine = open_rollout_engine(engine_name, cfg, model, tokenizer, compute_dtype) if cfg.objective == "opsdl" \
        else None
    print(f"opsdl train: {len(items)} examples ({dropped} dropped as too long), objective={cfg.objective}, "
          f"teacher={cfg.teacher_model or cfg.teacher}, estimator={cfg.estimator}, steps {start_step}->{cfg.steps}, "
          f"device={device}, out={out}\nopsdl train: compute: {precision}; rollouts: "
          f"{engine.name if engine else 'none (sft)'}")

    history = []
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="opsdl train")
    step = start_step
    try:
        for step in bar:
            started = time.perf_counter()
            # each step draws its prompts and its samples from its own seed: a resumed run repeats them
            picker = random.Random(f"{cfg.seed}:{step}")
            stats = StepStats()
            heads.refresh()  # the heads in the compute dtype, once per step

            # 1. the step's responses, every micro-batch's before any backward (the same weights):
            #    the gold answers (sft) or on-policy rollouts under the long context
            micro_batches = []
            for micro in range(cfg.grad_accum):
                batch = draw_prompts(items, picker, cfg.batch_size)
                if cfg.objective == "sft":
                    owners, responses = batch, [gold_answer_ids(tokenizer, o.example, turn_end) for o in batch]
                else:
                    with timed(stats, "rollout", device):
                        rollouts = engine.sample([b.student for b in batch], cfg.samples_per_prompt,
                                                 seed=sampling_seed(cfg.seed, step, 0, micro))
                    owners, responses = [batch[r.prompt_index] for r in rollouts], [r.tokens for r in rollouts]
                micro_batches.append((owners, responses))
            # the loss is the mean over the step's response tokens, whatever the micro-batch holding them
            step_rows = sum(len(r) for _, responses in micro_batches for r in responses)

            for owners, responses in micro_batches:
                targets = torch.tensor([t for r in responses for t in r], device=device)
                if cfg.objective == "sft":
                    # baseline: cross-entropy on the gold answers under the long context, no teacher
                    with timed(stats, "student", device), autocast:
                        student_rows = packed_rows(model, [o.student for o in owners], responses, device)
                    with timed(stats, "loss", device):
                        loss_sum = sft_loss(cfg, heads.student, student_rows, targets, reduction="sum")
                    log_ratio = torch.zeros(len(targets))
                    tokens = sum(len(o.student) + len(r) for o, r in zip(owners, responses))
                else:
                    # 2. teacher: [short-context prompt ; y], no gradient
                    with timed(stats, "teacher", device), torch.no_grad(), autocast:
                        teacher_rows = packed_rows(teacher.model, [o.teacher for o in owners], responses, device)

                    # 3. student: [long-context prompt ; y], with gradient
                    with timed(stats, "student", device), autocast:
                        student_rows = packed_rows(model, [o.student for o in owners], responses, device)

                    # 4. per-token reverse KL at the response rows, the teacher with its own head
                    with timed(stats, "loss", device):
                        loss_sum, log_ratio = distillation_loss(cfg, heads.student, heads.teacher, student_rows,
                                                                teacher_rows, targets, reduction="sum")
                    tokens = sum(len(o.student) + len(o.teacher) + 2 * len(r) for o, r in zip(owners, responses))
                with timed(stats, "backward", device):
                    (loss_sum / step_rows).backward()

                # the drift signal: do the model's own answers hold the expected ones?
                found = [answer_found(tokenizer.decode(r, skip_special_tokens=True), o.example.answers())
                         for o, r in zip(owners, responses)] if cfg.objective == "opsdl" else []
                stats.add(float(loss_sum.detach()), float(log_ratio.sum()), responses, tokens, found)

            # 5. AdamW step at the scheduled rate, with clipping
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with timed(stats, "optimizer", device):
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if teacher is not None and teacher.ema:
                    update_ema(teacher.model, model, cfg.ema_decay)
            if engine is not None:
                with timed(stats, "push", device):
                    engine.update(model)  # the next rollouts come from the new weights

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
    finally:
        if engine is not None:
            engine.close()

    summary = summarize(history, out)
    print(json.dumps(summary, indent=1))
    return summary
