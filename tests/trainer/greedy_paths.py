"""Greedy paths of an engine (vLLM) against transformers generate, compared up to the first near-tie."""
from __future__ import annotations

import torch

from opsdl.rollout import sample

NEAR_TIE = 0.25  # bf16 logits of magnitude 16-32 are 0.125 apart: two bf16 implementations may split closer calls


def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers generate's greedy answers (``opsdl.rollout.sample`` at temperature 0)."""
    return [r.tokens for r in sample(model, tokenizer, prompts, temperature=0, max_new_tokens=max_new_tokens)]


def margins(model, prompt: list[int], response: list[int]) -> list[float]:
    """The gap between the two largest fp32 logits at each step of a greedy path."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1: len(prompt) - 1 + len(response)]
    top2 = logits.float().topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


def compare_greedy(model, prompts, engine_tokens, generate_tokens) -> int:
    """Assert the engine's greedy answers equal generate's token for token up to the first step whose
    fp32 top-2 logit gap on generate's path is under NEAR_TIE (a near-tie, which bf16 rounding may
    break either way; the paths may part there); return how many tokens were compared."""
    compared = 0
    for prompt, got, want in zip(prompts, engine_tokens, generate_tokens):
        gaps = margins(model, prompt, want)
        agreed = next((k for k, m in enumerate(gaps) if m < NEAR_TIE), len(want))
        assert got[:agreed] == want[:agreed], (prompt, got, want, gaps)
        compared += agreed
    return compared
