"""Test set-up: run every Triton kernel on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so before
``opsdl_kernels.triton_impl`` is imported; tests that need the opposite start a subprocess.
On a GPU machine, ``OPSDL_TEST_DEVICE=cuda`` runs the same tests on CUDA tensors with compiled
Triton (``benchmarks/device_check.sh`` does this).
"""
import os

import torch

TEST_DEVICE = os.environ.get("OPSDL_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    torch.set_default_device(TEST_DEVICE)
    # one autotune config per kernel variant: a compile, not a tuning run, per new key (the dedicated
    # autotuning test builds its own two-config tuner)
    os.environ.setdefault("OPSDL_PIN_CONFIG", "1")

import tempfile  # noqa: E402

# Inductor's on-disk cache (torch 2.13) is not keyed on the vector ISA PyTorch runs with: code compiled
# under one ATEN_CPU_CAPABILITY and loaded under another (an imitated AVX2 run after an AVX-512 one)
# aborts. Each capability the tests run under gets a cache of its own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_opsdl_{torch.backends.cpu.get_cpu_capability().lower()}"))

import numpy as np  # noqa: E402

# ---------------------------------------------------------------------------------------------
# TEST-ONLY PATCH of Triton's CPU interpreter (upstream triton #11584, declined upstream).
# The interpreter stores bf16 as uint16 and its `tl.dot` multiplies those raw bit patterns.
# We upcast bf16 operands to fp32 before the product, which is what the GPU's bf16 MMA computes
# (exact products, fp32 accumulation). No kernel is changed for it; compiled Triton never sees it.
# ---------------------------------------------------------------------------------------------
if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.language as tl
    from triton.runtime import interpreter as _interp

    _original_create_dot = _interp.InterpreterBuilder.create_dot

    def _bf16_as_fp32(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        data = _interp._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return _interp.TensorHandle(data, tl.float32)

    def _create_dot_upcasting_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return _original_create_dot(self, _bf16_as_fp32(a), _bf16_as_fp32(b), d, input_precision,
                                    max_num_imprecise_acc)

    _interp.InterpreterBuilder.create_dot = _create_dot_upcasting_bf16


# ---------------------------------------------------------------------------------------------
# Error log: the kernel accuracy tests report their max relative errors at the end of the run.
# ---------------------------------------------------------------------------------------------
import pytest  # noqa: E402

_ERRORS: dict = {}


@pytest.fixture
def error_log():
    def record(impl, dtype, errors: dict) -> None:
        for quantity, value in errors.items():
            key = (impl, str(dtype).replace("torch.", ""), quantity)
            _ERRORS[key] = max(_ERRORS.get(key, 0.0), value)

    return record


def pytest_terminal_summary(terminalreporter):
    if not _ERRORS:
        return
    terminalreporter.section("max relative error vs float64 reference (impl, dtype, quantity)")
    for (impl, dtype, quantity), value in sorted(_ERRORS.items()):
        terminalreporter.write_line(f"{impl:7s} {dtype:9s} {quantity:9s} {value:.2e}")
