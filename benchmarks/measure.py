"""Timing and memory helpers shared by the benchmark suites."""
from __future__ import annotations

import gc
import time
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
    problem.clear_grads()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(loss_fn, problem, "cuda")
    return torch.cuda.max_memory_allocated() - base - problem.grad_bytes()


def bf16_matmul_tflops(size: int = 8192, repeats: int = 10) -> float:
    """The bf16 matmul rate this GPU reaches now, on random data (the floor's yardstick)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2.0 * size**3 * repeats / (time.perf_counter() - start) / 1e12
