"""The two gradient structures of ``plan.py`` as loops of cuBLAS products around a row kernel.

Every function here takes ``rows``, an implementation's row kernels (``torch_impl`` or
``triton_impl``), which read blocks of fp32 logits that the products wrote: ``rows.row_state``
merges a block into the per-row state of ``state.py``; ``rows.row_grad`` writes the logit gradient
``G`` in the inputs' dtype into the storage of the logits it has just read (so ``G`` costs no
memory). Nothing here depends on the implementation.

Arguments shared by all: ``h`` (N, H) student hidden states, ``g`` (N, H_t) teacher hidden states
or None (log-probs), ``weight`` (V, H), ``teacher_weight`` (V, H_t), ``bias``/``teacher_bias`` (V,)
or None, ``targets`` (N,) int64 or None.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from .matmul import addmm_fp32_, column_sums_, logit_operand, mm_fp32, scaled_mm_
from .plan import LeanPlan
from .state import LossSpec, new_state
from .vocab_parallel import VocabShard, merge_over_ranks, sum_over_ranks_

Grads = tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]


@dataclass
class Operands:
    spec: LossSpec
    h: Tensor
    g: Optional[Tensor]
    weight: Tensor
    teacher_weight: Optional[Tensor]
    bias: Optional[Tensor]
    teacher_bias: Optional[Tensor]
    targets: Optional[Tensor]
    shard: Optional[VocabShard] = None  # the weights hold one rank's vocabulary rows (``vocab_parallel``)

    @property
    def v_start(self) -> int:
        """The global vocabulary index of the weights' first row (targets are global ids)."""
        return 0 if self.shard is None else self.shard.start

    @functools.cached_property
    def w_logits(self) -> Tensor:
        """The student weight as the logit products take it (see ``matmul.logit_operand``)."""
        return logit_operand(self.weight)

    @functools.cached_property
    def u_logits(self) -> Tensor:
        return self.w_logits if self.teacher_weight is self.weight else logit_operand(self.teacher_weight)


def _buffer(rows: int, cols: int, device: torch.device) -> Tensor:
    return torch.empty(rows * cols, dtype=torch.float32, device=device)


def _zeros_like(t: Tensor) -> Tensor:
    return torch.zeros_like(t, memory_format=torch.contiguous_format)


