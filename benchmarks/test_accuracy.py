"""Gradient error of every provider against float64 on the same inputs (relative Frobenius norm of
dh and dW), recorded beside the timings: on a GPU the first 2048 rows of the headline shape in
bf16, on the CPU a small fp32 shape. Never fails on an error size: the targets live in the report."""
from __future__ import annotations

import functools

import pytest
import torch

from opsdl_kernels import fused_rkl_loss
from tests.kernels.reference import reference_kl

from .conftest import DEVICE, record, unmeasured
from .measure import relative_norm_error, step
from .problems import CPU_ACCURACY_SHAPE, GPU_ACCURACY_SHAPE, make_problem
from .providers import PROVIDERS, Provider

SHAPE = GPU_ACCURACY_SHAPE if DEVICE == "cuda" else CPU_ACCURACY_SHAPE
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# The fast path rounds dW to the weight's dtype once per chunk; at the headline shape it takes 8
# chunks of 1024 rows. The same 8 chunks on these rows, to measure the error the headline has.
HEADLINE_CHUNKS = Provider(
    "opsdl_fast_8_chunks",
    lambda pb: fused_rkl_loss(pb.student, pb.teacher, pb.weight, impl="triton", memory="fast",
                              memory_budget=pb.shape.n // 8 * pb.shape.vocab * 8),
    ("cuda",))
ACCURACY_PROVIDERS = {**PROVIDERS, HEADLINE_CHUNKS.name: HEADLINE_CHUNKS}


@functools.lru_cache(maxsize=None)
def _reference(estimator: str):
    problem = make_problem(SHAPE, DTYPE, DEVICE, seed=7)
    loss, (dh, dw, _) = reference_kl(problem.student, problem.teacher, problem.weight, targets=problem.targets,
                                     estimator=estimator)
    return float(loss), dh, dw


@pytest.mark.parametrize("name", list(ACCURACY_PROVIDERS))
def test_gradient_error_against_float64(benchmark, name):
    provider = ACCURACY_PROVIDERS[name]
    if DEVICE not in provider.devices:
        pytest.skip(f"{name} is not run on {DEVICE}")
    if not provider.available():
        unmeasured(name, f"accuracy {SHAPE}", f"{provider.requires} missing")
        pytest.skip(f"{provider.requires} is not installed")
    ref_loss, ref_dh, ref_dw = _reference(provider.estimator)
    problem = make_problem(SHAPE, DTYPE, DEVICE, seed=7)
    try:
        loss = benchmark.pedantic(step, args=(provider.loss, problem, DEVICE), rounds=1, iterations=1)
    except torch.OutOfMemoryError:
        unmeasured(name, f"accuracy {SHAPE}", "out of memory")
        pytest.skip("out of memory")
    benchmark.group = f"accuracy {SHAPE}"
    info = {
        "provider": name, "n": SHAPE.n, "hidden": SHAPE.hidden, "vocab": SHAPE.vocab,
        "dtype": str(DTYPE).replace("torch.", ""), "device": DEVICE, "estimator": provider.estimator,
        "loss_error": abs(float(loss) - ref_loss) / abs(ref_loss),
        "dh_error": relative_norm_error(problem.student.grad, ref_dh),
        "dw_error": relative_norm_error(problem.weight.grad, ref_dw),
    }
    benchmark.extra_info.update(info)
    record("accuracy", info)
