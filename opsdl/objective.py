"""The OPSDL objective, shared by the single-process loop and the torchrun one: the rows a loss
reads, the distillation and SFT losses (``opsdl_kernels``), the teacher (live, frozen, EMA or
another model) and its EMA update."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM

from opsdl_kernels import fused_rkl_loss, fused_token_logprobs

from .data import Example
from .model import LMHead, lm_head, load_model, packed_hidden_states
from .options import TrainConfig
from .packing import pack


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


def gold_answer_ids(tokenizer, example: Example, turn_end: int) -> list[int]:
    """The SFT target: the expected answer(s), comma-separated, then the token that ends the turn."""
    return tokenizer(", ".join(example.answers()), add_special_tokens=False).input_ids + [turn_end]


def update_ema(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, parameter by parameter."""
    with torch.no_grad():
        for p_ema, p in zip(teacher.parameters(), student.parameters()):
            p_ema.lerp_(p, 1.0 - decay)
