"""Matrix products with fp32 output from 16-bit operands: the logits and the fp32 accumulations.

On CUDA with torch >= 2.8, ``torch.mm(a, b, out_dtype=torch.float32)`` makes cuBLAS write fp32 from
bf16/fp16 operands at the 16-bit rate (measured on an H200: 55.0 ms against 54.0 ms for bf16 output
at the design shape, with ten times less gradient error). Where torch lacks it (the CPU backend of
every torch release, CUDA before torch 2.8) the operands are upcast to fp32 instead: the products
are then fp32 products, slower on a GPU, and the caller keeps an fp32 copy of a 16-bit weight
(``logit_operand``) for the call.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor


@functools.lru_cache(maxsize=None)
def has_fp32_output(device_type: str) -> bool:
    """Whether ``mm`` and ``addmm`` take ``out_dtype=torch.float32`` for 16-bit operands here, in
    the forms used below (into a given fp32 output, and accumulating into it)."""
    try:
        a = torch.ones(8, 8, dtype=torch.bfloat16, device=device_type)
        out = torch.empty(8, 8, dtype=torch.float32, device=device_type)
        torch.mm(a, a.t(), out_dtype=torch.float32, out=out)
        torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def logit_operand(weight: Tensor) -> Tensor:
    """The weight as the logit products take it: itself, or an fp32 copy where fp32 output from
    16-bit operands is not available."""
    if weight.dtype == torch.float32 or has_fp32_output(weight.device.type):
        return weight
    return weight.float()


def mm_fp32(x: Tensor, w: Tensor, out: Tensor) -> Tensor:
    """``out = x @ w.T`` in fp32 (fp32 accumulation and output) for a weight from ``logit_operand``."""
    if x.dtype == w.dtype == torch.float32:
        return torch.mm(x, w.t(), out=out)
    if w.dtype == torch.float32:  # the fallback: w is already an fp32 copy
        return torch.mm(x.float(), w.t(), out=out)
    return torch.mm(x, w.t(), out_dtype=torch.float32, out=out)


def addmm_fp32_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``, ``b`` in any float dtype."""
    if a.dtype == b.dtype == torch.float32:
        return acc.addmm_(a, b)
    if has_fp32_output(acc.device.type):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a.float(), b.float())


def scaled_mm_(out: Tensor, a: Tensor, b: Tensor, alpha: float, accumulate: bool) -> Tensor:
    """``out = alpha * a @ b`` (``+ out`` when ``accumulate``), in ``out``'s dtype; cuBLAS applies
    ``alpha`` in fp32 before the single rounding, so a small scale never underflows a 16-bit
    operand. With ``accumulate=False`` whatever ``out`` held (even NaN) is ignored."""
    return out.addmm_(a, b, beta=1.0 if accumulate else 0.0, alpha=alpha)


def column_sums_(acc: Optional[Tensor], g: Tensor) -> None:
    """``acc += g.sum(0)`` in fp32 (the bias gradient)."""
    if acc is not None:
        acc += g.sum(0, dtype=torch.float32)
