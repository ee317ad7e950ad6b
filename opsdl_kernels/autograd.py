"""The autograd layer: one call of the fused loss is one ``torch.library`` custom op, with a fake
(meta) implementation that gives its output shapes and a registered backward, so that
``torch.compile(fullgraph=True)`` of a model that calls the loss traces it as one opaque node, and
eager autograd calls the same code.

``opsdl::fused_rows`` runs one of three modes over the loops of ``schedule.py``:

- ``"no_grad"``: the per-row values and state, nothing for a gradient.
- ``"fast"``: ``loss = scale * sum_i coef_i value_i`` with its gradient formed in the forward,
  chunk by chunk (four products per chunk); the backward only scales it by the upstream scalar.
- ``"lean"``: the per-row values; the backward (``opsdl::fused_rows_backward``) recomputes the
  logits slab by slab with the per-row upstream weights it receives.

Every mode also returns the finished per-row state (not differentiable) for the log-ratio.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor

from . import schedule
from .plan import lean_plan
from .state import PLANES, LossSpec
from .vocab_parallel import VocabShard

MODES = ("no_grad", "fast", "lean")

_SECOND_BACKWARD = (
    "this call of the fused loss formed its gradients in the forward (memory='fast') and handed them to "
    "the first backward; a second backward through it (retain_graph=True) is not supported: call it with "
    "memory='lean', which recomputes"
)
_DOUBLE_BACKWARD = (
    "the fused loss's gradient is not itself differentiable: a double backward (create_graph=True, or "
    "torch.autograd.grad of a gradient) through fused_kl_loss / fused_rkl_loss / fused_token_logprobs is "
    "not supported; compute the gradient without create_graph"
)


@dataclass(frozen=True)
class Call:
    """Everything about a call that is not a tensor: what it computes, how, and over which vocabulary."""

    spec: LossSpec
    impl: str  # "torch" or "triton"
    mode: str  # one of MODES
    chunk_rows: int = 0  # the fast path's rows per chunk
    budget: int = 0  # bytes of working memory
    scale: float = 1.0  # the fast path's loss is scale * sum_i coef_i value_i (1/N: a mean without a mask)
    vocab_group: Optional[str] = None  # the process group's name, for a vocabulary-parallel head
    vocab_start: int = 0
    vocab_total: int = 0
    vocab_widest: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")

    def shard(self) -> Optional[VocabShard]:
        if self.vocab_group is None:
            return None
        from torch.distributed.distributed_c10d import _resolve_process_group

        return VocabShard(_resolve_process_group(self.vocab_group), self.vocab_start, self.vocab_total,
                          self.vocab_widest)

    def scalars(self) -> tuple:
        """The op's non-tensor arguments, in its schema's order."""
        s = self.spec
        return (s.kind, s.temperature, s.softcap, s.reverse_weight, self.impl, self.mode, self.chunk_rows,
                self.budget, self.scale, self.vocab_group, self.vocab_start, self.vocab_total, self.vocab_widest)


def _call(kind, temperature, softcap, reverse_weight, impl, mode, chunk_rows, budget, scale, vocab_group,
          vocab_start, vocab_total, vocab_widest) -> Call:
    return Call(LossSpec(kind, temperature, softcap, reverse_weight), impl, mode, chunk_rows, budget, scale,
                vocab_group, vocab_start, vocab_total, vocab_widest)


def _tile_scale(coef: Optional[Tensor], scale: float, dtype: torch.dtype) -> tuple[Optional[Tensor], float]:
    """``(c, alpha)`` with ``c * alpha = coef * scale``: the row kernel puts ``c`` into the 16-bit
    logit gradient, the products apply ``alpha`` in fp32 before their single rounding. bf16 has
    fp32's range, so ``c = coef``; fp16 has not (a mean's 1/N or a loss scaler's 2^16 would under-
    or overflow it), so there ``max |c| = 1``, at the price of one host sync for the peak."""
    if coef is None or dtype != torch.float16:
        return coef, scale
    peak = float(coef.abs().max())
    if peak == 0.0 or peak == float("inf") or peak != peak:  # all 0, inf or NaN: passed through unscaled
        return coef, scale
    return coef / peak, peak * scale


def _backend(impl: str) -> ModuleType:
    return importlib.import_module(f".{impl}_impl", __package__)


def _operands(call: Call, h, weight, bias, g, teacher_weight, teacher_bias, targets) -> schedule.Operands:
    """``teacher_weight=None`` means the teacher uses ``weight``."""
    return schedule.Operands(call.spec, h, g, weight, weight if teacher_weight is None else teacher_weight, bias,
                             teacher_bias, targets, call.shard())


def _nothing(like: Tensor) -> Tensor:
    """The placeholder of a gradient that is not computed (an op returns tensors, never None)."""
    return like.new_empty(0)


@torch.library.custom_op("opsdl::fused_rows", mutates_args=())
def fused_rows(
    h: Tensor, weight: Tensor, bias: Optional[Tensor], g: Optional[Tensor], teacher_weight: Optional[Tensor],
    teacher_bias: Optional[Tensor], targets: Optional[Tensor], coef: Optional[Tensor], needs: list[bool],
    kind: str, temperature: float, softcap: Optional[float], reverse_weight: float, impl: str, mode: str,
    chunk_rows: int, budget: int, scale: float, vocab_group: Optional[str], vocab_start: int, vocab_total: int,
    vocab_widest: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, state, dh, dW, db)``: ``out`` is the per-row values (modes "no_grad", "lean") or the
    fast path's loss; the gradients are formed only by the fast path, for the inputs in ``needs``
    (``h``, ``weight``, ``bias``), and are empty tensors otherwise."""
    call = _call(kind, temperature, softcap, reverse_weight, impl, mode, chunk_rows, budget, scale, vocab_group,
                 vocab_start, vocab_total, vocab_widest)
    ops = _operands(call, h, weight, bias, g, teacher_weight, teacher_bias, targets)
    backend = _backend(impl)
    grads: schedule.Grads = (None, None, None)
    if mode == "fast":
        tile_coef, alpha = _tile_scale(coef, scale, h.dtype)
        state, grads = schedule.fast_forward_backward(backend, ops, tile_coef, alpha, chunk_rows, tuple(needs))
        values = call.spec.values(state)
        out = scale * (values.sum() if coef is None else (values * coef).sum())
    else:
        # the slab loop for a vocabulary slice (merged over the ranks) and for no rows
        if mode == "lean" or ops.shard is not None or h.shape[0] == 0:
            plan = lean_plan(h.shape[0], 0, weight.shape[0] if ops.shard is None else ops.shard.widest,
                             g is not None, budget)
            state = schedule.lean_forward(backend, ops, plan)
        else:
            state = backend.forward_state(ops, budget)
        out = call.spec.values(state).clone()
    dh, dw, db = (_nothing(x) if grad is None else grad for x, grad in zip((h, weight, h), grads))
    return out, state, dh, dw, db