def _matrix(buffer: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous (rows, cols) fp32 matrix at the start of a reused flat buffer."""
    return buffer[: rows * cols].view(rows, cols)


def _grad_view(logits: Tensor, dtype: torch.dtype) -> Tensor:
    """``G`` (rows, cols) in ``dtype`` over the first bytes of each row of ``logits`` (fp32): row i
    of G is written only by the program that has read row i of the logits up to that column."""
    if dtype == torch.float32:
        return logits
    return logits.view(dtype)[:, : logits.shape[1]]


def _slice(t: Optional[Tensor], start: int, stop: int) -> Optional[Tensor]:
    return None if t is None else t[start:stop]


def fast_forward_backward(
    rows: ModuleType, ops: Operands, coef: Optional[Tensor], alpha: float, chunk_rows: int,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Grads]:
    """The fast path: per-row state and the gradient of ``alpha * sum_i coef_i value_i``, in one
    pass over row chunks. Per chunk: ``S = h_c W^T``, ``T = g_c U^T`` (fp32), the row kernel (state,
    then G), ``dh_c = alpha G W``, ``dW (+)= alpha G^T h_c`` in the weight's dtype, ``db += alpha
    sum_c G`` in fp32. Returns the finished state and ``(dh, dW, db)``."""
    h, n, dev = ops.h, ops.h.shape[0], ops.h.device
    vocab = ops.weight.shape[0]
    need_dh, need_dw, need_db = needs
    state = new_state(n, dev)
    s_buf = _buffer(chunk_rows, vocab, dev)
    t_buf = _buffer(chunk_rows, vocab, dev) if ops.g is not None else None
    # every output starts as zeros: no product may read uninitialised memory (a BLAS asked for beta=0
    # has been seen to keep NaN rows from the garbage it was given)
    dh = _zeros_like(h) if need_dh else None
    # a vocabulary slice's part of dh is summed over the ranks in fp32, one chunk at a time
    dh32 = torch.empty((chunk_rows, h.shape[1]), dtype=torch.float32, device=dev) if need_dh and ops.shard else None
    dw = _zeros_like(ops.weight) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_db else None
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        zs = mm_fp32(h[start:stop], ops.w_logits, _matrix(s_buf, stop - start, vocab))
        zt = None if t_buf is None else mm_fp32(ops.g[start:stop], ops.u_logits, _matrix(t_buf, stop - start, vocab))
        grad = _grad_view(zs if zt is None else zt, h.dtype)
        common = dict(v0=ops.v_start, bias=ops.bias, teacher_bias=ops.teacher_bias,
                      targets=_slice(ops.targets, start, stop))
        # the chunk's state (a vocabulary slice's is merged over the ranks first), then G from the finals
        rows.row_state(ops.spec, zs, zt, state[:, start:stop], first=True, last=ops.shard is None, **common)
        if ops.shard is not None:
            merge_over_ranks(state[:, start:stop], ops.shard, ops.spec.has_teacher)
        rows.row_grad(ops.spec, zs, zt, state[:, start:stop], grad, coef=_slice(coef, start, stop), **common)
        if dh32 is not None:
            part = addmm_fp32_(dh32[: stop - start].zero_(), grad, ops.weight)
            dh[start:stop].copy_(sum_over_ranks_(part.mul_(alpha), ops.shard))
        elif dh is not None:
            scaled_mm_(dh[start:stop], grad, ops.weight, alpha, accumulate=False)
        if dw is not None:
            scaled_mm_(dw, grad.t(), h[start:stop], alpha, accumulate=start > 0)
        column_sums_(db, grad)
    return state, (dh, dw, None if db is None else (db * alpha).to(ops.bias.dtype))


def lean_forward(rows: ModuleType, ops: Operands, plan: LeanPlan) -> Tensor:
    """The per-row state over vocabulary slabs: ``S = h W[slab]^T``, ``T = g U[slab]^T`` (fp32),
    the row kernel merging each slab into the running state. Nothing is kept but the state."""
    h, n, dev = ops.h, ops.h.shape[0], ops.h.device
    vocab = ops.weight.shape[0]
    state = new_state(n, dev)
    slab = min(plan.slab, vocab)  # a narrow vocabulary (or a rank's slice of one) needs no wider buffer
    s_buf = _buffer(min(plan.block_rows, n), slab, dev)
    t_buf = _buffer(min(plan.block_rows, n), slab, dev) if ops.g is not None else None
    for r0 in range(0, n, plan.block_rows):
        r1 = min(n, r0 + plan.block_rows)
        for v0 in range(0, vocab, plan.slab):
            v1 = min(vocab, v0 + plan.slab)
            zs = mm_fp32(h[r0:r1], ops.w_logits[v0:v1], _matrix(s_buf, r1 - r0, v1 - v0))
            zt = None if t_buf is None else mm_fp32(ops.g[r0:r1], ops.u_logits[v0:v1], _matrix(t_buf, r1 - r0, v1 - v0))
            rows.row_state(ops.spec, zs, zt, state[:, r0:r1], v0=ops.v_start + v0, bias=_slice(ops.bias, v0, v1),
                           teacher_bias=_slice(ops.teacher_bias, v0, v1), targets=_slice(ops.targets, r0, r1),
                           first=v0 == 0, last=v1 == vocab and ops.shard is None)
    return state if ops.shard is None else merge_over_ranks(state, ops.shard, ops.spec.has_teacher)


def lean_backward(
    rows: ModuleType, ops: Operands, state: Tensor, coef: Tensor, alpha: float, plan: LeanPlan,
    needs: tuple[bool, bool, bool],
) -> Grads:
    """The gradient of ``alpha * sum_i coef_i value_i`` by recomputing each slab's logits (the
    teacher's only for the exact KL): G from the saved state, ``dW[slab] = alpha G^T h`` written
    once per block of rows, ``dh_block += G W[slab]`` in an fp32 accumulator of one block, cast
    into dh when the block's last slab is done, ``db[slab] += alpha sum G``."""
    h, n, dev = ops.h, ops.h.shape[0], ops.h.device
    vocab = ops.weight.shape[0]
    need_dh, need_dw, need_db = needs
    teacher_logits = ops.spec.kind == "kl"
    block = min(plan.block_rows, n)
    s_buf = _buffer(block, min(plan.slab, vocab), dev)
    t_buf = _buffer(block, min(plan.slab, vocab), dev) if teacher_logits else None
    dh = _zeros_like(h) if need_dh else None
    dh32 = torch.zeros((block, h.shape[1]), dtype=torch.float32, device=dev) if need_dh else None
    dw = _zeros_like(ops.weight) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_db else None
    for r0 in range(0, n, plan.block_rows):
        r1 = min(n, r0 + plan.block_rows)
        acc = None if dh32 is None else dh32[: r1 - r0].zero_()
        for v0 in range(0, vocab, plan.slab):
            v1 = min(vocab, v0 + plan.slab)
            zs = mm_fp32(h[r0:r1], ops.w_logits[v0:v1], _matrix(s_buf, r1 - r0, v1 - v0))
            zt = mm_fp32(ops.g[r0:r1], ops.u_logits[v0:v1], _matrix(t_buf, r1 - r0, v1 - v0)) if teacher_logits else None
            grad = _grad_view(zs if zt is None else zt, h.dtype)
            rows.row_grad(ops.spec, zs, zt, state[:, r0:r1], grad, v0=ops.v_start + v0, bias=_slice(ops.bias, v0, v1),
                          teacher_bias=_slice(ops.teacher_bias, v0, v1), targets=_slice(ops.targets, r0, r1),
                          coef=coef[r0:r1])
            if acc is not None:
                addmm_fp32_(acc, grad, ops.weight[v0:v1])
            if dw is not None:
                scaled_mm_(dw[v0:v1], grad.t(), h[r0:r1], alpha, accumulate=r0 > 0)
            column_sums_(None if db is None else db[v0:v1], grad)
        if acc is not None:
            torch.mul(acc, alpha, out=acc)
            dh[r0:r1].copy_(sum_over_ranks_(acc, ops.shard))  # every rank has the same blocks of rows
    return dh, dw, None if db is None else (db * alpha).to(ops.bias.dtype)
