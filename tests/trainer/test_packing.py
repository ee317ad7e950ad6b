"""Packed forward passes equal unpacked ones, per sequence, for every supported family."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from opsdl.model import decoder, enable_checkpointing, lm_head, packed_hidden_states, tiny_config
from opsdl.packing import own_attention, pack

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2"]


# bf16 runs on CUDA only, where it takes flash-attn's or PyTorch's varlen kernel (16-bit only).
DTYPES = [(torch.float32, 1e-5)] + ([(torch.bfloat16, 3e-2)] if torch.cuda.is_available() else [])


def _model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype).eval()


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda x: str(x))
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_hidden_states_equal_unpacked(family, dtype, tol):
    model = _model(family, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    lengths = [7, 1, 13, 10]  # includes a length-1 sequence; 13 > gemma2's sliding window of 8
    seqs = [torch.randint(0, 512, (n,), generator=gen, device="cpu").tolist() for n in lengths]
    device = model.device
    with torch.no_grad():
        packed = packed_hidden_states(model, pack(seqs, device=device))
        for seq, start in zip(seqs, pack(seqs).cu_seqlens[:-1].tolist()):
            with own_attention(model):
                alone = decoder(model)(input_ids=torch.tensor([seq], device=device)).last_hidden_state[0]
            got = packed[start:start + len(seq)]
            assert torch.allclose(got.float(), alone.float(), rtol=tol, atol=tol), (family, (got - alone).abs().max())


def _packed_gradients(model, seqs, probe) -> dict:
    model.zero_grad(set_to_none=True)
    (packed_hidden_states(model, pack(seqs, device=model.device)) * probe).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_gradient_checkpointing_keeps_packed_sequences_apart(family):
    """The non-reentrant recompute in the backward runs the same packed attention as the forward:
    gradients with and without checkpointing agree, and equal those of each sequence alone."""
    model = _model(family).train()
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (9, 4, 12)]
    probe = torch.randn(25, 64, generator=gen).to(model.device)
    plain = _packed_gradients(model, seqs, probe)
    enable_checkpointing(model)
    checkpointed = _packed_gradients(model, seqs, probe)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-5, atol=1e-5), (family, name)
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()  # the name since transformers 5.24; earlier 5.x: gradient_checkpointing_disable
    model.zero_grad(set_to_none=True)
    with own_attention(model):  # each sequence alone, the model's own attention
        start = 0
        for seq in seqs:
            hidden = decoder(model)(input_ids=torch.tensor([seq], device=model.device)).last_hidden_state[0]
            (hidden * probe[start:start + len(seq)]).sum().backward()
            start += len(seq)
    for name, p in model.named_parameters():
        if name in plain:
            scale = plain[name].abs().max()  # sums over differently shaped passes: fp32 rounding of the largest
            assert torch.allclose(plain[name], p.grad, rtol=1e-5, atol=1e-5 * scale), (family, name)


def test_own_attention_is_restored_and_never_saved(tmp_path):
    model = _model("llama")
    own = model.config._attn_implementation
    packed_hidden_states(model, pack([[1, 2, 3]], device=model.device))
    assert model.config._attn_implementation == "opsdl_varlen"
    with own_attention(model):
        assert model.config._attn_implementation == own
    assert model.config._attn_implementation == "opsdl_varlen"
    with pytest.raises(ValueError, match="own_attention"):
        decoder(model)(input_ids=torch.tensor([[1, 2, 3]], device=model.device))
    model.save_pretrained(tmp_path)
    assert "opsdl" not in (tmp_path / "config.json").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a fact measured on the CPU path")
def test_transformers_alone_does_not_isolate_packed_sequences():
    """Why the registered attention exists: with only restarted position ids, sdpa leaks (CPU)."""
    model = _model("llama")
    seqs = [[5, 6, 7, 8], [9, 10, 11]]
    p = pack(seqs, device=model.device)
    with torch.no_grad():
        leaky = decoder(model)(input_ids=p.input_ids, position_ids=p.position_ids).last_hidden_state[0, 4:]
        alone = decoder(model)(input_ids=torch.tensor([seqs[1]], device=model.device)).last_hidden_state[0]
    assert not torch.allclose(leaky, alone, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_head_found(family):
    model = _model(family)
    head = lm_head(model)
    assert head.weight.shape == (512, 64)
    assert head.softcap == (30.0 if family == "gemma2" else None)
    hidden = torch.randn(3, 64)
    logits = model.lm_head(hidden)
    if head.softcap:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    expected = hidden @ head.weight.t()
    if head.softcap:
        expected = head.softcap * torch.tanh(expected / head.softcap)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_tied_embeddings_are_the_head():
    model = AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=True))
    assert lm_head(model).weight is model.get_input_embeddings().weight


def test_pack_layout_and_errors():
    p = pack([[1, 2, 3], [4], [5, 6]])
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert p.cu_seqlens.tolist() == [0, 3, 4, 6] and p.max_length == 3
    with pytest.raises(ValueError, match="sequences"):
        pack([])
    with pytest.raises(ValueError, match="sequences"):
        pack([[1], []])


def test_rope_stretch_is_position_interpolation(tmp_path):
    from opsdl.model import stretch_rope

    plain, stretched = _model("llama"), _model("llama")
    stretch_rope(stretched, 2.0)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3), device="cpu").to(plain.device)
    pos = torch.arange(12, device=plain.device)[None]
    with torch.no_grad():
        a = decoder(stretched)(input_ids=ids, position_ids=2 * pos).last_hidden_state
        b = decoder(plain)(input_ids=ids, position_ids=pos).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5) and stretched.config.max_position_embeddings == 2048
    stretched.save_pretrained(tmp_path)  # the scaling travels with a checkpoint
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        c = decoder(reloaded.to(plain.device))(input_ids=ids, position_ids=2 * pos).last_hidden_state
    assert torch.allclose(a, c, atol=1e-5)
    with pytest.raises(ValueError, match="rope_factor"):
        stretch_rope(_model("llama"), 0.5)


@pytest.mark.parametrize("shape,parameters", [("qwen2.5-1.5b", 1_543_714_304), ("qwen2.5-7b", 7_615_616_512),
                                              ("llama-3.1-8b", 8_030_261_248)])
def test_real_shapes_have_the_real_parameter_counts(shape, parameters):
    """random:<shape> models are the published models' sizes (built on the meta device: no memory)."""
    from opsdl.model import REAL_SHAPES

    from transformers import AutoConfig

    family, fields = REAL_SHAPES[shape]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **fields))
    assert sum(p.numel() for p in model.parameters()) == parameters


