"""Where a training loop's rollouts come from: ``generate`` on the trainer's own model (``hf``), or a
vLLM engine beside it holding its own copy of the weights (``vllm``, ``opsdl.vllm_rollout``). A loop
opens one engine, asks it for each micro-batch's samples, and pushes the new weights into it after
every optimizer step (``update``; a no-op for ``hf``, which samples from the live model)."""
from __future__ import annotations

import copy
import importlib.util
from typing import Optional, Protocol, Sequence

import torch

from .options import VLLM_NOT_INSTALLED, TrainConfig
from .rollout import Rollout, sample


class RolloutEngine(Protocol):
    name: str

    def sample(self, prompts: Sequence[Sequence[int]], samples_per_prompt: int, seed: int, *,
               max_new_tokens: Optional[int] = None) -> list[Rollout]:
        """``samples_per_prompt`` responses to each prompt (token ids in, token ids out), drawn from
        softmax(logits / --temperature) of the current weights, reproducible from ``seed``; at most
        ``max_new_tokens`` tokens each (default: --max-new-tokens)."""

    def update(self, model: torch.nn.Module) -> None:
        """Take ``model``'s current weights (after an optimizer step, or a resume)."""

    def close(self) -> None:
        """Free the engine (under torchrun: before the process group is released)."""


class GenerateEngine:
    """transformers ``generate``. With float32 weights and bf16 compute it samples from a bf16 copy
    of the model (2 bytes per parameter more), refreshed after every optimizer step: bf16 autocast
    would cast every weight again at each call and add a cast around every product of every decoded
    token (measured on an H200, Qwen2.5-1.5B shape, 2 prompts x 24 tokens at 1K: 1.78 s under autocast
    against 0.87 s in float32). Under FSDP (``sharded``) the gathered weights are already in the
    compute dtype and it samples from the model itself."""

    name = "hf"

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, tokenizer, compute_dtype: torch.dtype,
                 synced_gpus: bool = False, sharded: bool = False):
        self.cfg, self.tokenizer, self.synced_gpus = cfg, tokenizer, synced_gpus
        weights_dtype = next(model.parameters()).dtype
        self.sampler = model if sharded or compute_dtype == weights_dtype else _cast_copy(model, compute_dtype)

    def sample(self, prompts: Sequence[Sequence[int]], samples_per_prompt: int, seed: int, *,
               max_new_tokens: Optional[int] = None) -> list[Rollout]:
        torch.manual_seed(seed)
        return sample(self.sampler, self.tokenizer, prompts, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                      max_new_tokens=max_new_tokens or self.cfg.max_new_tokens, samples_per_prompt=samples_per_prompt,
                      synced_gpus=self.synced_gpus)

    def update(self, model: torch.nn.Module) -> None:
        if self.sampler is model:
            return  # it samples from the live model
        with torch.no_grad():
            for copy_, master in zip(self.sampler.parameters(), model.parameters(), strict=True):
                copy_.copy_(master)

    def close(self) -> None:
        self.sampler = None


def _cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of ``model`` with its parameters in ``dtype`` (tied ones still tied), built
    without a second full-precision copy: ``deepcopy`` takes the cast parameters from its memo."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo).eval()


def resolve_rollout_engine(cfg: TrainConfig, compute_dtype: torch.dtype = torch.bfloat16) -> str:
    """``hf`` or ``vllm`` for --rollout-engine, decided before any model loads: ``auto`` takes vLLM
    where it is installed and can run here and the model's shape (its config, read without the
    weights) suits it; ``vllm`` where it cannot is refused in one line that names the fix. With vLLM
    asked for, a --rollout-cache-gib too small for --max-length tokens (of KV cache in
    ``compute_dtype``) is refused in one line; ``auto`` then takes ``generate`` and says why."""
    if cfg.rollout_engine == "hf" or cfg.objective == "sft":
        return "hf"
    if importlib.util.find_spec("vllm") is None:
        if cfg.rollout_engine == "vllm":
            raise ValueError(f"--rollout-engine vllm: {VLLM_NOT_INSTALLED}")
        return "hf"
    from .vllm_rollout import check_cache_budget, model_reason, read_model_config, unavailable_reason

    reason = unavailable_reason(cfg)
    config = read_model_config(cfg) if reason is None else None  # the config only, no weights
    if config is not None:
        reason = model_reason(cfg, config)
    if reason is not None:
        if cfg.rollout_engine == "vllm":
            raise ValueError(f"--rollout-engine vllm: {reason}")
        return "hf"
    if config is not None:  # a budget too small for --max-length: refused when asked for, else generate
        try:
            check_cache_budget(cfg, config, compute_dtype.itemsize)
        except ValueError as too_small:
            if cfg.rollout_engine == "vllm":
                raise
            print(f"opsdl: rollouts on generate, not vLLM: {too_small}")
            return "hf"
    return "vllm"


def open_rollout_engine(name: str, cfg: TrainConfig, model: torch.nn.Module, tokenizer, compute_dtype: torch.dtype,
                        synced_gpus: bool = False, sharded: bool = False) -> RolloutEngine:
    """The engine ``resolve_rollout_engine`` chose, holding ``model``'s current weights."""
    if name == "vllm":
        from .vllm_rollout import VLLMEngine

        return VLLMEngine(cfg, model, tokenizer, compute_dtype)
    return GenerateEngine(cfg, model, tokenizer, compute_dtype, synced_gpus, sharded)
