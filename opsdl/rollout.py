"""Prompts and batched on-policy sampling with the model's own ``generate``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Used when the tokenizer has no chat template (a base model): documented in the README.
PLAIN_TEMPLATE = "{context}\n\nQuestion: {question}\nAnswer:"


def chat_ids(tokenizer: PreTrainedTokenizerBase, user_text: str) -> list[int]:
    """One user turn in the model's chat template, ending where the assistant's answer starts
    (the bare text and a newline when the tokenizer has no chat template)."""
    if not tokenizer.chat_template:
        return tokenizer(user_text + "\n", add_special_tokens=True).input_ids
    messages = [{"role": "user", "content": user_text}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def prompt_ids(tokenizer: PreTrainedTokenizerBase, context: str, question: str) -> list[int]:
    """The prompt for a question about a context: one chat turn holding the context, a blank line
    and the question; ``PLAIN_TEMPLATE`` when the tokenizer has no chat template."""
    if tokenizer.chat_template:
        return chat_ids(tokenizer, f"{context}\n\n{question}")
    text = PLAIN_TEMPLATE.format(context=context, question=question)
    return tokenizer(text, add_special_tokens=True).input_ids


@dataclass(frozen=True)
class Rollout:
    prompt_index: int  # which prompt of the batch it answers
    tokens: list[int]  # the sampled response, ending with EOS when the sample ended
    ended: bool


def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    *,
    temperature: float = 0.7,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    samples_per_prompt: int = 1,
) -> list[Rollout]:
    """``samples_per_prompt`` responses per prompt, left-padded into one ``generate`` call with the
    KV cache. temperature 0 means greedy decoding. Reseed torch beforehand for reproducible samples."""
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got none")
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1 or samples_per_prompt < 1:
        raise ValueError(f"sampling options: expected temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1 and "
                         f"samples_per_prompt >= 1, got {temperature}, {top_p}, {max_new_tokens}, {samples_per_prompt}")
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
    attention = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):] = torch.tensor(p, device=device)
        attention[row, width - len(p):] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 \
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                             num_return_sequences=samples_per_prompt, pad_token_id=pad, eos_token_id=eos,
                             **sampling)
    model.train(was_training)
    rollouts = []
    for i, row in enumerate(out[:, width:].tolist()):
        ended = eos in row
        tokens = row[: row.index(eos) + 1] if ended else row
        rollouts.append(Rollout(i // samples_per_prompt, tokens, ended))
    return rollouts
