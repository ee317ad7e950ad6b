"""``OPSDLConfig``: TRL's self-distillation (SDFT) configuration, with OPSDL's loss and teacher input."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from trl.experimental.sdft import SDFTConfig

from ...precision import cpu_bf16_units

ESTIMATORS = ("full", "sampled")
TEACHER_KINDS = ("base", "live", "ema")

# SDFT options whose job OPSDL's loss or teacher input does differently: (value OPSDL requires, why)
_FIXED = {
    "teacher_prompt_template": ("{prompt}\n\n{privileged_context}",
                                "the teacher reads the dataset's own `teacher_prompt` column (or `short_context` "
                                "and `question`), not the student prompt plus a privileged context"),
    "generate_from_teacher": (False, "OPSDL's rollouts are the student's, under the long context (on-policy)"),
    "use_teacher_server": (False, "the fused loss needs the teacher's hidden states, which a vLLM server does not "
                                  "return; the teacher runs in the trainer"),
    "distillation_mode": ("topk_logits", "set `estimator` ('full': exact reverse KL over the vocabulary; "
                                         "'sampled': the single-sample estimator)"),
    "distillation_topk": (100, "the fused loss is exact over the whole vocabulary, never a top-k"),
    "distillation_add_tail": (False, "the fused loss is exact over the whole vocabulary, never a top-k"),
    "distillation_alpha": (0.5, "OPSDL's loss is the reverse KL (use `opsdl_kernels.fused_kl_loss` for a mix)"),
}


def _has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())


@dataclass
class OPSDLConfig(SDFTConfig):
    r"""Configuration of ``OPSDLTrainer``: every ``SDFTConfig`` / ``TrainingArguments`` option
    (batch sizes, ``num_generations``, ``max_completion_length``, ``temperature``, ``use_vllm``,
    logging, saving, ...), plus:

    estimator (`str`, defaults to `"full"`): `"full"`, the exact per-token reverse KL
        ``KL(p_student || p_teacher)`` over the vocabulary; `"sampled"`, the paper's single-sample
        estimator ``log p_s(y) - log p_t(y)`` at the rollout's token with the REINFORCE gradient.
    teacher_model_kind (`str`, defaults to `"base"`): `"base"`, the initial weights (`opsdl train
        --teacher frozen`; with PEFT the base model with its adapters disabled, no copy); `"live"`,
        the current weights; `"ema"`, a moving average (`teacher_update_rate`, `teacher_sync_steps`);
        with pure LoRA, TRL's EMA is a second adapter that starts at zero (the base model) and averages
        `lora_A` and `lora_B` apart, so it moves slowly at first (after one step at rate r: r^2 B A).
    fused_impl (`str`, defaults to `"auto"`): the kernels' `impl` ("auto", "triton", "torch").
    bf16 (`bool`, defaults to TRL's choice on a GPU): on a machine without one (or with
        ``use_cpu``), bf16 autocast only where the CPU has bf16 units (AVX512_BF16 or AMX), float32
        elsewhere (as `opsdl train`), and ``use_cpu`` set.

    ``num_generations`` defaults to 1 (rollouts per prompt; OPSDL compares no group of them).
    ``max_prompt_length`` defaults to None (no limit); when set, a longer prompt is refused, never
    cut (TRL cuts it from the left: that would drop the long context). SDFT's options for its own
    losses (``distillation_mode``, ``distillation_topk``, ...) and teacher prompt
    (``teacher_prompt_template``, ``generate_from_teacher``, ``use_teacher_server``) are refused
    when changed. ``distillation_is_clip`` applies as in SDFT: when rollouts are reused over several
    optimizer steps, each token's loss is weighted by min(p_now(y) / p_rollout(y), clip).
    """

    estimator: str = field(default="full", metadata={"help": "'full' (exact reverse KL) or 'sampled' (single-sample)."})
    fused_impl: str = field(default="auto", metadata={"help": "Kernels of the fused loss: auto, triton or torch."})
    num_generations: int = field(
        default=1, metadata={"help": "Rollouts per prompt (OPSDL needs no group: 1, as `opsdl train`)."})
    max_prompt_length: Optional[int] = field(
        default=None, metadata={"help": "Longest prompt accepted (tokens); a longer one is refused, never cut."})

    def __post_init__(self):
        on_cpu = self.use_cpu or not _has_accelerator()
        if self.bf16 is None and not self.fp16 and on_cpu:
            # TRL turns bf16 on everywhere; a CPU without bf16 units runs bf16 products in reference
            # loops, hundreds of times slower than float32: on a CPU, bf16 only where it has them
            # (and use_cpu, without which transformers refuses bf16 on a machine with no GPU)
            self.bf16, self.use_cpu = bool(cpu_bf16_units()), True
        super().__post_init__()
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {self.estimator!r}")
        if self.teacher_model_kind not in TEACHER_KINDS:
            raise ValueError(f"teacher_model_kind: expected one of {TEACHER_KINDS}, got {self.teacher_model_kind!r}")
        if self.fused_impl not in ("auto", "triton", "torch"):
            raise ValueError(f"fused_impl: expected 'auto', 'triton' or 'torch', got {self.fused_impl!r}")
        for name, (required, why) in _FIXED.items():
            if getattr(self, name) != required:
                raise ValueError(f"{name}: OPSDLConfig does not use it ({why}); got {getattr(self, name)!r}, leave it "
                                 f"at {required!r}")
