"""Batched, left-padded sampling answers each prompt as it would alone."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from opsdl.model import load_model
from opsdl.rollout import PLAIN_TEMPLATE, prompt_ids, sample, stop_ids, turn_end_id


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = [prompt_ids(tokenizer, "A short context about apples.", "What fruit?"),
               prompt_ids(tokenizer, "A much longer context " * 8, "Which words repeat?")]
    batched = sample(model, tokenizer, prompts, temperature=0.0, max_new_tokens=6)
    alone = [sample(model, tokenizer, [p], temperature=0.0, max_new_tokens=6)[0] for p in prompts]
    assert [r.tokens for r in batched] == [r.tokens for r in alone]
    assert [r.prompt_index for r in batched] == [0, 1]


def test_samples_per_prompt_seeded_and_eos_kept(tiny):
    model, tokenizer = tiny
    prompts = [prompt_ids(tokenizer, "ctx", "q?")]
    torch.manual_seed(5)
    a = sample(model, tokenizer, prompts, temperature=1.0, max_new_tokens=5, samples_per_prompt=3)
    torch.manual_seed(5)
    b = sample(model, tokenizer, prompts, temperature=1.0, max_new_tokens=5, samples_per_prompt=3)
    assert [r.tokens for r in a] == [r.tokens for r in b] and [r.prompt_index for r in a] == [0, 0, 0]
    for r in a:
        assert 1 <= len(r.tokens) <= 5
        assert r.ended == (r.tokens[-1] == tokenizer.eos_token_id)
        assert tokenizer.eos_token_id not in r.tokens[:-1]


def test_prompt_uses_chat_template_and_plain_fallback(tiny):
    _, tokenizer = tiny
    ids = prompt_ids(tokenizer, "CONTEXT", "QUESTION?")
    text = tokenizer.decode(ids)
    assert text.index("CONTEXT") < text.index("QUESTION?") and text.rstrip().endswith("assistant")
    template = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        plain = tokenizer.decode(prompt_ids(tokenizer, "CONTEXT", "QUESTION?"), skip_special_tokens=True)
    finally:
        tokenizer.chat_template = template
    assert plain == PLAIN_TEMPLATE.format(context="CONTEXT", question="QUESTION?")


def test_bad_sampling_options(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="sampling options"):
        sample(model, tokenizer, [[1, 2]], top_p=0.0)
    with pytest.raises(ValueError, match="prompts"):
        sample(model, tokenizer, [])


def test_rollouts_stop_at_every_eos_of_the_generation_config(tiny):
    """Llama-3 style: the generation config lists several end tokens; an answer ends at the first
    of any of them, not only at the tokenizer's EOS."""
    model, tokenizer = tiny
    prompts = [prompt_ids(tokenizer, "Some context.", "A question?")]
    configured = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id]
        free = sample(model, tokenizer, prompts, temperature=0.0, max_new_tokens=8)[0].tokens
        other_end = next(t for t in free[2:] if t != tokenizer.eos_token_id)  # a token the model emits
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, other_end]
        assert stop_ids(model, tokenizer) == [tokenizer.eos_token_id, other_end]
        stopped = sample(model, tokenizer, prompts, temperature=0.0, max_new_tokens=8)[0]
    finally:
        model.generation_config.eos_token_id = configured
    cut = free.index(other_end) + 1
    assert stopped.ended and stopped.tokens == free[:cut]


def test_turn_end_token_comes_from_the_chat_template(tiny):
    model, tokenizer = tiny
    assert turn_end_id(tokenizer, stop_ids(model, tokenizer)) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    template = tokenizer.chat_template
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    try:  # a template whose turns end with another stop token, listed second
        tokenizer.chat_template = template.replace("<|im_end|>", "<|endoftext|>")
        assert turn_end_id(tokenizer, [tokenizer.eos_token_id, endoftext]) == endoftext
        tokenizer.chat_template = None
        assert turn_end_id(tokenizer, [7, endoftext]) == 7
    finally:
        tokenizer.chat_template = template


# ---- on-policy: the samples are drawn from softmax(logits / T), whatever the generation config says