# --- softcap and sliding-window layers: never a (heads, L, L) matrix (issue #19 part E) ---

def _exact_rows(q, k, v, bounds, scaling, softcap, window):
    """The exact per-segment reference: (heads, L, L) scores of every segment."""
    from opsdl.packing import _segment_attention

    return torch.cat([_segment_attention(q[0, :, a:b], k[0, :, a:b], v[0, :, a:b], scaling, softcap, window)
                      for a, b in zip(bounds[:-1], bounds[1:])])


BOUNDS = (0, 7, 8, 21, 31, 100)  # uneven, a length-1 segment, segments longer than a window of 8


@pytest.mark.parametrize("softcap,window,budget", [(50.0, 8, None), (None, 8, None), (50.0, None, None),
                                                   (5.0, 3, None), (50.0, 8, 2000), (50.0, None, 2000)])
def test_chunked_attention_is_the_exact_attention(softcap, window, budget, monkeypatch):
    """In float64 the chunked path (forward and its own backward) equals the exact per-segment
    path to rounding (observed <= 2e-13): the same function, only summed in another order. A
    2000-byte budget forces chunks of one to three rows (the budget branch)."""
    from opsdl import packing

    if budget is not None:
        monkeypatch.setattr(packing, "SCORES_BUDGET_BYTES", budget)
        assert packing._chunk_rows(4, 93, window) <= 3  # 31+ chunks of the 93-token segment
    gen = torch.Generator().manual_seed(4)
    T = BOUNDS[-1]
    q, k, v = (torch.randn(1, h, T, 16, generator=gen, dtype=torch.float64) * s for h, s in ((4, 3), (2, 3), (2, 1)))
    probe = torch.randn(T, 4, 16, generator=gen, dtype=torch.float64)
    grads = []
    for attend in (packing._chunked_varlen, _exact_rows):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*inputs, BOUNDS, 0.25, softcap, window)
        (out * probe).sum().backward()
        grads.append([out.detach()] + [t.grad for t in inputs])
    for got, want in zip(*grads):
        assert torch.allclose(got, want, rtol=0, atol=1e-10), (got - want).abs().max()


def test_chunk_rows_fit_the_budget():
    from opsdl import packing

    for heads, length, window in [(16, 16384, None), (16, 16384, 4096), (32, 131072, None), (8, 50, 8)]:
        rows = packing._chunk_rows(heads, length, window)
        keys = length if window is None else min(length, rows + window - 1)
        assert rows == 1 or 4 * 4 * heads * rows * keys <= packing.SCORES_BUDGET_BYTES, (heads, length, window, rows)
        assert 1 <= rows <= length


@pytest.mark.parametrize("window", [None, 8, 200])
def test_block_mask_is_torchs_dense_one(window):
    """The block mask built a few block-rows at a time has the blocks of torch's create_block_mask
    (which builds the whole (L, L) boolean) for the same mask_mod."""
    from torch.nn.attention.flex_attention import create_block_mask

    from opsdl.packing import _block_mask, _document_mask_mod

    bounds = (0, 100, 101, 300, 517)
    ours = _block_mask(bounds, window, torch.device("cpu"))
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor([100, 1, 199, 217]))
    dense = create_block_mask(_document_mask_mod(doc, window), 1, 1, 517, 517, device="cpu")
    for name in ("kv", "full_kv", "q", "full_q"):
        nums, idx = getattr(ours, f"{name}_num_blocks"), getattr(ours, f"{name}_indices")
        assert torch.equal(nums, getattr(dense, f"{name}_num_blocks").to(nums.dtype)), name
        for row, n in enumerate(nums[0, 0].tolist()):
            assert set(idx[0, 0, row, :n].tolist()) == set(getattr(dense, f"{name}_indices")[0, 0, row, :n].tolist())
    assert _block_mask(bounds, window, torch.device("cpu")) is ours  # cached: a forward's layers share it


