"""How a call is cut into pieces that fit its memory budget.

Two structures compute a gradient, both from large cuBLAS products with fp32 logits, no atomics:

- **fast** (gradient formed in the forward): rows in chunks of C; per chunk the student and teacher
  logits (C x V each, fp32), one row kernel, then ``dh_c = G W`` and ``dW += G^T h_c``. Four
  products of ``2 C V H`` per chunk, the minimum. Working memory ``C x V x 8`` bytes (``x 4``
  without a teacher); every chunk re-reads and re-writes dW, so chunks below ``MIN_FAST_ROWS`` rows
  lose the time the fast path exists to save.
- **lean** (recompute): the forward keeps O(1) numbers per row over vocabulary slabs of S columns;
  the backward recomputes each slab's logits, writes that slab of dW once per block of R rows and
  accumulates the block's dh in fp32. Six products (five for the single-sample estimator), working
  memory ``R x H x 4 + R x S x 8`` bytes: flat in V and, past one block, in N.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of working memory a call may use beyond inputs and gradients
MIN_FAST_ROWS = 256
ROW_ALIGN = 64
MIN_SLAB, MAX_SLAB, SLAB_ALIGN = 256, 4096, 256
MIN_BLOCK_ROWS = 128
PER_ROW_BYTES = 128  # the lean path's per-row state and weights, kept for every row


def fast_chunk_rows(n_rows: int, vocab: int, teacher: bool, budget: int) -> int:
    """Rows per chunk of the fast path: as many as the budget holds (in multiples of 64 rows, which
    cuBLAS tiles evenly), balanced over the chunks so the last is not a sliver; 0 when a chunk of
    ``min(n_rows, MIN_FAST_ROWS)`` rows does not fit."""
    fit = budget // (vocab * 4 * (2 if teacher else 1))
    if fit < min(n_rows, MIN_FAST_ROWS):
        return 0
    if fit >= n_rows:
        return n_rows
    fit = fit // ROW_ALIGN * ROW_ALIGN if fit >= ROW_ALIGN else fit
    chunks = -(-n_rows // fit)
    balanced = -(-n_rows // chunks)
    return min(fit, -(-balanced // ROW_ALIGN) * ROW_ALIGN)


@dataclass(frozen=True)
class LeanPlan:
    block_rows: int  # R: rows per block (all of them unless dh's fp32 accumulator would not fit)
    slab: int  # S: vocabulary columns per slab


def lean_plan(n_rows: int, hidden: int, vocab: int, teacher: bool, budget: int) -> LeanPlan:
    """Blocks of rows and slabs of columns for the lean path within ``budget`` bytes (``hidden=0``:
    no dh accumulator, as in a forward). A block takes as many rows as keep its fp32 dh accumulator,
    or its narrowest slab, within half the budget; the slab is the widest (a multiple of 256
    columns, 256 to 4096) the rest allows. Never smaller than 128 rows x 256 columns, so a budget
    below that is exceeded."""
    logits_per_column = 4 * (2 if teacher else 1)
    per_row = max(hidden * 4, MIN_SLAB * logits_per_column)
    block = max(1, min(n_rows, max(MIN_BLOCK_ROWS, budget // 2 // per_row)))
    room = budget - block * hidden * 4 - n_rows * PER_ROW_BYTES
    slab = room // (block * logits_per_column) // SLAB_ALIGN * SLAB_ALIGN
    slab = max(MIN_SLAB, min(MAX_SLAB, slab, -(-vocab // SLAB_ALIGN) * SLAB_ALIGN))
    return LeanPlan(block, slab)
