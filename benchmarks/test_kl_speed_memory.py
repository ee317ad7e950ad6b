"""Speed and memory of forward + backward for every provider over the shape grid.

On CUDA: the GPU grid in bf16, with peak extra memory, TFLOP/s and the fraction of the floor in
``extra_info``. Without CUDA: small fp32 shapes, PyTorch providers only. Never fails on a timing.
"""
from __future__ import annotations

import os

import pytest
import torch

from .conftest import DEVICE, record, unmeasured
from .measure import peak_extra_bytes, step
from .problems import CPU_SHAPES, GPU_SHAPES, floor_flops, make_problem, select
from .providers import PROVIDERS

SHAPES = select(GPU_SHAPES if DEVICE == "cuda" else CPU_SHAPES, os.environ.get("OPSDL_BENCH_SHAPES", "all"))
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
ROUNDS = 3 if DEVICE == "cuda" else 2


# shape outermost: every provider at one shape before the next shape
@pytest.mark.parametrize("name", list(PROVIDERS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward(benchmark, name, shape, matmul_tflops):
    provider = PROVIDERS[name]
    if DEVICE not in provider.devices:
        pytest.skip(f"{name} is not timed on {DEVICE}")
    if not provider.available():
        unmeasured(name, str(shape), f"{provider.requires} missing")
        pytest.skip(f"{provider.requires} is not installed")
    benchmark.group = str(shape)
    problem = make_problem(shape, DTYPE, DEVICE)
    try:
        peak = peak_extra_bytes(provider.loss, problem)
        loss = benchmark.pedantic(step, args=(provider.loss, problem, DEVICE), rounds=ROUNDS,
                                  warmup_rounds=1, iterations=1)
    except torch.OutOfMemoryError:
        unmeasured(name, str(shape), "out of memory")
        del problem
        torch.cuda.empty_cache()
        pytest.skip("out of memory")
    assert torch.isfinite(loss), f"{name} gave a non-finite loss"
    seconds = benchmark.stats.stats.median
    info = {"provider": name, "n": shape.n, "hidden": shape.hidden, "vocab": shape.vocab,
            "dtype": str(DTYPE).replace("torch.", ""), "device": DEVICE, "loss": float(loss),
            "median_ms": seconds * 1e3,
            "peak_extra_mib": None if peak is None else peak / 2**20}
    if matmul_tflops:
        flops = floor_flops(shape)
        info.update(tflops=flops / seconds / 1e12, matmul_tflops=matmul_tflops,
                    floor_ms=flops / (matmul_tflops * 1e12) * 1e3,
                    fraction_of_floor=flops / (matmul_tflops * 1e12) / seconds)
    benchmark.extra_info.update(info)
    record("timing", info)
