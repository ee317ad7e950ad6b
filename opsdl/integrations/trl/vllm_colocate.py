"""TRL's vLLM colocate mode (``use_vllm=True, vllm_mode="colocate"``) for opsdl's models and on
vLLM's CPU backend. TRL 1.16 (``trl/generation/vllm_generation.py``) has two gaps there:

- it starts vLLM from ``model.name_or_path``, a Hugging Face folder or hub id. A model that
  ``opsdl`` built in memory (``tiny:<family>``) or dequantised from the embedded GGUF has neither:
  such a model and its tokenizer are written to a temporary folder for vLLM to open, removed once
  the engine has started (said once: it costs the model's size on disk for that time);
- it pushes the trainer's weights with the model's ``load_weights``, one tensor at a time, which
  vLLM's CPU backend refuses (its linear layers drop their weights after repacking them for
  oneDNN). On the CPU the weights go through the worker's ``reload_weights``, all in one call,
  as ``opsdl``'s own engine does; TRL's own walk over the parameters (PEFT merge, FSDP gather,
  vLLM's names) is kept.

On the CPU the colocated engine also runs eagerly, as ``opsdl``'s own (TRL leaves vLLM's default,
an inductor compilation that takes minutes on a few cores), with a KV cache of the size its
sequences need (``_cpu_engine``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from typing import Iterator

from accelerate.utils import is_peft_model
from torch import nn

from ...vllm_rollout import kv_bytes_per_token, reload_worker_weights

logger = logging.getLogger(__name__)
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _opens_in_vllm(name_or_path: str) -> bool:
    """A folder with a config.json, or a hub id that is not a local path."""
    if os.path.isdir(name_or_path):
        return os.path.isfile(os.path.join(name_or_path, "config.json"))
    return not os.path.exists(name_or_path) and _HUB_ID.fullmatch(name_or_path) is not None


@contextlib.contextmanager
def _cpu_engine(model: nn.Module) -> Iterator[None]:
    """On vLLM's CPU backend, TRL's ``LLM(...)`` call runs the engine eagerly with a KV cache sized for
    its own sequences (``max_num_seqs`` x ``max_model_len`` tokens), unless VLLM_CPU_KVCACHE_SPACE
    says otherwise: without a size, vLLM's CPU worker takes ``gpu_memory_utilization`` of the host
    memory minus what the whole process already holds, which a trainer's process can exceed."""
    import trl.generation.vllm_generation as trl_vllm
    from vllm.platforms import current_platform

    engine = trl_vllm.LLM

    def cpu_engine(**options):
        if options.get("max_num_seqs") and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            config = model.config
            length = options.get("max_model_len") or config.max_position_embeddings
            value_bytes = next(model.parameters()).element_size()  # vLLM's dtype "auto": the model's
            options.setdefault("kv_cache_memory_bytes",
                               options["max_num_seqs"] * length * kv_bytes_per_token(config, value_bytes))
        return engine(enforce_eager=True, **options)

    if current_platform.is_cpu():
        trl_vllm.LLM = cpu_engine
    try:
        yield
    finally:
        trl_vllm.LLM = engine


@contextlib.contextmanager
def colocated_engine_start(model: nn.Module, tokenizer, args) -> Iterator[None]:
    """While TRL starts a colocated engine: ``model.name_or_path`` names a folder vLLM opens, and on
    the CPU the engine is eager with its KV cache sized. Without vLLM installed, TRL's own error says so."""
    if not (args.use_vllm and args.vllm_mode == "colocate") or importlib.util.find_spec("vllm") is None:
        yield
        return
    name = getattr(model, "name_or_path", "") or ""
    if _opens_in_vllm(name):
        with _cpu_engine(model):
            yield
        return
    if is_peft_model(model):
        raise ValueError(f"model: use_vllm opens the base model from a Hugging Face folder, and this PEFT model's "
                         f"base has none ({name!r}); save the base with save_pretrained and load it from there, or "
                         "pass the plain model with peft_config")
    folder = tempfile.mkdtemp(prefix="opsdl-trl-vllm-")
    logger.warning("use_vllm: %r is not a folder vLLM opens; the model is written to %s for the engine's start "
                   "and removed after it", name, folder)
    try:
        model.save_pretrained(folder)
        if tokenizer is not None:  # without one, SDFT's own tokenizer loading reports it
            tokenizer.save_pretrained(folder)
        model.name_or_path = folder
        with _cpu_engine(model):
            yield
    finally:
        model.name_or_path = name
        shutil.rmtree(folder, ignore_errors=True)


def reload_weights_on_cpu(generation) -> None:
    """On vLLM's CPU backend, ``generation.sync_weights`` (TRL's ``VLLMGeneration``, colocate mode)
    pushes the weights through the worker's ``reload_weights``."""
    from vllm.platforms import current_platform

    if generation.mode != "colocate" or not current_platform.is_cpu():
        return

    def sync_weights() -> None:
        generation.llm.collective_rpc(reload_worker_weights, args=(generation._iter_named_params(),))
        generation.llm.reset_prefix_cache()

    generation.sync_weights = sync_weights