def _peaked_tiny_model() -> tuple[torch.nn.Module, SimpleNamespace]:
    """A 64-token Llama whose next-token distribution has a dozen tokens of real mass (its final
    norm scaled up), and a stand-in tokenizer with the two ids ``sample`` reads."""
    from transformers import AutoModelForCausalLM

    from opsdl.model import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=64)).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)
    model.generation_config.eos_token_id = 1
    return model, SimpleNamespace(pad_token_id=0, eos_token_id=1)


def _first_token_counts(model, tokenizer, prompt: list[int], temperature: float, n: int) -> torch.Tensor:
    counts = torch.zeros(model.config.vocab_size)
    torch.manual_seed(11)
    for _ in range(n // 1000):
        for r in sample(model, tokenizer, [prompt], temperature=temperature, max_new_tokens=1,
                        samples_per_prompt=1000):
            counts[r.tokens[0]] += 1
    return counts


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_samples_follow_softmax_at_the_temperature_despite_the_generation_config(temperature):
    """4,000 first tokens from one prompt against softmax(logits / T): a chi-square test at p > 1e-3,
    with the model's generation config asking for top_k 3, repetition_penalty 2 and the likeliest
    token suppressed (Qwen2.5-Instruct ships a repetition penalty: applied, such options make the
    samples off-policy; with the config left in force this test fails). The same test rejects samples
    drawn at 1.25 T (p < 1e-6): it has the power to see a wrong distribution."""
    from tests.trainer.chi_square import chi_square_p_value

    model, tokenizer = _peaked_tiny_model()
    prompt = [5, 17, 42, 9, 33, 17, 8]
    with torch.no_grad():
        likely = model(torch.tensor([prompt])).logits[0, -1].topk(3).indices.tolist()
        prompt = prompt + likely  # the penalty below would lower tokens that carry mass
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, dim=-1)
    assert probs.max() < 0.5 and (probs * 4000 >= 5).sum() >= 8  # several tokens carry mass
    assert probs[likely].sum() > 0.1
    model.generation_config.top_k = 3
    model.generation_config.repetition_penalty = 2.0
    model.generation_config.suppress_tokens = [int(logits.argmax())]
    model.generation_config.do_sample = True

    p_value, df = chi_square_p_value(_first_token_counts(model, tokenizer, prompt, temperature, 4000), probs)
    assert p_value > 1e-3, (p_value, df)
    assert model.generation_config.top_k == 3  # the model's own config is left as it was
    wrong, _ = chi_square_p_value(_first_token_counts(model, tokenizer, prompt, 1.25 * temperature, 4000), probs)
    assert wrong < 1e-6, wrong


def test_bf16_rollouts_sample_from_a_cast_copy_refreshed_by_update():
    """With float32 weights and bf16 compute, ``GenerateEngine`` samples from its own bf16 copy
    (tied weights still tied, the master untouched); after an optimizer step ``update`` brings the
    copy to the new weights, and the engine's greedy answers equal ``sample`` on a bf16 cast of them."""
    from opsdl.options import TrainConfig
    from opsdl.rollout_engines import GenerateEngine

    model, tokenizer = load_model("tiny:llama", seed=2)
    cfg = TrainConfig(temperature=0.0, off_policy=True, max_new_tokens=6)
    engine = GenerateEngine(cfg, model, tokenizer, torch.bfloat16)
    copy_ = engine.sampler
    assert copy_ is not model and {p.dtype for p in copy_.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    tied = lambda m: m.get_output_embeddings().weight is m.get_input_embeddings().weight  # noqa: E731
    assert tied(copy_) == tied(model) and len(list(copy_.parameters())) == len(list(model.parameters()))
    prompts = [prompt_ids(tokenizer, "The code is 4417.", "What is the code?")]

    with torch.no_grad():  # a large "optimizer step"
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    stale = engine.sample(prompts, 1, seed=0)[0].tokens
    engine.update(model)
    fresh = engine.sample(prompts, 1, seed=0)[0].tokens
    reference = load_model("tiny:llama", seed=2)[0]
    reference.load_state_dict(model.state_dict())
    want = sample(reference.to(torch.bfloat16), tokenizer, prompts, temperature=0.0, max_new_tokens=6)[0].tokens
    assert fresh == want and fresh != stale
    assert GenerateEngine(cfg, model, tokenizer, torch.float32).sampler is model
