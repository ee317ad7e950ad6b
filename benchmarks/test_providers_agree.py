"""Before timing anything: every provider computes the same reverse KL and gradients on the same
inputs (Liger's ``jsd_beta=1`` / ``beta=1`` included: confirmed here, not assumed)."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.reference import reference_kl, rel_err

from .conftest import DEVICE
from .problems import Shape, make_problem
from .providers import PROVIDERS

SHAPE = Shape(48, 64, 1000)
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16
TOL = 2e-5 if DTYPE == torch.float32 else 2e-2


@pytest.mark.parametrize("name", list(PROVIDERS))
def test_provider_matches_float64_reference(name):
    provider = PROVIDERS[name]
    if not provider.available():
        pytest.skip(f"{provider.requires} is not installed")
    if name == "naive_compile" and DEVICE == "cpu":
        pytest.skip("torch.compile is GPU-only in this suite")
    problem = make_problem(SHAPE, DTYPE, DEVICE, seed=1)
    ref_loss, (ref_dh, ref_dw, _) = reference_kl(problem.student, problem.teacher, problem.weight,
                                                 targets=problem.targets, estimator=provider.estimator)
    loss = provider.loss(problem)
    loss.backward()
    assert rel_err(loss, ref_loss) < TOL, (float(loss), float(ref_loss))
    assert rel_err(problem.student.grad, ref_dh) < TOL
    assert rel_err(problem.weight.grad, ref_dw) < TOL
