"""Benchmark set-up: the device, the measured matmul rate, machine facts, and skip bookkeeping.

Without CUDA, Triton runs interpreted (only for the agreement checks; its timings would mean
nothing, so Triton providers are not timed there).
"""
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from .measure import bf16_matmul_tflops  # noqa: E402

# Cases that could not be measured (out of memory, provider missing): written out for the report.
UNMEASURED: list[dict] = []


@pytest.fixture(scope="session")
def matmul_tflops():
    return bf16_matmul_tflops() if DEVICE == "cuda" else None


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton

    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["python"] = platform.python_version()
    try:
        machine_info["liger_kernel"] = version("liger-kernel")
    except PackageNotFoundError:
        machine_info["liger_kernel"] = None
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        machine_info["gpu"] = props.name
        machine_info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        machine_info["cuda"] = torch.version.cuda


def pytest_sessionfinish(session):
    path = os.environ.get("OPSDL_BENCH_UNMEASURED")
    if path:
        with open(path, "w") as f:
            json.dump(UNMEASURED, f, indent=1)
