"""No product may read uninitialised memory.

On an Intel Xeon (oneDNN's AVX-512/AMX bf16 path) ``out.addmm_(G, W, beta=0)`` over the output of
``torch.empty_like`` kept NaN rows from the garbage, although PyTorch documents beta=0 as ignoring
``out``; other CPUs ignore it, so a test relying on the machine would pass there. This test makes
every machine that strict one: new tensors come filled with NaN and Inf, and every ``addmm`` reads
its output literally (``beta * out + alpha * a @ b``, so 0 * NaN is NaN). The gradients must stay
finite and right on both paths, both implementations and every dtype.
"""
from __future__ import annotations

import pytest
import torch

from opsdl_kernels import fused_kl_loss, fused_token_logprobs, plan

from .inputs import DTYPES, IMPLS, MEMORY, TOLERANCE, grads_of, make_inputs
from .reference import reference_kl, reference_logprobs, rel_err

_empty, _empty_like, _addmm = torch.empty, torch.empty_like, torch.addmm
_addmm_ = torch.Tensor.addmm_


def _garbage(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh tensor with NaN, +Inf and -Inf in turn (floating tensors only)."""
    if t.dtype.is_floating_point and t.numel():
        flat = t.view(-1)
        flat[0::3], flat[1::3], flat[2::3] = float("nan"), float("inf"), float("-inf")
    return t


def _strict_addmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1.0, alpha=1.0,
                  out_dtype=None, out=None) -> torch.Tensor:
    """``beta * acc + alpha * a @ b`` computed in fp32 with the output read as given."""
    value = beta * acc.float() + alpha * torch.mm(a.float(), b.float())
    dtype = out_dtype or acc.dtype
    if out is None:
        return value.to(dtype)
    return out.copy_(value)


@pytest.fixture
def strict_machine(monkeypatch):
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _garbage(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _garbage(_empty_like(*a, **k)))
    monkeypatch.setattr(torch, "addmm", _strict_addmm)
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, a, b, *, beta=1.0, alpha=1.0:
                        _strict_addmm(self, a, b, beta=beta, alpha=alpha, out=self))


def test_the_strict_machine_turns_beta_zero_over_garbage_into_nan(strict_machine):
    """The imitation is strict: the call that broke on the Xeon gives NaN here."""
    out = torch.empty_like(torch.ones(4, 4))
    out.addmm_(torch.ones(4, 4), torch.ones(4, 4), beta=0.0)
    assert torch.isnan(out).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("memory", MEMORY)
def test_gradients_are_finite_and_right_over_garbage(memory, impl, dtype, strict_machine, monkeypatch):
    """150 rows in 3 chunks (fast) or 2 blocks x 3 slabs (lean): every first write of dh and dW."""
    monkeypatch.setattr(plan, "MIN_FAST_ROWS", 32)
    monkeypatch.setattr(plan, "MIN_BLOCK_ROWS", 64)
    budget = {"fast": 64 * 700 * 8, "lean": 2 * 80 * 256 * 8}[memory]
    inputs = make_inputs((150,), 16, 700, dtype=dtype, seed=61, bias=True, teacher_bias=True, mask=True,
                         token_weights=True)
    options = dict(reverse_weight=0.4, softcap=5.0)
    _, want = reference_kl(**inputs, **options)
    loss = fused_kl_loss(**inputs, **options, impl=impl, memory=memory, memory_budget=budget)
    loss.backward()
    for label, got, expected in zip(("dh", "dW", "db"), grads_of(inputs), want):
        assert torch.isfinite(got).all(), label
        assert rel_err(got, expected) <= TOLERANCE[dtype], label


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("memory", MEMORY)
def test_token_logprob_gradients_are_finite_over_garbage(memory, impl, strict_machine):
    inputs = make_inputs((40,), 16, 300, dtype=torch.bfloat16, seed=62, bias=True)
    h, w, b, y = inputs["student_hidden"], inputs["weight"], inputs["bias"], inputs["targets"]
    fused_token_logprobs(h, w, y, bias=b, impl=impl, memory=memory, reduction="sum").backward()
    _, want = reference_logprobs(h, w, y, bias=b, upstream=torch.ones(40))
    for got, expected in zip((h.grad, w.grad, b.grad), want):
        assert torch.isfinite(got).all() and rel_err(got, expected) <= TOLERANCE[torch.bfloat16]
