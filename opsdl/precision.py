"""The training loops' compute dtype: bf16 compute over float32 master weights where bf16 products
are fast, float32 elsewhere, and the reason for the choice in words (printed at the start of a run).

How ``--bf16``'s default decides: on CUDA, bf16 when the device supports it
(``torch.cuda.is_bf16_supported``); on a CPU, bf16 when oneDNN runs bf16 products (PyTorch's own
check, which follows ONEDNN_MAX_CPU_ISA) and the CPU has bf16 units (the ``avx512_bf16`` or
``amx_bf16`` flag). Measured: AVX512_BF16 (AMD Zen 4) ran bf16 products at 390-410 GFLOP/s against
135-146 for fp32; AMX (Intel Xeon) 970-2270 against 270-380; a CPU without bf16 units ran them in
ATen's reference loops below 0.1 GFLOP/s.
"""
from __future__ import annotations

from typing import Optional

import torch

from opsdl_kernels.matmul import cpu_flags, native_16bit_products

_BF16_UNITS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_units() -> list[str]:
    """The CPU's bf16 matrix/vector units that oneDNN will use (empty when it will not use any)."""
    if not native_16bit_products(torch.bfloat16):
        return []
    return [flag for flag in _BF16_UNITS if flag in cpu_flags()]


def compute_dtype(bf16: Optional[bool], device: torch.device) -> tuple[torch.dtype, str]:
    """(dtype, why) for --bf16 (True, False, or None: decide by the machine) on ``device``. ``why``
    says what the machine has, and when an explicit --bf16 will be slow."""
    if device.type == "cuda":
        fast, where = torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(device)
        units = "bf16 tensor cores" if fast else "no bf16 support"
    else:
        found = cpu_bf16_units()
        fast, where = bool(found), "this CPU"
        units = " and ".join(f.upper() for f in found) if found else "no bf16 units (no AVX512_BF16 or AMX flag)"
        if bf16 and not native_16bit_products(torch.bfloat16):
            units = "no bf16 units: bf16 products run in ATen's reference loops, below 1 GFLOP/s; --no-bf16 is " \
                    "hundreds of times faster here"
    if bf16 is None:
        bf16 = fast
        how = "default"
    else:
        how = "--bf16" if bf16 else "--no-bf16"
    if bf16:
        slow = "" if fast or "reference loops" in units else ", though bf16 is not faster than float32 here"
        return torch.bfloat16, f"bf16 compute over float32 weights ({how}; {where}: {units}{slow})"
    return torch.float32, f"float32 ({how}; {where}: {units})"
