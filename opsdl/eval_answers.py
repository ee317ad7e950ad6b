"""Greedy answers for ``opsdl eval`` from the trainer's rollout engines: a vLLM engine in this process
where it is installed and runs (a whole cell in one call, scheduled by vLLM), else transformers
``generate`` in batches of --batch-size. One model at a time: ``open`` loads it, ``close`` frees it."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .model import load_model
from .options import EvalConfig, TrainConfig, eval_wording
from .precision import compute_dtype
from .rollout_engines import RolloutEngine, open_rollout_engine, resolve_rollout_engine


@dataclass(frozen=True)
class EvalItem:
    """One question of a cell: its prompt, the same question with only the evidence (None where the
    task has no evidence apart from its whole context), the expected answers and the answer budget."""
    id: str
    prompt: list[int]
    evidence_prompt: Optional[list[int]]
    answers: tuple[str, ...]
    max_new_tokens: int


class Answerer:
    """Greedy answers of one model: ``answers(prompts, max_new_tokens)`` decodes each response (its
    stop token and other special tokens left out). ``description`` says which engine and precision."""

    def __init__(self, cfg: EvalConfig, name: str, device: torch.device, longest: int):
        """``longest``: the most tokens any request of this model needs (prompt and answer budget)."""
        self.cfg = cfg
        model, self.tokenizer = load_model(name, device=device, rope_factor=cfg.rope_factor, seed=cfg.seed)
        dtype, why = compute_dtype(cfg.bf16, device)
        engine = cfg.engine
        window = getattr(model.config, "max_position_embeddings", None)
        if window is not None and longest > window and engine != "hf":  # vLLM refuses prompts past the window
            past = (f"{longest} tokens (the longest prompt and answer of --lengths) are past {name}'s window of "
                    f"{window} (max_position_embeddings, times --rope-factor)")
            if engine == "vllm":
                raise ValueError(f"--engine vllm: {past}, which vLLM refuses; use --engine hf (the model then runs "
                                 "past its window), a larger --rope-factor, or shorter --lengths")
            print(f"opsdl eval: {name}: answers on generate, not vLLM: {past}")
            engine = "hf"
        # greedy: the engines' sampling options as evaluation needs them (temperature 0 is off-policy
        # for training, which does not apply here)
        engine_cfg = TrainConfig(model=name, temperature=0.0, off_policy=True, rollout_engine=engine,
                                 rollout_cache_gib=cfg.cache_gib, max_length=longest, seed=cfg.seed,
                                 device=cfg.device, max_new_tokens=1)
        try:
            kind = resolve_rollout_engine(engine_cfg, dtype)
            self.engine: RolloutEngine = open_rollout_engine(kind, engine_cfg, model, self.tokenizer, dtype)
        except ValueError as refused:  # the engines speak of opsdl train's options
            raise ValueError(eval_wording(str(refused))) from None
        self.batch_size = cfg.batch_size if kind == "hf" else None  # vLLM batches a whole call itself
        self.description = f"{kind} engine; {why}"
        self.seconds = 0.0

    def answers(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[str]:
        started = time.perf_counter()
        step = self.batch_size or len(prompts)
        texts = []
        for i in range(0, len(prompts), step):
            rollouts = self.engine.sample(prompts[i:i + step], 1, self.cfg.seed, max_new_tokens=max_new_tokens)
            texts += [self.tokenizer.decode(r.tokens, skip_special_tokens=True) for r in rollouts]
        self.seconds += time.perf_counter() - started
        return texts

    def close(self) -> None:
        self.engine.close()
