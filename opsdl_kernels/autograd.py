"""autograd Functions over the loops of ``schedule.py``; each keeps O(N) per-row state beside its inputs.

Both return ``(output, state)``: the differentiable output and the finished per-row state of
``opsdl_kernels.state`` (not differentiable), from which the caller reads values and log-ratios.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor

from . import schedule
from .plan import lean_plan
from .state import LossSpec
from .vocab_parallel import VocabShard

_SECOND_BACKWARD = (
    "this call of the fused loss formed its gradients in the forward (memory='fast') and handed them to "
    "the first backward; a second backward through it (retain_graph=True) is not supported: call it with "
    "memory='lean', which recomputes"
)


def operands(spec, h, weight, bias, g, teacher_weight, teacher_bias, targets, shard=None) -> schedule.Operands:
    """The operands of a call; ``teacher_weight=None`` means the teacher uses ``weight``; ``shard``:
    the weights are one rank's vocabulary rows (``vocab_parallel.VocabShard``)."""
    return schedule.Operands(spec, h, g, weight, weight if teacher_weight is None else teacher_weight, bias,
                          teacher_bias, targets, shard)


def unit_scale(row_weights: Optional[Tensor]) -> tuple[Optional[Tensor], float]:
    """``(coef, scale)`` with ``row_weights = scale * coef`` and ``max |coef| = 1``: the 16-bit
    gradient tiles carry ``coef``, cuBLAS applies ``scale`` in fp32 (a mean's 1/N, or a tiny weight,
    would otherwise underflow fp16). Weights that are all 0, inf or NaN are passed through unscaled."""
    if row_weights is None:
        return None, 1.0
    coef = row_weights.detach().contiguous()
    peak = float(coef.abs().max())
    if peak == 0.0:
        return coef, 0.0
    if peak < float("inf"):
        return coef / peak, peak
    return coef, 1.0


class GradientInForward(torch.autograd.Function):
    """``loss = alpha * sum_i coef_i value_i`` (the fast path): the gradient is formed during the
    forward, chunk by chunk, and the backward only scales it by the upstream scalar.
    ``teacher_weight=None`` means the teacher uses ``weight`` (and never gets a gradient through it)."""

    @staticmethod
    def forward(
        ctx: Any, h: Tensor, weight: Tensor, bias: Optional[Tensor], g: Optional[Tensor],
        teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor], targets: Optional[Tensor],
        coef: Optional[Tensor], spec: LossSpec, impl: ModuleType, alpha: float, chunk_rows: int,
        shard: Optional[VocabShard],
    ) -> tuple[Tensor, Tensor]:
        ops = operands(spec, h, weight, bias, g, teacher_weight, teacher_bias, targets, shard)
        state, ctx.grads = schedule.fast_forward_backward(impl, ops, coef, alpha, chunk_rows,
                                                       tuple(ctx.needs_input_grad[:3]))
        values = spec.values(state)
        loss = alpha * (values.sum() if coef is None else (values * coef).sum())
        ctx.mark_non_differentiable(state)
        return loss, state

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _grad_state: Optional[Tensor]):
        if ctx.grads is None:
            raise RuntimeError(_SECOND_BACKWARD)
        grads, ctx.grads = ctx.grads, None  # let autograd take the buffers without a copy
        scaled = tuple(None if x is None else x.mul_(grad_loss) for x in grads)
        return (*scaled, None, None, None, None, None, None, None, None, None, None)


class Recompute(torch.autograd.Function):
    """Per-row values (the lean path): the forward keeps the per-row state only, the backward
    recomputes the logits slab by slab with the per-row upstream weights it receives."""

    @staticmethod
    def forward(
        ctx: Any, h: Tensor, weight: Tensor, bias: Optional[Tensor], g: Optional[Tensor],
        teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor], targets: Optional[Tensor],
        spec: LossSpec, impl: ModuleType, budget: int, shard: Optional[VocabShard],
    ) -> tuple[Tensor, Tensor]:
        ops = operands(spec, h, weight, bias, g, teacher_weight, teacher_bias, targets, shard)
        # every rank of a vocabulary group plans by the widest slice: their collectives must match
        ctx.plan = lean_plan(h.shape[0], h.shape[1], weight.shape[0] if shard is None else shard.widest, g is not None,
                             budget)
        state = schedule.lean_forward(impl, ops, ctx.plan)
        ctx.spec, ctx.impl, ctx.shard = spec, impl, shard
        ctx.save_for_backward(h, weight, bias, g, teacher_weight, teacher_bias, targets, state)
        ctx.mark_non_differentiable(state)
        return spec.values(state).clone(), state

    @staticmethod
    def backward(ctx: Any, grad_values: Optional[Tensor], _grad_state: Optional[Tensor]):
        h, weight, bias, g, teacher_weight, teacher_bias, targets, state = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        nones = (None,) * 8
        if grad_values is None:
            return (None, None, None, *nones)
        coef, alpha = unit_scale(grad_values.float())
        if alpha == 0.0:
            zeros = tuple(None if t is None or not need else torch.zeros_like(t)
                          for t, need in zip((h, weight, bias), needs))
            return (*zeros, *nones)
        ops = operands(ctx.spec, h, weight, bias, g, teacher_weight, teacher_bias, targets, ctx.shard)
        grads = schedule.lean_backward(ctx.impl, ops, state, coef, alpha, ctx.plan, needs)
        return (*grads, *nones)


class NoRows(torch.autograd.Function):
    """A call whose every row is masked out: zero output, zero gradients, nothing launched."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.like = (h, weight, bias)
        return h.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, _grad: Tensor):
        return tuple(None if t is None or not need else torch.zeros_like(t)
                     for t, need in zip(ctx.like, ctx.needs_input_grad))
