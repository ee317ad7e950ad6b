"""The OPSDL loop on many ranks: ``opsdl.train``'s reference loop with the model sharded by FSDP2,
each rank drawing its own prompts and sampling its own rollouts, and the loss the mean over all
ranks' response tokens, so that K ranks with --batch-size b train as one process with K x b.

    torchrun --nproc-per-node 8 -m opsdl train --model Qwen/Qwen2.5-7B-Instruct --bf16 ...
    torchrun --nproc-per-node 2 -m opsdl train --model tiny:llama --device cpu      # gloo, on a CPU

Per step, on every rank: draw the step's K x b prompts from the step's seed and take this rank's
b -> rollouts with the weights gathered once (``--rollout-gather``) -> the teacher's rows, no
gradient -> the student's loss inside the sharded root's forward (``fsdp.Policy``), scaled by the
global token count -> FSDP2 reduce-scatters the gradients -> AdamW on the shards. Logs, the
progress bar and the summary come from rank 0; checkpoints from every rank (``fsdp_checkpoint``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from .checkpoint import (append_log, claim_output_dir, is_sharded, load_trainer_state, prune_checkpoints, resume_point,
                         rewind_log)
from .data import answer_found, load_examples
from .fsdp import Ranks, all_reduce, gathered_for_rollouts, init_ranks, release_process_group, shard, whole
from .fsdp_checkpoint import load_sharded_checkpoint, on_main, save_sharded_checkpoint
from .model import check_model_source, enable_checkpointing, lm_head, load_model
from .objective import gold_answer_ids, load_teacher_model, update_ema
from .options import TrainConfig, check_train_options
from .precision import compute_dtype as choose_compute_dtype
from .rollout import stop_ids, turn_end_id
from .rollout_engines import open_rollout_engine, resolve_rollout_engine
from .steps import (StepStats, checkpoint_due, draw_prompts, interrupted, learning_rate, prepare_prompts,
                    PHASES, sampling_seed, step_record, summarize, synthetic_examples, timed)

__all__ = ["train_fsdp"]


def train_fsdp(cfg: TrainConfig) -> dict:
    """Run under torchrun (WORLD_SIZE set); every rank calls it with the same ``cfg``."""
    check_train_options(cfg)
    ranks = init_ranks(cfg.device)
    owns_group = ranks.owns_group
    summary = _train(cfg, ranks)
    del ranks  # its device mesh holds the group
    if owns_group:
        release_process_group()
    return summary


def _train(cfg: TrainConfig, ranks: Ranks) -> dict:
    # ---- refused before any model loads, on every rank alike ----------------------------------
    check_model_source(cfg.model)
    if cfg.teacher_model:
        check_model_source(cfg.teacher_model, "--teacher-model")
    file_examples = load_examples(cfg.data, cfg.allow_noncontiguous) if cfg.data else None
    compute_dtype, precision = choose_compute_dtype(cfg.bf16, ranks.device)
    bf16 = compute_dtype == torch.bfloat16
    engine_name = resolve_rollout_engine(cfg, compute_dtype)
    out = Path(cfg.out)
    resume_from = resume_point(out, cfg.resume)
    if resume_from is not None and not is_sharded(resume_from):
        raise ValueError(f"--resume {resume_from}: a single-process checkpoint; under torchrun continue a torchrun "
                         "run's checkpoint, or load these weights with --model "
                         f"{resume_from} (the optimizer then starts afresh)")
    on_main(ranks, lambda: claim_output_dir(out, cfg))
    state = load_trainer_state(resume_from) if resume_from else None
    start_step = state["step"] if state else 0
    if cfg.resume:  # the log lines after the checkpoint (all of them when there is none) are run again
        on_main(ranks, lambda: rewind_log(out, start_step))

    # ---- models: loaded whole on the CPU by each rank, then sharded layer by layer; the teacher
    #      after the student is sharded, so that a rank holds one whole model at a time -----------
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device="cpu", seed=cfg.seed,
                                  rope_factor=cfg.rope_factor, trust_remote_code=cfg.trust_remote_code,
                                  tokenizer_path=cfg.tokenizer)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    turn_end = turn_end_id(tokenizer, stop_ids(model, tokenizer))
    policy = shard(model.train(), ranks, bf16)
    teacher = policy  # live, or sft (no teacher)
    if cfg.objective == "opsdl" and cfg.teacher_model:
        teacher = shard(load_teacher_model(cfg, model, tokenizer, model.dtype, "cpu").eval().requires_grad_(False),
                        ranks, bf16)
    elif cfg.objective == "opsdl" and cfg.teacher in ("frozen", "ema"):  # initial weights (EMA: then its checkpoint)
        initial = load_model(cfg.model, dtype=cfg.dtype, device="cpu", seed=cfg.seed, rope_factor=cfg.rope_factor,
                             trust_remote_code=cfg.trust_remote_code, tokenizer_path=cfg.tokenizer)[0]
        teacher = shard(initial.eval().requires_grad_(False), ranks, bf16)
    ema = teacher if cfg.objective == "opsdl" and cfg.teacher == "ema" and not cfg.teacher_model else None

    items, dropped = prepare_prompts(cfg, file_examples or synthetic_examples(cfg, tokenizer), tokenizer)
    if cfg.objective == "sft" and not all(item.example.answers() for item in items):
        raise ValueError("--objective sft: every example needs an 'answer' (the gold target)")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resume_from and not load_sharded_checkpoint(resume_from, policy, optimizer, ema) and ranks.main:
        print(f"opsdl train: {resume_from} holds no optimizer state (--no-save-optimizer); AdamW starts afresh")
    # rollouts: generate on the gathered model, or one vLLM engine per rank (data parallel), each
    # holding its own whole copy of the weights, updated after every optimizer step
    engine = None
    if cfg.objective == "opsdl":
        once = cfg.rollout_gather == "once"
        # (vLLM's engine takes the sharded weights, gathering each whole in turn: full_tensor)
        engine = open_rollout_engine(engine_name, cfg, policy.model, tokenizer, compute_dtype,
                                     synced_gpus=not once and ranks.world > 1, sharded=True)
    if ranks.main:
        print(f"opsdl train: {ranks.world} ranks ({ranks.device.type}), {len(items)} examples ({dropped} dropped as "
              f"too long), objective={cfg.objective}, teacher={cfg.teacher_model or cfg.teacher}, "
              f"estimator={cfg.estimator}, steps {start_step}->{cfg.steps}, {cfg.batch_size} prompts per rank and "
              f"micro-batch, out={out}\nopsdl train: compute: {precision}; rollouts: "
              f"{engine.name + ' on every rank' if engine else 'none (sft)'}")

    history = []
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="opsdl train",
               disable=not ranks.main)
    step = start_step
    try:
        for step in bar:
            started = time.perf_counter()
            # the step's prompts come from its own seed, the same on every rank; rank r takes the
            # r-th slice. Each rank samples with its own seed (rank 0 with the one-process seed).
            picker = random.Random(f"{cfg.seed}:{step}")
            stats = StepStats()

            # 1. the step's responses, every micro-batch's before any backward: the gold answers (sft)
            #    or on-policy rollouts under the long context
            micro_batches = []
            for micro in range(cfg.grad_accum):
                everyone = draw_prompts(items, picker, cfg.batch_size * ranks.world)
                batch = everyone[ranks.rank * cfg.batch_size:(ranks.rank + 1) * cfg.batch_size]
                if cfg.objective == "sft":
                    owners, responses = batch, [gold_answer_ids(tokenizer, b.example, turn_end) for b in batch]
                else:
                    seed = sampling_seed(cfg.seed, step, ranks.rank, micro)
                    with timed(stats, "rollout", ranks.device), (gathered_for_rollouts(policy, once=once) if
                                                                 engine.name == "hf" else contextlib.nullcontext()):
                        rollouts = engine.sample([b.student for b in batch], cfg.samples_per_prompt, seed)
                    owners, responses = [batch[r.prompt_index] for r in rollouts], [r.tokens for r in rollouts]
                micro_batches.append((owners, responses))
            # the mean over the step's response tokens on every rank; FSDP2 averages gradients over the ranks
            global_rows = all_reduce([sum(len(r) for _, responses in micro_batches for r in responses)], ranks)[0]
            scale = ranks.world / global_rows

            for owners, responses in micro_batches:
                targets = torch.tensor([t for r in responses for t in r], device=ranks.device)
                students = [o.student for o in owners]
                if cfg.objective == "sft":
                    loss_sum, log_ratio = policy(students, responses, mode="sft", cfg=cfg, targets=targets)
                    (loss_sum * scale).backward()
                    tokens = sum(len(o.student) + len(r) for o, r in zip(owners, responses))
                else:
                    # 2. teacher rows, no gradient; 3.-4. the student's loss against them in its forward. A
                    #    separate teacher's head stays gathered through the backward, which may read it again
                    #    (the fused loss's lean path recomputes the teacher's logits)
                    with timed(stats, "teacher", ranks.device), torch.no_grad():
                        teacher_rows = teacher([o.teacher for o in owners], responses, mode="rows")
                    separate = teacher is not policy
                    with whole(teacher) if separate else contextlib.nullcontext():
                        # the loss runs inside the sharded root's forward: its time is the student's here
                        with timed(stats, "student", ranks.device):
                            loss_sum, log_ratio = policy(students, responses, mode="distill", cfg=cfg,
                                                         targets=targets, teacher_rows=teacher_rows,
                                                         teacher_head=lm_head(teacher.model) if separate else None)
                        with timed(stats, "backward", ranks.device):
                            (loss_sum * scale).backward()
                    tokens = sum(len(o.student) + len(o.teacher) + 2 * len(r) for o, r in zip(owners, responses))
                found = [answer_found(tokenizer.decode(r, skip_special_tokens=True), o.example.answers())
                         for o, r in zip(owners, responses)] if cfg.objective == "opsdl" else []
                stats.add(float(loss_sum.detach()), float(log_ratio.sum()), responses, tokens, found)

            # 5. AdamW on the shards at the scheduled rate, clipped by the global gradient norm
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with timed(stats, "optimizer", ranks.device):
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm or float("inf"))
                grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    update_ema(ema, policy, cfg.ema_decay)
            if engine is not None and engine.name != "hf":  # each sharded weight gathered whole in turn
                with timed(stats, "push", ranks.device):
                    engine.update(policy.model)

            # the step's sums over all ranks; each phase's time is the slowest rank's
            summed = StepStats(*all_reduce(list(dataclasses.astuple(stats)), ranks))
            phases = [f"{phase}_seconds" for phase in PHASES]
            for name, slowest in zip(phases, all_reduce([getattr(stats, n) for n in phases], ranks,
                                                         dist.ReduceOp.MAX)):
                setattr(summed, name, slowest)
            record = step_record(cfg, summed, step, lr, float(grad_norm), time.perf_counter() - started,
                                 ranks.device, out)
            history.append(record)
            if ranks.main:
                append_log(out, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", answers=record["answer_rate"],
                                tok_s=f"{record['tokens_per_s']:.0f}")

            # 6. checkpoint from every rank, the last one with the consolidated model
            done = step + 1
            if checkpoint_due(cfg, done):
                save_sharded_checkpoint(out, done, policy, tokenizer, optimizer if cfg.save_optimizer else None,
                                        ema, cfg, ranks, export=done == cfg.steps)
                on_main(ranks, lambda: prune_checkpoints(out, cfg.save_total_limit))
    except KeyboardInterrupt:
        raise interrupted(cfg, step, out) from None
    finally:
        if engine is not None:  # vLLM's own shutdown would destroy the process group: close it first
            engine.close()

    summary = summarize(history, out)
    if ranks.main:
        print(json.dumps(summary, indent=1))
    return summary

