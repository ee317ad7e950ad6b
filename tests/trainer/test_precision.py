"""--bf16's default decides by the machine, and says why."""
from __future__ import annotations

import pytest
import torch

import opsdl.precision as precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, onednn, want", [
    ({"avx512f", "avx512_bf16"}, True, ["avx512_bf16"]),  # AMD Zen 4
    ({"avx512f", "avx512_bf16", "amx_bf16"}, True, ["amx_bf16", "avx512_bf16"]),  # Intel Xeon (Sapphire Rapids)
    ({"avx512f"}, True, []),  # AVX-512 without bf16 units: oneDNN emulates bf16, no faster than float32
    ({"avx2"}, False, []),  # reference loops
    ({"avx512_bf16"}, False, []),  # ONEDNN_MAX_CPU_ISA capped below: PyTorch will not use the units
])
def test_cpu_bf16_units_need_the_flag_and_onednn(monkeypatch, flags, onednn, want):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(precision, "native_16bit_products", lambda dtype: onednn)
    assert precision.cpu_bf16_units() == want


def test_the_default_takes_bf16_only_where_the_cpu_has_units(monkeypatch):
    monkeypatch.setattr(precision, "native_16bit_products", lambda dtype: True)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    dtype, why = precision.compute_dtype(None, CPU)
    assert dtype == torch.bfloat16 and why == ("bf16 compute over float32 weights (default; this CPU: "
                                               "AVX512_BF16)")
    assert precision.compute_dtype(False, CPU) == (torch.float32, "float32 (--no-bf16; this CPU: AVX512_BF16)")

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f"}))
    dtype, why = precision.compute_dtype(None, CPU)
    assert dtype == torch.float32 and "no bf16 units" in why
    dtype, why = precision.compute_dtype(True, CPU)  # asked for: done, and said to be no faster
    assert dtype == torch.bfloat16 and "not faster than float32 here" in why


def test_forcing_bf16_on_reference_loops_says_how_slow(monkeypatch):
    monkeypatch.setattr(precision, "native_16bit_products", lambda dtype: False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    assert precision.compute_dtype(None, CPU)[0] == torch.float32
    dtype, why = precision.compute_dtype(True, CPU)
    assert dtype == torch.bfloat16 and "reference loops" in why and "--no-bf16" in why


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_cuda_takes_bf16_where_supported():
    dtype, why = precision.compute_dtype(None, torch.device("cuda"))
    assert (dtype == torch.bfloat16) == torch.cuda.is_bf16_supported() and torch.cuda.get_device_name() in why
