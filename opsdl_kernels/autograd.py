"""autograd Functions over the implementations; they save only O(N) per-row state beside the inputs.

Each Function returns per-row values (fp32, shape (N,)); the caller reduces them. The gradient that
arrives for those values is therefore the per-row weight ``w_i`` of the design note (grad_output x
reduction scale x mask x token weight), which the backward hands to the kernels as is.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor


class KLDivergence(torch.autograd.Function):
    """values_i = rw KL(p_i||q_i) + (1-rw) KL(q_i||p_i) (full), or log p_i(y) - log q_i(y) (sampled).

    Gradients reach ``h``, ``weight`` and ``bias`` only: the teacher side is constant. In the
    sampled mode the gradient is the REINFORCE one, ``sg(value) * grad log p(y)``.
    """

    @staticmethod
    def forward(
        ctx: Any, h: Tensor, weight: Tensor, bias: Optional[Tensor], g: Tensor, teacher_weight: Tensor,
        teacher_bias: Optional[Tensor], targets: Optional[Tensor], impl: ModuleType,
        options: dict, impl_options: dict,
    ) -> Tensor:
        ctx.empty = h.shape[0] == 0
        ctx.zero_like = (h, weight, bias) if ctx.empty else None
        if ctx.empty:  # every row masked: nothing to launch, zero gradients
            return h.new_zeros(0, dtype=torch.float32)
        values, lse_s, lse_t, kl_r = impl.kl_forward(h, g, weight, teacher_weight, bias, teacher_bias,
                                                     targets, **options, **_forward_only(impl_options))
        ctx.impl, ctx.options, ctx.impl_options = impl, options, impl_options
        ctx.teacher_is_weight = teacher_weight is weight
        if options["sampled"]:
            ctx.save_for_backward(h, weight, bias, targets, lse_s, values)
        else:
            ctx.save_for_backward(h, weight, bias, g, None if ctx.teacher_is_weight else teacher_weight,
                                  teacher_bias, lse_s, lse_t, kl_r)
        return values

    @staticmethod
    def backward(ctx: Any, grad_values: Tensor):
        if ctx.empty:
            return (*_zero_grads(ctx), None, None, None, None, None, None, None)
        needs = tuple(ctx.needs_input_grad[:3])
        opts = ctx.options
        extra = _backward_only(ctx.impl_options)
        if opts["sampled"]:
            h, weight, bias, targets, lse_s, values = ctx.saved_tensors
            dh, dw, db = ctx.impl.reinforce_backward(
                h, weight, bias, targets, lse_s, grad_values.float() * values,
                temperature=opts["temperature"], softcap=opts["softcap"], needs=needs, **extra)
        else:
            h, weight, bias, g, teacher_weight, teacher_bias, lse_s, lse_t, kl_r = ctx.saved_tensors
            dh, dw, db = ctx.impl.kl_backward(
                h, g, weight, weight if ctx.teacher_is_weight else teacher_weight, bias, teacher_bias,
                lse_s, lse_t, kl_r, grad_values.float(),
                temperature=opts["temperature"], softcap=opts["softcap"],
                reverse_weight=opts["reverse_weight"], needs=needs, **extra)
        return dh, dw, db, None, None, None, None, None, None, None


class TokenLogprobs(torch.autograd.Function):
    """values_i = log softmax(cap(W h_i + b) / tau)[y_i], differentiable in h, weight, bias."""

    @staticmethod
    def forward(
        ctx: Any, h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, impl: ModuleType,
        options: dict, impl_options: dict,
    ) -> Tensor:
        logp, lse = impl.logprob_forward(h, weight, bias, targets, **options, **_forward_only(impl_options))
        ctx.impl, ctx.options, ctx.impl_options = impl, options, impl_options
        ctx.save_for_backward(h, weight, bias, targets, lse)
        return logp

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor):
        h, weight, bias, targets, lse = ctx.saved_tensors
        dh, dw, db = ctx.impl.reinforce_backward(
            h, weight, bias, targets, lse, grad_logp.float(), **ctx.options,
            needs=tuple(ctx.needs_input_grad[:3]), **_backward_only(ctx.impl_options))
        return dh, dw, db, None, None, None, None


def _zero_grads(ctx: Any) -> tuple[Optional[Tensor], ...]:
    """Zero gradients for (h, weight, bias) of a call that saw no rows."""
    h, weight, bias = ctx.zero_like
    return tuple(
        None if t is None or not need else torch.zeros_like(t)
        for t, need in zip((h, weight, bias), ctx.needs_input_grad[:3])
    )


# Implementation-specific knobs travel in one dict; each phase takes the ones it understands.
_FORWARD_KEYS = ("vocab_splits", "chunk_rows")
_BACKWARD_KEYS = ("filter_eps", "chunk_rows")


def _forward_only(options: dict) -> dict:
    return {k: v for k, v in options.items() if k in _FORWARD_KEYS}


def _backward_only(options: dict) -> dict:
    return {k: v for k, v in options.items() if k in _BACKWARD_KEYS}
