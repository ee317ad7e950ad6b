"""The row math in plain PyTorch: the CPU path and the second oracle of the tests.

Same functions and semantics as ``opsdl_kernels.triton_impl``: ``row_state`` and ``row_grad`` (the
row kernels' twins, called by the loops of ``schedule.py``) and ``forward_state`` (the no-gradient
forward, here the lean path's slab loop). It materialises a few temporaries of the size of the logits block it is given,
so its memory is a small multiple of the Triton path's.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor

from . import schedule
from .plan import lean_plan
from .state import P, LossSpec, finalize


def _logits(z: Tensor, bias: Optional[Tensor], spec: LossSpec) -> Tensor:
    """``cap(z + b) / tau`` in fp32."""
    if bias is not None:
        z = z + bias.float()
    if spec.softcap is not None:
        z = spec.softcap * torch.tanh(z / spec.softcap)
    return z / spec.temperature


def _target_column(targets: Optional[Tensor], v0: int, width: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The target's column within this block, clamped, and whether it lies in the block."""
    if targets is None:
        return None, None
    col = targets - v0
    inside = (col >= 0) & (col < width)
    return col.clamp(0, width - 1).unsqueeze(1), inside


def _update(state: Tensor, spec: LossSpec, s: Tensor, t: Optional[Tensor], col, inside, first: bool) -> None:
    """Merge this block's online-softmax state into the running planes of ``state``."""
    def block_state(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = x.amax(1)
        e = torch.exp(x - m[:, None])
        return m, e, e.sum(1)

    def merge(m_name: str, sums: dict[str, Tensor], m_blk: Tensor) -> None:
        if first:
            state[P[m_name]] = m_blk
            for name, value in sums.items():
                state[P[name]] = value
            return
        m_new = torch.maximum(state[P[m_name]], m_blk)
        old, new = torch.exp(state[P[m_name]] - m_new), torch.exp(m_blk - m_new)
        for name, value in sums.items():
            state[P[name]] = state[P[name]] * old + value * new
        state[P[m_name]] = m_new

    m_s, e_s, l_s = block_state(s)
    student = {"l_s": l_s}
    if t is not None:
        m_t, e_t, l_t = block_state(t)
        diff = s - t
        student["acc_r"] = (e_s * diff).sum(1)
        merge("m_t", {"l_t": l_t, "acc_f": -(e_t * diff).sum(1)}, m_t)
    merge("m_s", student, m_s)
    if col is not None:
        for name, x in (("s_y", s), ("t_y", t)):
            if x is not None:
                picked = torch.where(inside, x.gather(1, col).squeeze(1), 0.0)
                state[P[name]] = picked if first else state[P[name]] + picked


def _logit_grad(state: Tensor, spec: LossSpec, s: Tensor, t: Optional[Tensor], col, inside,
                coef: Optional[Tensor]) -> Tensor:
    """``G = coef / tau * cap'(z) * D`` with D the derivative of the value in the logits (see
    ``state.LossSpec``), from the finals of ``state``."""
    logp = s - state[P["lse_s"], :, None]
    p = torch.exp(logp)
    if spec.kind == "kl":
        logq = t - state[P["lse_t"], :, None]
        d = spec.reverse_weight * p * (logp - logq - state[P["kl_r"], :, None])
        if spec.mixes_forward:
            d = d + (1.0 - spec.reverse_weight) * (p - torch.exp(logq))
    else:
        d = -p
        d.scatter_add_(1, col, inside.to(d.dtype).unsqueeze(1))
    weight = torch.ones_like(state[0]) if coef is None else coef.float()
    if spec.kind == "sampled":
        weight = weight * (state[P["logp_y"]] - state[P["logq_y"]])
    if spec.softcap is not None:
        tanh = s * (spec.temperature / spec.softcap)
        d = d * (1.0 - tanh * tanh)
    grad = d * (weight / spec.temperature)[:, None]
    return torch.where((weight != 0)[:, None], grad, 0.0)


def row_state(
    spec: LossSpec, zs: Tensor, zt: Optional[Tensor], state: Tensor, *, v0: int,
    bias: Optional[Tensor], teacher_bias: Optional[Tensor], targets: Optional[Tensor], first: bool, last: bool,
) -> None:
    """Merge a block of raw fp32 logits ``zs = h W[v0:v0+w]^T`` (and ``zt`` for the teacher) into
    the running per-row state (``first``: start it; ``last``: then fill the finals)."""
    s = _logits(zs, bias, spec)
    t = None if zt is None else _logits(zt, teacher_bias, spec)
    col, inside = _target_column(targets, v0, zs.shape[1])
    _update(state, spec, s, t, col, inside, first)
    if last:
        finalize(state, spec.has_teacher)


def row_grad(
    spec: LossSpec, zs: Tensor, zt: Optional[Tensor], state: Tensor, grad: Tensor, *, v0: int,
    bias: Optional[Tensor], teacher_bias: Optional[Tensor], targets: Optional[Tensor], coef: Optional[Tensor],
) -> None:
    """Write the logit gradient of a block of raw fp32 logits into ``grad``, from the finals of
    ``state`` (every column of the rows seen)."""
    s = _logits(zs, bias, spec)
    t = None if zt is None or spec.kind != "kl" else _logits(zt, teacher_bias, spec)
    col, inside = _target_column(targets, v0, zs.shape[1])
    grad.copy_(_logit_grad(state, spec, s, t, col, inside, coef))


def forward_state(ops: "schedule.Operands", budget: int) -> Tensor:
    """The finished per-row state without gradients: the lean path's forward."""
    plan = lean_plan(ops.h.shape[0], 0, ops.weight.shape[0], ops.g is not None, budget)
    return schedule.lean_forward(sys.modules[__name__], ops, plan)
