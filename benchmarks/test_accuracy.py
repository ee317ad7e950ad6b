"""Gradient error of every provider against float64 on the same inputs (relative Frobenius norm of
dh and dW), recorded beside the timings: on a GPU the first 2048 rows of the headline shape in
bf16, on the CPU a small fp32 shape. Never fails on an error size: the targets live in the report."""
from __future__ import annotations

import functools

import pytest
import torch

from tests.kernels.reference import reference_kl

from .conftest import DEVICE, UNMEASURED
from .measure import relative_norm_error, step
from .problems import CPU_ACCURACY_SHAPE, GPU_ACCURACY_SHAPE, make_problem
from .providers import PROVIDERS

SHAPE = GPU_ACCURACY_SHAPE if DEVICE == "cuda" else CPU_ACCURACY_SHAPE
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@functools.lru_cache(maxsize=None)
def _reference(estimator: str):
    problem = make_problem(SHAPE, DTYPE, DEVICE, seed=7)
    loss, (dh, dw, _) = reference_kl(problem.student, problem.teacher, problem.weight, targets=problem.targets,
                                     estimator=estimator)
    return float(loss), dh, dw


@pytest.mark.parametrize("name", list(PROVIDERS))
def test_gradient_error_against_float64(benchmark, name):
    provider = PROVIDERS[name]
    if DEVICE not in provider.devices:
        pytest.skip(f"{name} is not run on {DEVICE}")
    if not provider.available():
        UNMEASURED.append({"provider": name, "shape": f"accuracy {SHAPE}", "reason": f"{provider.requires} missing"})
        pytest.skip(f"{provider.requires} is not installed")
    ref_loss, ref_dh, ref_dw = _reference(provider.estimator)
    problem = make_problem(SHAPE, DTYPE, DEVICE, seed=7)
    try:
        loss = benchmark.pedantic(step, args=(provider.loss, problem, DEVICE), rounds=1, iterations=1)
    except torch.OutOfMemoryError:
        UNMEASURED.append({"provider": name, "shape": f"accuracy {SHAPE}", "reason": "out of memory"})
        pytest.skip("out of memory")
    benchmark.group = f"accuracy {SHAPE}"
    benchmark.extra_info.update({
        "kind": "accuracy", "provider": name, "n": SHAPE.n, "hidden": SHAPE.hidden, "vocab": SHAPE.vocab,
        "dtype": str(DTYPE).replace("torch.", ""), "device": DEVICE, "estimator": provider.estimator,
        "loss_error": abs(float(loss) - ref_loss) / abs(ref_loss),
        "dh_error": relative_norm_error(problem.student.grad, ref_dh),
        "dw_error": relative_norm_error(problem.weight.grad, ref_dw),
    })
