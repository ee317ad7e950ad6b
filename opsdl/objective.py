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
                      reduction: str = "mean"):
    """The per-token loss over the response rows (mean, or sum) and, from the same fused call, the
    per-row sampled log-ratio log p_s(y) - log p_t(y) (logged; the loss itself when --estimator sampled).
    Both distributions are taken at the rollouts' sampling temperature: the loss scores the
    distribution the rollouts were drawn from (greedy rollouts, --off-policy, score at 1). The
    heads come in the compute dtype (``ComputeHeads``); the teacher scores with its own lm-head: a
    frozen or EMA teacher's head, not the student's live one (with tied embeddings the student's
    head moves every step)."""
    if teacher_head.softcap != head.softcap:
        raise ValueError(f"teacher: its final-logit softcap {teacher_head.softcap} differs from the student's "
                         f"{head.softcap}; the fused loss applies one softcap to both")
    shared = teacher_head.weight is head.weight  # the live teacher: one weight, read once
    dtype = head.weight.dtype
    return fused_rkl_loss(student_rows.to(dtype), teacher_rows.to(dtype), head.weight,
                          None if shared else teacher_head.weight, targets=targets, estimator=cfg.estimator,
                          temperature=cfg.temperature or 1.0, softcap=head.softcap, bias=head.bias,
                          teacher_bias=teacher_head.bias, impl=cfg.impl, reduction=reduction, return_log_ratio=True)


def sft_loss(cfg: TrainConfig, head: LMHead, student_rows, targets, reduction: str = "mean"):
    """The baseline: cross-entropy of the gold answer tokens under the long context (mean, or sum)."""
    return -fused_token_logprobs(student_rows.to(head.weight.dtype), head.weight, targets, softcap=head.softcap,
                                 impl=cfg.impl, reduction=reduction, bias=head.bias)


class ComputeHeads:
    """The student's and the teacher's lm-heads in the compute dtype, cast once per optimizer step
    (``refresh``) rather than once per loss call: at 128K x 4096 each cast is 1 GiB of bf16 and a
    V x H fp32 gradient temporary. The student's bf16 copy is a leaf whose gradient, once a
    micro-batch's backward has formed it, is added into the float32 master weight's ``.grad`` and
    dropped. A teacher head is recast only when its weights changed (an EMA update); a frozen one
    once per run. In float32 the heads are the model's own tensors."""

    def __init__(self, student: LMHead, teacher: Optional[LMHead], dtype: torch.dtype):
        self.masters, self.dtype = (student, teacher), dtype
        self.student, self.teacher = student, teacher
        self._teacher_version: Optional[tuple] = None

    def refresh(self) -> None:
        student, teacher = self.masters
        if self.dtype == student.weight.dtype:
            return
        self.student = LMHead(_leaf_copy(student.weight, self.dtype), _leaf_copy(student.bias, self.dtype),
                              student.softcap)
        if teacher is None:
            return
        if teacher.weight is student.weight:  # live: the student's own head
            self.teacher = self.student
            return
        version = tuple(t._version for t in (teacher.weight, teacher.bias) if t is not None)
        if version != self._teacher_version:
            self.teacher = LMHead(_cast(teacher.weight, self.dtype), _cast(teacher.bias, self.dtype), teacher.softcap)
            self._teacher_version = version


def _leaf_copy(master: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A ``dtype`` copy of a trained tensor whose gradients land in the master's ``.grad``."""
    if master is None:
        return None
    copy_ = master.detach().to(dtype).requires_grad_(master.requires_grad)

    def into_master(leaf: torch.Tensor) -> None:
        if master.grad is None:
            master.grad = leaf.grad.to(master.dtype)
        else:
            master.grad.add_(leaf.grad)
        leaf.grad = None

    if master.requires_grad:
        copy_.register_post_accumulate_grad_hook(into_master)
    return copy_


def _cast(t, dtype):
    return None if t is None else t.detach().to(dtype)


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
    --teacher-model; ema: a moving average, restored from the checkpoint on resume, kept in float32
    (a bf16 average would drop most of each step's (1 - decay) move). A frozen or separate teacher
    is held in ``dtype``, the compute dtype: it is never updated. A separate teacher is checked to
    share the student's tokenizer and vocabulary."""
    if cfg.objective == "sft":
        return None
    if cfg.teacher == "live":
        return Teacher(student, lm_head(student), ema=False)
    if cfg.teacher_model:
        teacher = load_teacher_model(cfg, student, tokenizer, dtype, device)
    elif cfg.teacher == "ema" and resume_from is not None:
        teacher = AutoModelForCausalLM.from_pretrained(resume_from / "ema", dtype=torch.float32).to(device)
    elif resume_from is not None:  # frozen: the initial weights, as the first run had them
        # in float32, as the first run had them before the cast below (random weights drawn in bf16 differ)
        teacher = load_model(cfg.model, dtype=torch.float32, device=device, seed=cfg.seed,
                             rope_factor=cfg.rope_factor, trust_remote_code=cfg.trust_remote_code,
                             tokenizer_path=cfg.tokenizer)[0]
    else:
        teacher = copy.deepcopy(student)
    if cfg.teacher != "ema":
        teacher.to(dtype)
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