def _no_dense_scores(monkeypatch):
    """The exact path raises for softcap/window layers: a test passing under it never built (heads, L, L)."""
    from opsdl import packing

    exact = packing._segment_attention

    def plain_only(q, k, v, scaling, softcap, sliding_window):
        if softcap is not None or sliding_window is not None:
            raise AssertionError("the (heads, L, L) path ran for a softcap/window layer")
        return exact(q, k, v, scaling, softcap, sliding_window)
    monkeypatch.setattr(packing, "_segment_attention", plain_only)


def _exact_dispatch(monkeypatch):
    """Route softcap/window layers to the exact per-segment path (the reference)."""
    from opsdl import packing

    monkeypatch.setattr(packing, "_chunked_varlen", lambda q, k, v, bounds, scaling, softcap, window:
                        _exact_rows(q, k, v, bounds, scaling, softcap, window))


WINDOWED = {"gemma2": {}, "mistral": {"sliding_window": 8}}  # gemma2: softcap 50 and window 8 (alternate layers)


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_packed_softcap_and_window_layers_match_the_exact_path(family, monkeypatch):
    """Packed hidden states and parameter gradients of the float32 model agree with the exact
    (heads, L, L) path, both measured against the exact path in float64: the new path's error is
    at most twice the exact float32 path's own (plus 1e-6 of the largest value), i.e. it is as
    good as the exact path up to float32 rounding noise."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **WINDOWED[family]), dtype=torch.float64).train()
    gen = torch.Generator().manual_seed(6)
    seqs = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (20, 1, 9, 33, 2)]
    probe = torch.randn(65, 64, generator=gen, dtype=torch.float64)

    def run(dtype):
        model.to(dtype).zero_grad(set_to_none=True)
        hidden = packed_hidden_states(model, pack(seqs))
        (hidden * probe.to(dtype)).sum().backward()
        return {"hidden": hidden.detach().double(), **{n: p.grad.double() for n, p in model.named_parameters()
                                                      if p.grad is not None}}

    with monkeypatch.context() as m:
        _exact_dispatch(m)
        reference = run(torch.float64)
        exact32 = run(torch.float32)
    _no_dense_scores(monkeypatch)
    new32 = run(torch.float32)
    assert reference.keys() == new32.keys() and len(reference) > 10
    for name, want in reference.items():
        floor = 1e-6 * want.abs().max()
        new_err, exact_err = (new32[name] - want).abs().max(), (exact32[name] - want).abs().max()
        assert new_err <= 2 * exact_err + floor, (family, name, new_err, exact_err)


def test_flex_path_is_the_exact_attention_on_cpu(monkeypatch):
    """The flex path (CUDA's in training; forced here) in a packed gemma2 forward: softcap
    score_mod, document/causal/window block mask, GQA. Forward only: torch 2.13's flex has no
    backward on the CPU (its fp32/bf16 backward was checked on an H200 against float64). One
    compilation (about 15 s; a second one in the process fails on the CPU in torch 2.13): sliding
    and global layers share one mask_mod code, and 280 tokens make three 128-token blocks (a
    one-block row would be specialised and compile again)."""
    from opsdl import packing

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gemma2")).eval()
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (140, 1, 9, 130)]
    with torch.no_grad(), monkeypatch.context() as m:
        _exact_dispatch(m)
        want = packed_hidden_states(model, pack(seqs))
    _no_dense_scores(monkeypatch)
    monkeypatch.setattr(packing, "_chunked_varlen", None)  # not callable: only flex may run
    monkeypatch.setattr(packing, "_flex_runs_on", lambda device: True)
    with torch.no_grad():
        got = packed_hidden_states(model, pack(seqs))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def test_cpu_softcap_layers_take_the_chunked_path():
    from opsdl.packing import _flex_runs_on

    assert not _flex_runs_on(torch.device("cpu"))  # flex has no CPU backward in torch 2.13


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA dispatch")
def test_cuda_softcap_layers_take_flex(monkeypatch):
    from opsdl import packing

    if not packing._flex_runs_on(torch.device("cuda")):
        pytest.skip("no Triton/dynamo here")
    model = _model("gemma2").cuda().train()
    _no_dense_scores(monkeypatch)
    monkeypatch.setattr(packing, "_chunked_varlen", None)
    packed_hidden_states(model, pack([[1] * 140, [2] * 3], device="cuda")).sum().backward()
