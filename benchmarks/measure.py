"""Timing and memory helpers shared by the benchmark suites."""
from __future__ import annotations

import gc
from typing import Callable, Optional

import torch

from .problems import Problem


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step(loss_fn: Callable[[Problem], torch.Tensor], problem: Problem, device: str) -> torch.Tensor:
    """One forward + backward, finished on the device (so wall time includes the GPU work)."""
    problem.clear_grads()
    loss = loss_fn(problem)
    loss.backward()
    synchronize(device)
    return loss


def peak_extra_bytes(loss_fn: Callable[[Problem], torch.Tensor], problem: Problem) -> Optional[int]:
    """Peak CUDA memory of one step above what was allocated before it (inputs, weights) and beyond
    the gradients it must return; None off CUDA."""
    if not problem.student.is_cuda:
        return None
    step(loss_fn, problem, "cuda")  # compiles, autotunes and creates library workspaces outside the count
    problem.clear_grads()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(loss_fn, problem, "cuda")
    return torch.cuda.max_memory_allocated() - base - problem.grad_bytes()


def bf16_matmul_tflops(size: int = 8192) -> float:
    """The bf16 matmul rate this GPU reaches once warm, on random data (the floor's yardstick):
    the median of ``triton.testing.do_bench`` after a second of warm-up (a cold first timing on an
    H200 read 47 TFLOP/s against about 700 warm)."""
    from triton.testing import do_bench

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=1000, rep=1000, return_mode="median")
    return 2.0 * size**3 / (ms * 1e-3) / 1e12


def relative_norm_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (Frobenius), in float64."""
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm())
