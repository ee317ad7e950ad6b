"""Memory and structure. No tensor of N x V elements is ever allocated (every path, both
implementations). At the real GPU shapes, run on the meta device (the host code runs as it would on
a GPU, the row kernel, which allocates nothing, is not launched): the fast path issues exactly four
large products per chunk and needs its two chunks of fp32 logits; the lean path stays within its
budget at every vocabulary size."""
from __future__ import annotations

import pytest
import torch

from opsdl_kernels import fused_rkl_loss, fused_token_logprobs, plan
from opsdl_kernels import triton_impl
from opsdl_kernels.matmul import has_fp32_output
from opsdl_kernels.schedule import Operands, fast_forward_backward, lean_backward, lean_forward
from opsdl_kernels.plan import DEFAULT_MEMORY_BUDGET, fast_chunk_rows, lean_plan
from opsdl_kernels.state import LossSpec
from opsdl_kernels.triton_impl import rows as triton_rows

from .inputs import make_inputs
from .tracking import Tracker

MiB = 1 << 20


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("memory", ["fast", "lean"])
@pytest.mark.parametrize("estimator", ["full", "sampled", "logprobs"])
def test_no_n_by_v_tensor(impl, memory, estimator, monkeypatch, record_property):
    n, hidden, vocab = 24, 16, 1000
    monkeypatch.setattr(plan, "MIN_FAST_ROWS", 8)  # let a small budget cut 24 rows into chunks
    # the fast path: chunks of 10 rows of fp32 logits (two sides, or one); the lean one: blocks and slabs
    budget = 10 * vocab * 4 * (1 if estimator == "logprobs" else 2)
    inputs = make_inputs((n,), hidden, vocab, dtype=torch.float32, seed=21, bias=True)
    options = dict(impl=impl, memory=memory, memory_budget=budget)
    with Tracker() as tracker:
        if estimator == "logprobs":
            loss = -fused_token_logprobs(inputs["student_hidden"], inputs["weight"], inputs["targets"],
                                         bias=inputs["bias"], reduction="mean", **options)
        else:
            loss = fused_rkl_loss(**inputs, estimator=estimator, **options)
        loss.backward()
    assert inputs["weight"].grad is not None and torch.isfinite(loss)
    largest = tracker.largest()
    record_property("largest_tensor", largest)
    assert torch.Size(largest).numel() < n * vocab, f"a tensor of shape {largest} has N x V = {n} x {vocab} elements or more"


class LaunchRecorder:
    """Stands in for a row kernel on the meta device: records each launch's grid and width."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.launches.append((grid[0], kwargs["width"]))
        return launch


def _meta_operands(n: int, hidden: int, vocab: int, kind: str = "kl") -> Operands:
    has_fp32_output("meta")  # its one-time probe of tiny products stays out of the counts
    h = torch.empty(n, hidden, dtype=torch.bfloat16, device="meta")
    w = torch.empty(vocab, hidden, dtype=torch.bfloat16, device="meta")
    targets = torch.empty(n, dtype=torch.long, device="meta")
    return Operands(LossSpec(kind), h, torch.empty_like(h), w, w, None, None, targets)


def _grad_bytes(ops: Operands) -> int:
    return (ops.h.numel() + ops.weight.numel()) * ops.h.element_size()


@pytest.mark.parametrize("shape", [(8192, 4096, 128256), (16384, 3584, 152064)], ids=str)
def test_fast_path_issues_four_products_per_chunk_at_gpu_shape(shape, monkeypatch, record_property):
    n, hidden, vocab = shape
    monkeypatch.setattr(triton_rows, "row_state_kernel", LaunchRecorder())
    monkeypatch.setattr(triton_rows, "row_grad_kernel", LaunchRecorder())
    ops = _meta_operands(n, hidden, vocab)
    chunk = fast_chunk_rows(n, vocab, True, DEFAULT_MEMORY_BUDGET)
    chunks = -(-n // chunk)
    with Tracker() as tracker:
        state, grads = fast_forward_backward(triton_impl, ops, None, 1.0 / n, chunk, (True, True, False))
    extra_mib = (tracker.peak_bytes - _grad_bytes(ops)) / MiB
    record_property("chunk_rows", chunk)
    record_property("peak_extra_mib", extra_mib)
    print(f"fast path N={n} H={hidden} V={vocab}: {chunks} chunks of {chunk} rows, "
          f"{len(tracker.products)} products, peak extra {extra_mib:.1f} MiB")
    assert len(tracker.products) == 4 * chunks
    for i, p in enumerate(tracker.products):
        rows = min(chunk, n - (i // 4) * chunk)
        assert p.flop == 2.0 * rows * vocab * hidden, p  # each a whole projection of the chunk
        assert p.out_dtype == (torch.float32 if i % 4 < 2 else torch.bfloat16), p  # fp32 logits
    assert len(triton_rows.row_state_kernel.launches) == len(triton_rows.row_grad_kernel.launches) == chunks
    logits_mib = 2 * chunk * vocab * 4 / MiB
    assert logits_mib <= extra_mib <= logits_mib + 1 and extra_mib <= DEFAULT_MEMORY_BUDGET / MiB


@pytest.mark.parametrize("kind,products_per_slab", [("kl", 6), ("sampled", 5)])
@pytest.mark.parametrize("n,hidden,vocab", [(8192, 4096, 32768), (8192, 4096, 65536), (8192, 4096, 128256),
                                            (8192, 4096, 256000), (16384, 3584, 152064), (32768, 4096, 128256)])
def test_lean_path_stays_within_256_mib_at_any_vocabulary(n, hidden, vocab, kind, products_per_slab, monkeypatch,
                                                          record_property):
    budget = 256 * MiB
    monkeypatch.setattr(triton_rows, "row_state_kernel", LaunchRecorder())
    monkeypatch.setattr(triton_rows, "row_grad_kernel", LaunchRecorder())
    ops = _meta_operands(n, hidden, vocab, kind)
    lean = lean_plan(n, hidden, vocab, True, budget)
    with Tracker() as tracker:
        state = lean_forward(triton_impl, ops, lean)
        coef = torch.empty(n, device="meta")
        grads = lean_backward(triton_impl, ops, state, coef, 1.0, lean, (True, True, False))
    extra_mib = (tracker.peak_bytes - _grad_bytes(ops)) / MiB
    record_property("peak_extra_mib", extra_mib)
    slabs = -(-vocab // lean.slab) * -(-n // lean.block_rows)
    print(f"lean path ({kind}) N={n} H={hidden} V={vocab}: blocks of {lean.block_rows} rows, slabs of {lean.slab}, "
          f"{len(tracker.products)} products, peak extra {extra_mib:.1f} MiB")
    assert extra_mib <= 256
    assert len(tracker.products) == products_per_slab * slabs
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16
