"""No tensor of N x V elements is ever allocated, by either implementation, forward or backward."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from opsdl_kernels import fused_rkl_loss, fused_token_logprobs
from opsdl_kernels.torch_impl import default_chunk_rows

from .inputs import make_inputs


class TensorRecorder(TorchDispatchMode):
    """Records the shape of every floating-point tensor an aten op returns (allocations and views).

    Only floating tensors: logits would be floating, while Triton's CPU interpreter keeps byte
    (uint8) copies of each buffer it hands to a kernel, e.g. 4 x V x H bytes for the fp32 dW buffer.
    """

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.extend(tuple(t.shape) for t in tree_flatten(out)[0]
                           if isinstance(t, torch.Tensor) and t.dtype.is_floating_point)
        return out

    def largest(self) -> tuple[int, ...]:
        return max(self.shapes, key=lambda s: torch.Size(s).numel())


# torch: N beyond one row chunk so chunking has to happen; triton (interpreted): a small grid.
SHAPES = {"torch": (2 * default_chunk_rows(1 << 14), 8, 1 << 14), "triton": (64, 16, 1000)}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("estimator", ["full", "sampled", "logprobs"])
def test_no_n_by_v_tensor(impl, estimator, record_property):
    n, hidden, vocab = SHAPES[impl]
    inputs = make_inputs((n,), hidden, vocab, dtype=torch.float32, seed=21, bias=True)
    with TensorRecorder() as recorder:
        if estimator == "logprobs":
            loss = -fused_token_logprobs(inputs["student_hidden"], inputs["weight"], inputs["targets"],
                                         bias=inputs["bias"], impl=impl).mean()
        else:
            loss = fused_rkl_loss(**inputs, estimator=estimator, impl=impl)
        loss.backward()
    assert inputs["weight"].grad is not None and torch.isfinite(loss)
    largest = recorder.largest()
    record_property("largest_tensor", largest)
    print(f"largest tensor ({impl}, {estimator}, N={n}, V={vocab}, H={hidden}): {largest}")
    assert torch.Size(largest).numel() < n * vocab, f"a tensor of shape {largest} has N x V = {n} x {vocab} elements or more"
