"""Benchmark problems: one self-distillation batch, and the FLOP floor it is measured against."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Shape:
    n: int  # rows (response tokens)
    hidden: int
    vocab: int

    def __str__(self) -> str:
        return f"N{self.n}-H{self.hidden}-V{self.vocab}"


# The headline shape (Liger-Kernel's published distillation shape) comes first, so a run cut
# short still has it for every provider; then Qwen2.5-7B's lm-head, a vocabulary sweep, an N sweep.
HEADLINE = Shape(8192, 4096, 128256)
GPU_SHAPES = (
    [HEADLINE, Shape(16384, 3584, 152064)]
    + [Shape(8192, 4096, v) for v in (32768, 65536, 256000)]
    + [Shape(n, 4096, 128256) for n in (1024, 2048, 4096, 16384)]
    + [Shape(n, 3584, 152064) for n in (1024, 4096, 8192)]
)
# Gradient error against float64 is measured on the first 2048 rows of the headline shape.
GPU_ACCURACY_SHAPE = Shape(2048, 4096, 128256)
# Small enough for a 2-core CPU in CI.
CPU_SHAPES = [Shape(256, 256, 8192), Shape(1024, 256, 8192)]
CPU_ACCURACY_SHAPE = Shape(128, 64, 2000)


def select(shapes: list[Shape], which: str) -> list[Shape]:
    """``OPSDL_BENCH_SHAPES``: "headline" (the first shape only), "rest" (all but it) or "all"."""
    if which not in ("all", "headline", "rest"):
        raise ValueError(f"OPSDL_BENCH_SHAPES: expected all, headline or rest, got {which!r}")
    return {"all": shapes, "headline": shapes[:1], "rest": shapes[1:]}[which]


@dataclass
class Problem:
    """Student and teacher hidden states over one shared lm-head weight (self-distillation)."""

    shape: Shape
    student: Tensor  # (N, H), requires grad
    teacher: Tensor  # (N, H), constant
    weight: Tensor  # (V, H), requires grad
    targets: Tensor  # (N,) sampled tokens

    def clear_grads(self) -> None:
        self.student.grad = None
        self.weight.grad = None

    def grad_bytes(self) -> int:
        """What the gradients of student and weight take (part of the memory floor)."""
        return (self.student.numel() + self.weight.numel()) * self.student.element_size()


def make_problem(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> Problem:
    gen = torch.Generator(device=device).manual_seed(seed)
    student = torch.randn(shape.n, shape.hidden, generator=gen, device=device)
    teacher = student + 0.5 * torch.randn(shape.n, shape.hidden, generator=gen, device=device)
    weight = torch.randn(shape.vocab, shape.hidden, generator=gen, device=device) * (2.0 / math.sqrt(shape.hidden))
    targets = torch.randint(0, shape.vocab, (shape.n,), generator=gen, device=device)
    return Problem(shape, student.to(dtype).requires_grad_(), teacher.to(dtype),
                   weight.to(dtype).requires_grad_(), targets)


def floor_flops(shape: Shape) -> float:
    """The no-recompute minimum of ../shared/design/kernels.md: two forward projections and the two
    gradient products, ``2NV(H + H_t) + 4NVH`` = 4 matmul passes of ``2NVH`` each (H_t = H)."""
    return 4 * 2.0 * shape.n * shape.vocab * shape.hidden