@fused_rows.register_fake
def _(h, weight, bias, g, teacher_weight, teacher_bias, targets, coef, needs, kind, temperature, softcap,
      reverse_weight, impl, mode, chunk_rows, budget, scale, vocab_group, vocab_start, vocab_total, vocab_widest):
    n = h.shape[0]
    out = h.new_empty((), dtype=torch.float32) if mode == "fast" else h.new_empty(n, dtype=torch.float32)
    state = h.new_empty((len(PLANES), n), dtype=torch.float32)
    fast = mode == "fast"
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if fast and needs[0] else _nothing(h)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if fast and needs[1] else _nothing(weight)
    db = torch.empty_like(bias) if fast and needs[2] and bias is not None else _nothing(h)
    return out, state, dh, dw, db


@torch.library.custom_op("opsdl::fused_rows_backward", mutates_args=())
def fused_rows_backward(
    h: Tensor, weight: Tensor, bias: Optional[Tensor], g: Optional[Tensor], teacher_weight: Optional[Tensor],
    teacher_bias: Optional[Tensor], targets: Optional[Tensor], state: Tensor, grad_values: Tensor,
    needs: list[bool], kind: str, temperature: float, softcap: Optional[float], reverse_weight: float, impl: str,
    mode: str, chunk_rows: int, budget: int, scale: float, vocab_group: Optional[str], vocab_start: int,
    vocab_total: int, vocab_widest: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The lean path's gradient of ``sum_i grad_values_i value_i`` in ``(h, weight, bias)``."""
    call = _call(kind, temperature, softcap, reverse_weight, impl, mode, chunk_rows, budget, scale, vocab_group,
                 vocab_start, vocab_total, vocab_widest)
    ops = _operands(call, h, weight, bias, g, teacher_weight, teacher_bias, targets)
    vocab = weight.shape[0] if ops.shard is None else ops.shard.widest  # every rank plans by the widest slice
    plan = lean_plan(h.shape[0], h.shape[1], vocab, g is not None, budget)
    coef, alpha = _tile_scale(grad_values.float().contiguous(), 1.0, h.dtype)  # an expanded scalar, often
    grads = schedule.lean_backward(_backend(impl), ops, state, coef, alpha, plan, tuple(needs))
    return tuple(_nothing(x) if grad is None else grad for x, grad in zip((h, weight, h), grads))


@fused_rows_backward.register_fake
def _(h, weight, bias, g, teacher_weight, teacher_bias, targets, state, grad_values, needs, *scalars):
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if needs[0] else _nothing(h)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if needs[1] else _nothing(weight)
    db = torch.empty_like(bias) if needs[2] and bias is not None else _nothing(h)
    return dh, dw, db


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    h, weight, bias, g, teacher_weight, teacher_bias, targets, _coef, needs, *scalars = inputs
    _out, state, dh, dw, db = output
    ctx.needs, ctx.scalars, ctx.fast, ctx.inputs = needs, scalars, _call(*scalars).mode == "fast", len(inputs)
    ctx.mark_non_differentiable(state, dh, dw, db)
    if ctx.fast:
        # handed to the one backward, which scales them in place (no copy); detached, so that the
        # context holds no output whose graph leads back to it
        ctx.grads = (dh.detach(), dw.detach(), db.detach())
    else:
        ctx.save_for_backward(h, weight, bias, g, teacher_weight, teacher_bias, targets, state)


def _backward(ctx: Any, grad_out: Tensor, _grad_state, _grad_dh, _grad_dw, _grad_db):
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)
    if ctx.fast:
        if ctx.grads is None:
            raise RuntimeError(_SECOND_BACKWARD)
        grads, ctx.grads = ctx.grads, None
        # one more rounding of 16-bit gradients when the upstream scalar is not 1 (see the README)
        dh, dw, db = (grad.mul_(grad_out) if need else None for grad, need in zip(grads, ctx.needs))
    else:
        h, weight, bias, g, teacher_weight, teacher_bias, targets, state = ctx.saved_tensors
        dh, dw, db = fused_rows_backward(h, weight, bias, g, teacher_weight, teacher_bias, targets, state,
                                         grad_out, ctx.needs, *ctx.scalars)
        dh, dw, db = (grad if need else None for grad, need in zip((dh, dw, db), ctx.needs))
    return (dh, dw, db) + (None,) * (ctx.inputs - 3)


fused_rows.register_autograd(_backward, setup_context=_setup_context)


def run(call: Call, h: Tensor, weight: Tensor, bias: Optional[Tensor], g: Optional[Tensor],
        teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor], targets: Optional[Tensor],
        coef: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``(out, state)`` of one call: the loss (fast path) or the per-row values, differentiable in
    ``h``, ``weight`` and ``bias``; the teacher side is constant."""
    needs = [t is not None and t.requires_grad for t in (h, weight, bias)]
    out, state, *_grads = fused_rows(h, weight, bias, g, teacher_weight, teacher_bias, targets, coef, needs,
                                     *call.scalars())
    return out, state
