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
    model.activation_checkpointing_disable()
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
