"""Launch configurations: the fused forward's autotune lists per GPU generation (with the shared
memory each must fit), and the row kernels' fixed launches.

The fused forward keeps two fp32 accumulators of BLOCK_M x BLOCK_V in registers and streams
BLOCK_K-wide slices of the hidden states and the weight through shared memory, ``num_stages`` deep.
``shared_memory_bytes`` is the estimate the tests hold every config to. ``OPSDL_PIN_CONFIG=1``
makes autotuning keep only the first config that fits (the GPU test mode sets it: one compile
per kernel variant instead of several).

The row kernels stream rows and need no tuning to be memory-bound: one row per program,
``ROW_WARPS`` warps. The state kernel keeps six per-lane vectors (max, sum, accumulator of each
side) across its column loop: ``STATE_BLOCK`` = 1024 columns per step (4 fp32 per thread and
operand) holds it to about 48 registers, five programs per SM (2048 columns: about 97, two). The
gradient kernel keeps nothing across steps and takes ``GRAD_BLOCK`` = 2048 (8 per thread). Under
the interpreter a program takes ``INTERPRETER_ROWS`` rows (it runs programs one by one in Python)
and steps ``INTERPRETER_ROW_BLOCK`` columns, so the small test shapes take several steps per row.
"""
from __future__ import annotations

import contextlib
import inspect
import os

import torch
import triton

# Shared memory per block that a kernel may use (opt-in maximum), bytes.
SHARED_MEMORY_LIMIT = {
    "hopper": 227 * 1024,  # sm_90
    "ampere": 163 * 1024,  # sm_80 (A100); sm_86/89 have 99 KiB and use the "ampere_small" list
    "ampere_small": 99 * 1024,
}

# Every BLOCK_V divides VOCAB_SPLIT_ALIGN, so vocabulary splits always fall on tile boundaries.
VOCAB_SPLIT_ALIGN = 256


def _cfg(bm: int, bv: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Every config keeps both accumulators and the online update in registers (no spill in any variant;
# the GPU compile test holds them to it): BLOCK_M x BLOCK_V = 8192 over 8 warps, 32 fp32 per thread
# per accumulator. Tiles of 64 per thread (128 x 128 or 64 x 256 over 8 warps, 64 x 128 over 4)
# spilled 550-1350 bytes per thread on sm_90 and sm_80.
FORWARD_CONFIGS = {
    "hopper": [
        _cfg(128, 64, 32, 8, 4),  # first (the one pinned): each warp owns whole rows, no cross-warp row reduction
        _cfg(64, 128, 64, 8, 3),
        _cfg(64, 128, 32, 8, 4),
        _cfg(64, 128, 64, 8, 4),
    ],
    "ampere": [
        _cfg(64, 128, 32, 8, 4),
        _cfg(128, 64, 32, 8, 4),
        _cfg(64, 128, 64, 8, 3),
    ],
    "ampere_small": [
        _cfg(64, 128, 32, 8, 3),
        _cfg(128, 64, 32, 8, 3),
    ],
}

# Used when no listed config fits (fp32 inputs on a small-shared-memory card).
FALLBACK_CONFIG = _cfg(32, 64, 32, 4, 2)

# One small config for the CPU interpreter: autotuning there would only multiply the run time.
INTERPRETER_CONFIG = _cfg(16, 32, 16, 1, 1)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launches go to the current CUDA device: make it the tensor's (tensors on cuda:1 while
    cuda:0 is current would otherwise be read from the wrong device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def shared_memory_bytes(config: triton.Config, element_bytes: int) -> int:
    """Upper estimate of the shared memory one program of the fused forward needs: per pipeline
    stage, in the worst case, a BLOCK_M x BLOCK_K slice of the student and of the teacher hidden
    states and a BLOCK_V x BLOCK_K slice of each of two lm-head weights (separate teacher weight)."""
    bm, bv, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_V", "BLOCK_K"))
    return config.num_stages * (2 * bm * bk + 2 * bv * bk) * element_bytes


def generation(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "hopper"
    if (major, minor) == (8, 0):
        return "ampere"
    return "ampere_small"


def all_configs(table: dict[str, list[triton.Config]]) -> list[triton.Config]:
    if interpreting():
        return [INTERPRETER_CONFIG]
    return [c for configs in table.values() for c in configs] + [FALLBACK_CONFIG]


def unspecialised(ints: list[str], pointers: list[str]) -> dict:
    """``triton.jit`` options: never specialise the integer arguments ``ints`` on being 1 or
    divisible by 16, nor ``pointers`` (and ``ints``) on alignment (older Triton: one option for both)."""
    if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters:
        return {"do_not_specialize": ints, "do_not_specialize_on_alignment": ints + pointers}
    return {"do_not_specialize": ints + pointers}


def pinned() -> bool:
    return os.environ.get("OPSDL_PIN_CONFIG", "0") == "1"


def prune_for_device(table: dict[str, list[triton.Config]]):
    """An ``early_config_prune`` hook: the configs listed for the current GPU that fit its shared
    memory at the inputs' element size (only the first with ``OPSDL_PIN_CONFIG=1``), or the
    fallback when none does."""

    def prune(configs, named_args, **kwargs):
        if interpreting():
            return configs
        gen = generation(torch.device("cuda", torch.cuda.current_device()))
        element_bytes = named_args["h_ptr"].element_size()
        fitting = [
            c for c in table[gen]
            if shared_memory_bytes(c, element_bytes) <= SHARED_MEMORY_LIMIT[gen]
        ]
        return (fitting[:1] if pinned() else fitting) or [FALLBACK_CONFIG]

    return prune


ROW_ROWS, ROW_WARPS = 1, 8
STATE_BLOCK, GRAD_BLOCK = 1024, 2048
INTERPRETER_ROW_BLOCK, INTERPRETER_ROWS = 128, 32


def row_launch(width: int, block: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps) of a row kernel stepping ``block`` columns (``STATE_BLOCK`` or
    ``GRAD_BLOCK``) over rows of ``width`` columns."""
    rows, block = (INTERPRETER_ROWS, INTERPRETER_ROW_BLOCK) if interpreting() else (ROW_ROWS, block)
    return rows, min(block, max(16, triton.next_power_of_2(width))), ROW_WARPS
