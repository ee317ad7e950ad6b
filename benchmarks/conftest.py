"""Benchmark set-up: the device, the measured matmul rate, machine facts, and the results file.

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



def record(kind: str, info: dict) -> None:
    """Append one result line to ``$OPSDL_BENCH_ROWS`` (JSON lines), at once: a run killed by a
    time limit keeps everything measured before it. ``kind``: machine, timing, accuracy, unmeasured."""
    path = os.environ.get("OPSDL_BENCH_ROWS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, **info}) + "\n")


def unmeasured(provider: str, shape: str, reason: str) -> None:
    record("unmeasured", {"provider": provider, "shape": shape, "reason": reason})


@pytest.fixture(scope="session")
def matmul_tflops():
    return bf16_matmul_tflops() if DEVICE == "cuda" else None


def describe_machine() -> dict:
    import triton

    info = {"torch": torch.__version__}
    info["triton"] = triton.__version__
    info["python"] = platform.python_version()
    try:
        info["liger_kernel"] = version("liger-kernel")
    except PackageNotFoundError:
        info["liger_kernel"] = None
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(describe_machine())


def pytest_sessionstart(session):
    record("machine", describe_machine())
