"""Prompts and batched on-policy sampling with the model's own ``generate``."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from .packing import own_attention

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


def stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends an answer: the generation config's EOS ids (a list for Llama-3:
    ``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``), the tokenizer's EOS when the config has none."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    if not ids:
        raise ValueError(f"model ({type(model).__name__}): neither its generation config nor its tokenizer names an "
                         "end-of-sequence token; set generation_config.eos_token_id")
    return ids


def turn_end_id(tokenizer: PreTrainedTokenizerBase, stops: list[int]) -> int:
    """The token that closes an assistant turn in the chat template (``<|im_end|>``, ``<|eot_id|>``):
    the first stop token after the answer in a rendered exchange; the first stop id without a template."""
    if tokenizer.chat_template:
        marker = "OPSDL_ANSWER_MARKER"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
        after = tokenizer(text[text.rindex(marker) + len(marker):], add_special_tokens=False).input_ids
        for token in after:
            if token in stops:
                return token
    return stops[0]


@contextlib.contextmanager
def _plain_generation_config(model: PreTrainedModel) -> Iterator[None]:
    """The model's generation config reduced to its special tokens for the length of the block.
    ``generate`` fills every option not passed from ``model.generation_config``, and checkpoints ship
    options that change the distribution (Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20,
    top_p 0.8): samples drawn under them are not samples of softmax(logits / T), which the loss
    scores. Only ``sample``'s own arguments shape the distribution here."""
    own = model.generation_config
    model.generation_config = GenerationConfig(**{name: getattr(own, name, None) for name in _SPECIAL_TOKENS})
    try:
        yield
    finally:
        model.generation_config = own


_SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


@dataclass(frozen=True)
class Rollout:
    prompt_index: int  # which prompt of the batch it answers
    tokens: list[int]  # the sampled response, ending with its stop token when the sample ended
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
    synced_gpus: bool = False,
) -> list[Rollout]:
    """``samples_per_prompt`` responses per prompt, left-padded into one ``generate`` call with the
    KV cache, under the model's own attention implementation, from softmax(logits / temperature)
    (nucleus-truncated when top_p < 1) and nothing else: the generation config's penalties and
    processors are left out (``_plain_generation_config``). A response ends at the first of any
    ``stop_ids`` (the generation config's EOS list). temperature 0 means greedy decoding. Reseed
    torch beforehand for reproducible samples. ``synced_gpus``: ranks whose layers are gathered per
    forward (FSDP) keep stepping until every rank's batch has ended."""
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got none")
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1 or samples_per_prompt < 1:
        raise ValueError(f"sampling options: expected temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1 and "
                         f"samples_per_prompt >= 1, got {temperature}, {top_p}, {max_new_tokens}, {samples_per_prompt}")
    device = next(model.parameters()).device
    pad, stops = tokenizer.pad_token_id, stop_ids(model, tokenizer)
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
    with torch.no_grad(), own_attention(model), _plain_generation_config(model):
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                             num_return_sequences=samples_per_prompt, pad_token_id=pad, eos_token_id=stops,
                             synced_gpus=synced_gpus, **sampling)
    model.train(was_training)
    rollouts = []
    for i, row in enumerate(out[:, width:].tolist()):
        end = next((k for k, token in enumerate(row) if token in stops), None)
        ended = end is not None
        tokens = row[: end + 1] if ended else row
        rollouts.append(Rollout(i // samples_per_prompt, tokens, ended))
    return rollouts
