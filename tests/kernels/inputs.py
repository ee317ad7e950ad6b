"""Fresh random inputs for the kernel tests (never zeros), and the per-dtype tolerances."""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

# Where the tests run: "cpu" (Triton interpreted) or "cuda" (compiled), see tests/conftest.py.
DEVICE = torch.device(os.environ.get("OPSDL_TEST_DEVICE", "cpu"))

# Max-norm relative error allowed against the float64 reference (see reference.rel_err).
# fp32 runs with IEEE dot products; 16-bit inputs lose ~3 digits in the gradient tiles they feed
# to the tensor-core products (G is rounded to the input dtype, as on the GPU): a few units of the
# dtype's roundoff u (bf16 2^-9, fp16 2^-12) plus that of the 16-bit output. Bounds and the worst
# errors measured over the whole kernel suite (2026-12-04, AMD EPYC AVX-512, and the same under
# ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2): fp32 4.4e-6 (margin 4.5x), fp16 6.7e-4 (15x),
# bf16 6.8e-3 = 3.5 u (2.9x): a BLAS that blocks its sums otherwise moves these by a small multiple
# of u, well inside the margins, while a wrong term is off by O(1).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IMPLS = ["torch", "triton"]
MEMORY = ["fast", "lean"]  # the two gradient paths


def make_inputs(
    lead: tuple[int, ...], hidden: int, vocab: int, *, dtype: torch.dtype, seed: int,
    teacher_hidden: Optional[int] = None, logit_scale: float = 3.0,
    bias: bool = False, teacher_bias: bool = False, mask: bool = False, token_weights: bool = False,
    targets: bool = True,
) -> dict:
    """Keyword arguments for fused_kl_loss; teacher_hidden set means a separate teacher weight.
    Drawn on the CPU from a seeded generator (the same numbers on any machine), then moved to DEVICE."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cpu") * scale).to(DEVICE)

    h = randn(*lead, hidden)
    w = randn(vocab, hidden, scale=logit_scale / math.sqrt(hidden))
    out = {"weight": w.to(dtype).requires_grad_()}
    if teacher_hidden is None:
        g = h + randn(*lead, hidden, scale=0.7)  # a teacher that disagrees, but not wildly
    else:
        g = randn(*lead, teacher_hidden)
        out["teacher_weight"] = randn(vocab, teacher_hidden, scale=logit_scale / math.sqrt(teacher_hidden)).to(dtype)
    out["student_hidden"] = h.to(dtype).requires_grad_()
    out["teacher_hidden"] = g.to(dtype)
    if bias:
        out["bias"] = randn(vocab, scale=0.5).to(dtype).requires_grad_()
    if teacher_bias:
        out["teacher_bias"] = randn(vocab, scale=0.5).to(dtype)
    if targets:
        out["targets"] = torch.randint(0, vocab, lead, generator=gen, device="cpu").to(DEVICE)
    if mask:
        m = (torch.rand(*lead, generator=gen, device="cpu") < 0.6).to(DEVICE)
        m.view(-1)[0] = True
        m.view(-1)[-1] = False if m.numel() > 1 else True
        out["mask"] = m
    if token_weights:
        out["token_weights"] = (torch.rand(*lead, generator=gen, device="cpu") + 0.5).to(DEVICE)
    return out


def grads_of(inputs: dict) -> tuple:
    return tuple(None if inputs.get(k) is None else inputs[k].grad for k in ("student_hidden", "weight", "bias"))


def clear_grads(inputs: dict) -> None:
    for k in ("student_hidden", "weight", "bias"):
        if inputs.get(k) is not None:
            inputs[k].grad = None


def cpu_randn(*shape: int, seed: int) -> torch.Tensor:
    """Seeded standard normals drawn on the CPU, moved to DEVICE."""
    return torch.randn(*shape, generator=torch.Generator(device="cpu").manual_seed(seed), device="cpu").to(DEVICE)
