"""Matrix products with fp32 output from 16-bit operands: the logits and the fp32 accumulations.

On CUDA with torch >= 2.8, ``torch.mm(a, b, out_dtype=torch.float32)`` makes cuBLAS write fp32 from
bf16/fp16 operands at the 16-bit rate (measured on an H200: 55.0 ms against 54.0 ms for bf16 output
at the design shape, with ten times less gradient error). Each form is probed on its own, per device
and dtype (``product_forms``): torch 2.8/2.9 on CUDA take ``mm(out_dtype=)`` but refuse
``addmm(out_dtype=)`` into an fp32 accumulator, which then becomes ``mm`` into a temporary and an
add. Where ``mm(out_dtype=)`` is missing (the CPU backend of every torch release, CUDA before torch
2.8) the logit products take an fp32 copy of the 16-bit weight (``logit_operand``) and run as fp32
products; a warning says so once per process, with the copy's size.

On the CPU, 16-bit products are fast only where PyTorch hands them to oneDNN (the CPU reports
AVX-512, or bf16/fp16 units); elsewhere (AVX2: below 1 GFLOP/s) they are computed here from fp32
blocks of the operands, rounded once. On a CPU with AMX-BF16 the fp32 products of bf16 values run on
the bf16 units through oneDNN's bf16 math mode, which is exact for them.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

# elements of each fp32 block of the operands that an upcasting fallback holds at once (16 MiB)
UPCAST_BLOCK = 1 << 22
_warned: set = set()


@dataclass(frozen=True)
class ProductForms:
    """Which fp32-output products torch offers for 16-bit operands on one device."""

    mm: bool  # torch.mm(a, b, out_dtype=torch.float32, out=fp32)
    addmm: bool  # torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc), acc fp32


def _works(product) -> bool:
    try:
        product()
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=None)
def _probe(device_type: str, index: Optional[int], dtype: torch.dtype) -> ProductForms:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    a = torch.ones(8, 8, dtype=dtype, device=device)
    out = torch.zeros(8, 8, dtype=torch.float32, device=device)
    return ProductForms(mm=_works(lambda: torch.mm(a, a.t(), out_dtype=torch.float32, out=out)),
                        addmm=_works(lambda: torch.addmm(out, a, a, out_dtype=torch.float32, out=out)))


def product_forms(device: torch.device, dtype: torch.dtype) -> ProductForms:
    """The fp32-output forms that work for ``dtype`` operands on ``device``, probed once per
    (device type, index, dtype) on 8 x 8 products."""
    return _probe(device.type, device.index, dtype)


def has_fp32_output(device_type: str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the logit products take ``dtype`` operands with fp32 output on this device type."""
    return product_forms(torch.device(device_type), dtype).mm


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def native_16bit_products(dtype: torch.dtype) -> bool:
    """Whether PyTorch runs ``dtype`` products on the CPU through oneDNN (the check it makes itself,
    which follows ONEDNN_MAX_CPU_ISA): bf16 from AVX-512 on, fp16 with AVX512-FP16 or AMX-FP16.
    Without it ATen's reference loops run below 1 GFLOP/s."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return torch.backends.mkldnn.is_available() and bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return False


def _fast_products(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type != "cpu" or native_16bit_products(dtype)


def _exact_bf16_math(dtype: torch.dtype, device: torch.device) -> bool:
    """fp32 products of bf16 values may run on the CPU's AMX-BF16 units: rounding them to bf16
    changes nothing."""
    return (dtype == torch.bfloat16 and device.type == "cpu" and "amx_bf16" in cpu_flags()
            and torch.backends.mkldnn.is_available())


@contextlib.contextmanager
def _fp32_products_of(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Around fp32 products whose operands are upcast ``dtype`` values: oneDNN's bf16 math mode
    where that is exact and AMX is there (process-wide while it lasts), else nothing."""
    if not _exact_bf16_math(dtype, device):
        yield
        return
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def _warn_once(case: tuple, message: str) -> None:
    if case not in _warned:
        _warned.add(case)
        warnings.warn(f"opsdl_kernels: {message}", stacklevel=3)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def _where(device: torch.device) -> str:
    if device.type != "cpu":
        return str(device)
    flags = [f for f in ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16") if f in cpu_flags()]
    return (f"cpu (capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{'flags ' + ' '.join(flags) if flags else 'no bf16/fp16 units'})")


def logit_operand(weight: Tensor) -> Tensor:
    """The weight as the logit products take it: itself, or an fp32 copy where fp32 output from
    16-bit operands is not available."""
    if weight.dtype == torch.float32 or product_forms(weight.device, weight.dtype).mm:
        return weight
    rate = ("run on the bf16 units (oneDNN's bf16 math mode)" if _exact_bf16_math(weight.dtype, weight.device)
            else "run at the fp32 rate")
    _warn_once(("fp32 weight copy", weight.device.type, weight.dtype),
               f"torch {torch.__version__} on {_where(weight.device)} has no torch.mm(..., out_dtype=torch.float32) "
               f"for {str(weight.dtype).replace('torch.', '')} operands: the logit products take an fp32 copy of "
               f"the weight ({_size(weight.numel() * 4)} for this {weight.shape[0]} x {weight.shape[1]} "
               f"weight, held for the call) and {rate}")
    return weight.float()


def mm_fp32(x: Tensor, w: Tensor, out: Tensor) -> Tensor:
    """``out = x @ w.T`` in fp32 (fp32 accumulation and output) for a weight from ``logit_operand``."""
    if x.dtype == w.dtype == torch.float32:
        return torch.mm(x, w.t(), out=out)
    if w.dtype == torch.float32:  # the fallback: w is an fp32 copy
        with _fp32_products_of(x.dtype, x.device):
            return torch.mm(x.float(), w.t(), out=out)
    return torch.mm(x, w.t(), out_dtype=torch.float32, out=out)


def _upcast_addmm_(acc: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``acc += alpha * a @ b`` (``acc`` fp32) as fp32 products over blocks of the inner dimension,
    each operand block upcast on its own: never an fp32 copy of a whole operand."""
    step = max(256, UPCAST_BLOCK // max(a.shape[0], b.shape[1]))
    with _fp32_products_of(a.dtype, a.device):
        for k0 in range(0, a.shape[1], step):
            acc.addmm_(a[:, k0:k0 + step].float(), b[k0:k0 + step].float(), alpha=alpha)
    return acc


def addmm_fp32_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``, ``b`` in any float dtype."""
    if a.dtype == b.dtype == torch.float32:
        return acc.addmm_(a, b)
    forms = product_forms(acc.device, a.dtype)
    if forms.addmm:
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    if forms.mm:  # a temporary of acc's size, no fp32 copy of an operand
        return acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    return _upcast_addmm_(acc, a, b)


def scaled_mm_(out: Tensor, a: Tensor, b: Tensor, alpha: float, accumulate: bool) -> Tensor:
    """``out = alpha * a @ b`` (``+ out`` when ``accumulate``), in ``out``'s dtype, with ``alpha``
    applied in fp32 before the single rounding, so a small scale never underflows a 16-bit operand.

    Without ``accumulate`` ``out`` is zeroed and then accumulated into (beta=1), never asked for
    beta=0: oneDNN's AVX-512/AMX bf16 path given beta=0 has kept NaN rows from uninitialised memory.
    On a CPU without 16-bit products (``native_16bit_products``) the product runs in fp32 over
    row blocks of ``out``, each rounded once."""
    if a.dtype != torch.float32 and not _fast_products(out.device, a.dtype):
        _warn_once(("fp32 gradient products", out.device.type, a.dtype),
                   f"torch {torch.__version__} on {_where(out.device)} runs {str(a.dtype).replace('torch.', '')} "
                   f"products in reference loops (below 1 GFLOP/s): the gradient products run at the fp32 rate on "
                   f"fp32 blocks of their operands (up to {_size(UPCAST_BLOCK * 4)} each)")
        rows = max(1, UPCAST_BLOCK // max(b.shape[1], min(a.shape[1], 4096)))
        for m0 in range(0, out.shape[0], rows):
            part = out[m0:m0 + rows]
            acc = part.float() if accumulate else torch.zeros(part.shape, dtype=torch.float32, device=out.device)
            part.copy_(_upcast_addmm_(acc, a[m0:m0 + rows], b, alpha))
        return out
    if not accumulate:
        out.zero_()
    return out.addmm_(_dense(a), _dense(b), alpha=alpha)


def _dense(x: Tensor) -> Tensor:
    """A 16-bit CPU operand as a row- or column-major matrix (a copy of a view with a wider row stride,
    the size of that view): oneDNN's AMX bf16 product given such a view has written NaN rows (measured
    on a Xeon with AMX, torch 2.13); a dense copy does not. Other dtypes and devices pass unchanged."""
    dense = x.is_contiguous() or x.t().is_contiguous()
    return x if dense or x.dtype == torch.float32 or x.device.type != "cpu" else x.contiguous()


def column_sums_(acc: Optional[Tensor], g: Tensor) -> None:
    """``acc += g.sum(0)`` in fp32 (the bias gradient)."""
    if acc is not None:
        acc += g.sum(0, dtype=torch.float32)
