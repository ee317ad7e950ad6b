"""The no-gradient forward: by default the fused kernel here (both lm-head projections per tile,
online softmax/KL state, split-V merge; nothing of size N x V is written, and it needs no working
memory), or with ``OPSDL_NO_GRAD_FORWARD=slabs`` the lean path's loop of cuBLAS products and the
row state kernel, as ``torch_impl.forward_state`` runs it."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..plan import lean_plan
from ..schedule import Operands, lean_forward
from ..state import P, RUNNING, finalize, merge_splits
from . import rows
from .configs import (
    FORWARD_CONFIGS, VOCAB_SPLIT_ALIGN, all_configs, interpreting, on_device, prune_for_device, unspecialised,
)
from .tiles import cap_and_scale, online_update, project_pair_tile, project_tile

# Planes of the (plane, split, row) state buffer: the running planes of opsdl_kernels.state.
M_S, L_S, M_T, L_T, ACC_R, ACC_F, S_Y, T_Y = (tl.constexpr(P[name]) for name in RUNNING)

NO_GRAD_FORWARD = "OPSDL_NO_GRAD_FORWARD"
NO_GRAD_FORWARDS = ("fused", "slabs")

# The autotune key holds N as its next power of two up to this: past it the grid fills the GPU
# whatever the config, below it the first call's N no longer picks the config for every later N.
ROWS_BUCKET_CAP = 16384


def rows_bucket(n_rows: int) -> int:
    return min(triton.next_power_of_2(max(n_rows, 1)), ROWS_BUCKET_CAP)


def autotuned(configs: list[triton.Config], **options):
    """The autotune decorator of the fused forward (a test builds one with two configs)."""
    return triton.autotune(configs=configs, key=["n_bucket", "H", "HT", "SHARED_WEIGHT", "ACC_FORWARD"],
                           prune_configs_by={"early_config_prune": prune_for_device(FORWARD_CONFIGS)}, **options)


@triton.jit(**unspecialised(["n_bucket"], []))
def kl_forward_fn(
    h_ptr, g_ptr, w_ptr, u_ptr, b_ptr, c_ptr, y_ptr, state_ptr,
    N, V, H, HT, split_size, plane_stride, n_bucket,
    stride_hn, stride_hk, stride_gn, stride_gk, stride_wv, stride_wk, stride_uv, stride_uk,
    inv_temperature, softcap,
    SHARED_WEIGHT: tl.constexpr, ACC_REVERSE: tl.constexpr, ACC_FORWARD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Online state over the vocabulary slice ``[split * split_size, (split + 1) * split_size)``,
    both projections in one K loop (``g_ptr`` None: the student's only; ``SHARED_WEIGHT``: U is W).

    With s = cap(W h + b)/tau and t = cap(U g + c)/tau, per row and running max m:
        l_s = sum_v e^(s_v - m_s)                 l_t = sum_v e^(t_v - m_t)
        A   = sum_v e^(s_v - m_s) (s_v - t_v)     B   = sum_v e^(t_v - m_t) (t_v - s_v)
        s_y = s[y], t_y = t[y] (``y_ptr`` given)
    each rescaled by e^(m_old - m_new) when the max grows (-inf logits count for nothing). No logits
    tile leaves the program; the (plane, split, row) state buffer gets the running planes of
    ``opsdl_kernels.state``. ``n_bucket`` (``rows_bucket(N)``) is read only by the autotune key.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < N
    y = tl.full((BLOCK_M,), -1, tl.int64)
    if y_ptr is not None:
        y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    s_y = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_y = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_s = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_t = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_M,), dtype=tl.float32)

    v_start = split * split_size
    v_end = tl.minimum(v_start + split_size, V)
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + offs
        col_mask = cols < v_end
        if g_ptr is not None:
            if SHARED_WEIGHT:
                zs, zt = project_pair_tile(h_ptr, g_ptr, w_ptr, rows, cols, row_mask, col_mask, H,
                                           stride_hn, stride_hk, stride_gn, stride_gk, stride_wv, stride_wk,
                                           BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
            else:
                zs = project_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H,
                                  stride_hn, stride_hk, stride_wv, stride_wk, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
                zt = project_tile(g_ptr, u_ptr, rows, cols, row_mask, col_mask, HT,
                                  stride_gn, stride_gk, stride_uv, stride_uk, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
        else:
            zs = project_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H,
                              stride_hn, stride_hk, stride_wv, stride_wk, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)

        if b_ptr is not None:
            zs += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        s = cap_and_scale(zs, inv_temperature, softcap)
        t = s
        if g_ptr is not None:
            if c_ptr is not None:
                zt += tl.load(c_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            t = cap_and_scale(zt, inv_temperature, softcap)
        is_y = offs[None, :] == (y - v0).to(tl.int32)[:, None]  # 32-bit: a tile of int64 costs registers
        m_s, l_s, m_t, l_t, acc_r, acc_f, s_y, t_y = online_update(
            s, t, col_mask, is_y, m_s, l_s, m_t, l_t, acc_r, acc_f, s_y, t_y,
            g_ptr is not None, ACC_REVERSE, ACC_FORWARD, y_ptr is not None)

    # plane_stride (splits x N) comes from the host: an integer argument equal to 1 is specialised
    # to a constant at launch, so no method may be called on it here.
    out = state_ptr + split * N + rows
    tl.store(out + M_S * plane_stride, m_s, mask=row_mask)
    tl.store(out + L_S * plane_stride, l_s, mask=row_mask)
    if y_ptr is not None:
        tl.store(out + S_Y * plane_stride, s_y, mask=row_mask)
    if g_ptr is not None:
        tl.store(out + M_T * plane_stride, m_t, mask=row_mask)
        tl.store(out + L_T * plane_stride, l_t, mask=row_mask)
        if ACC_REVERSE:
            tl.store(out + ACC_R * plane_stride, acc_r, mask=row_mask)
        if ACC_FORWARD:
            tl.store(out + ACC_F * plane_stride, acc_f, mask=row_mask)
        if y_ptr is not None:
            tl.store(out + T_Y * plane_stride, t_y, mask=row_mask)


kl_forward_kernel = autotuned(all_configs(FORWARD_CONFIGS))(kl_forward_fn)


def _multiprocessors(device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_vocab_splits(n_rows: int, vocab: int, device: torch.device, splits: Optional[int] = None) -> tuple[int, int]:
    """(number of splits, columns per split). Small batches split V so about two programs per SM
    run; each split spans a whole number of VOCAB_SPLIT_ALIGN columns."""
    max_splits = triton.cdiv(vocab, VOCAB_SPLIT_ALIGN)
    if splits is None:
        row_tiles = triton.cdiv(n_rows, 128)
        splits = triton.cdiv(2 * _multiprocessors(device), row_tiles)
    splits = max(1, min(splits, max_splits))
    split_size = triton.cdiv(triton.cdiv(vocab, splits), VOCAB_SPLIT_ALIGN) * VOCAB_SPLIT_ALIGN
    return triton.cdiv(vocab, split_size), split_size


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 products unless the user allowed TF32 matmuls; 16-bit inputs ignore the setting."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def no_grad_forward() -> str:
    """The no-gradient forward ``OPSDL_NO_GRAD_FORWARD`` selects: "fused" (the default) or "slabs"."""
    choice = os.environ.get(NO_GRAD_FORWARD, "fused")
    if choice not in NO_GRAD_FORWARDS:
        raise ValueError(f"{NO_GRAD_FORWARD} must be one of {', '.join(map(repr, NO_GRAD_FORWARDS))}, "
                         f"got {choice!r}")
    return choice


def forward_state(ops: Operands, budget: int = 0, vocab_splits: Optional[int] = None) -> Tensor:
    """The finished per-row state in one fused pass over the vocabulary: both projections tile by
    tile, nothing of size N x V anywhere (``budget`` is unused: the kernel needs none). Small
    batches split the vocabulary across programs and merge the partial states exactly. With
    ``OPSDL_NO_GRAD_FORWARD=slabs``: the lean path's slab loop within ``budget`` instead
    (``vocab_splits`` unused)."""
    h, g, spec = ops.h, ops.g, ops.spec
    n, vocab = h.shape[0], ops.weight.shape[0]
    if no_grad_forward() == "slabs":
        return lean_forward(rows, ops, lean_plan(n, 0, vocab, g is not None, budget))
    splits, split_size = plan_vocab_splits(n, vocab, h.device, vocab_splits)
    split_state = torch.zeros((len(RUNNING), splits, n), dtype=torch.float32, device=h.device)
    shared = g is not None and ops.teacher_weight is ops.weight
    u = None if g is None or shared else ops.teacher_weight
    x_g = h if g is None else g  # strides only: never read without g_ptr
    x_u = ops.weight if u is None else u
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits)  # noqa: E731
    with on_device(h):
        kl_forward_kernel[grid](
            h_ptr=h, g_ptr=g, w_ptr=ops.weight, u_ptr=u, b_ptr=ops.bias, c_ptr=ops.teacher_bias,
            y_ptr=ops.targets, state_ptr=split_state,
            N=n, V=vocab, H=h.shape[1], HT=x_g.shape[1], split_size=split_size, plane_stride=splits * n,
            n_bucket=rows_bucket(n),
            stride_hn=h.stride(0), stride_hk=h.stride(1), stride_gn=x_g.stride(0), stride_gk=x_g.stride(1),
            stride_wv=ops.weight.stride(0), stride_wk=ops.weight.stride(1), stride_uv=x_u.stride(0),
            stride_uk=x_u.stride(1), inv_temperature=1.0 / spec.temperature, softcap=spec.softcap,
            SHARED_WEIGHT=shared, ACC_REVERSE=spec.kind == "kl", ACC_FORWARD=spec.mixes_forward,
            DOT_PRECISION=dot_precision(h.dtype),
        )
    return finalize(merge_splits(split_state), spec.has_teacher)
