"""The row kernels: the softmax/KL math over a block of fp32 logits that cuBLAS wrote.

One program per row (on a GPU; a few rows under the interpreter) streams the row's student (and
teacher) logits, ``BLOCK_V`` columns at a time, in one of two kernels:

- ``row_state_kernel`` merges the block into the online state of ``opsdl_kernels.state`` (and, on
  the block that ends the vocabulary, writes the finals). Each lane (column slot of the block)
  keeps its own running max and sums across the column loop; the lanes are merged once per row at
  the end, so the loop has no cross-thread reduction and no barrier.
- ``row_grad_kernel`` writes the logit gradient ``G`` in the inputs' dtype over the bytes of the
  logits it has just read, from the finals. No reduction at all.

Memory-bound by design: no products, no atomics, each row owned by one program, so the result is
deterministic. -inf logits (a -inf bias entry) are columns of probability 0 and contribute 0.
"""
from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from ..state import P, LossSpec
from .configs import GRAD_BLOCK, STATE_BLOCK, on_device, row_launch, unspecialised
from .tiles import cap_and_scale, exp_below, weighted

M_S, L_S, M_T, L_T, ACC_R, ACC_F, S_Y, T_Y, LSE_S, LSE_T, KL_R, KL_F, LOGP_Y, LOGQ_Y = (
    tl.constexpr(P[name]) for name in ("m_s", "l_s", "m_t", "l_t", "acc_r", "acc_f", "s_y", "t_y",
                                       "lse_s", "lse_t", "kl_r", "kl_f", "logp_y", "logq_y"))
KIND_KL, KIND_SAMPLED = tl.constexpr(0), tl.constexpr(1)
KIND_CODE = {"kl": 0, "sampled": 1, "logprob": 2}


@triton.jit
def _logits(z_rows, bias_ptr, cols, mask, inv_temperature, softcap):
    """Logits ``cap(z + b) / tau`` at ``cols`` of the rows that start at ``z_rows`` (any shapes that
    broadcast: a (BLOCK_R, BLOCK_V) block, or one column per row)."""
    z = tl.load(z_rows + cols, mask=mask, other=0.0)
    if bias_ptr is not None:
        z += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return cap_and_scale(z, inv_temperature, softcap)


@triton.jit
def _load_plane(st, plane, stride, row_mask):
    return tl.load(st + plane * stride, mask=row_mask, other=0.0)


@triton.jit
def _lane_step(x, live, m, l):
    """One logit per lane into the lane's running max ``m`` and sum ``l`` of e^(x - m), one exp:
    with d = e^(min(x, m) - max(x, m)), a new max scales the old sums by d and adds 1, otherwise x
    adds d. Returns the new max, the factor for the lane's other sums, x's weight e^(x - m_new)
    and the new sum; columns outside ``live`` and -inf logits weigh 0, a NaN makes the sums NaN."""
    x = tl.where(live, x, float("-inf"))
    grow = (x > m) | (x != x)  # a NaN takes the lane's max, so the lane merge cannot drop it
    hi = tl.where(grow, x, m)
    d = exp_below(tl.where(grow, m, x), hi)
    alpha = tl.where(grow, d, 1.0)
    e = tl.where(grow, 1.0, d)
    return hi, alpha, e, l * alpha + e


@triton.jit
def _merge(m1, l1, a1, m2, l2, a2):
    """Two (max, sum, accumulator) states over disjoint columns as one: m = max(m1, m2), each sum
    rescaled by e^(m_k - m) (a state that saw nothing, m_k = -inf, adds 0)."""
    m = tl.maximum(m1, m2)
    f1 = exp_below(m1, m)
    f2 = exp_below(m2, m)
    return m, weighted(f1, l1) + weighted(f2, l2), weighted(f1, a1) + weighted(f2, a2)


# Arguments a launch need not specialise on (equal to 1, or divisible by 16): they index per-row
# scalars or select a branch, so a specialisation would only add compiles (the GPU test run counts
# them). Widths, strides and the logits/gradient/bias pointers stay specialised: their divisibility
# is what lets the row loads and stores vectorise.
@triton.jit(**unspecialised(["n_rows", "v0", "state_stride", "first", "last"], ["state_ptr", "targets_ptr"]))
def row_state_kernel(
    zs_ptr, zt_ptr, bias_ptr, teacher_bias_ptr, targets_ptr, state_ptr,
    n_rows, width, v0, state_stride, zs_stride, zt_stride, first, last, inv_temperature, softcap,
    MIX_FORWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Rows r of the block, columns v0 .. v0 + width of the vocabulary, s = cap(zs + b)/tau and
    t = cap(zt + c)/tau (``zt_ptr`` None: no teacher); BLOCK_R rows per program (1 on a GPU).

    Per lane j (columns j, j + BLOCK_V, ...), over the loop, with one exp per logit:
        m_j = max s,  l_j = sum e^(s - m_j),  a_j = sum e^(s - m_j) (s - t)    (only where e > 0)
    and likewise for t (sum e^(t - m_t,j) (t - s) with MIX_FORWARD). Once per row at the end:
        m_s = max_j m_j,  l_s = sum_j e^(m_j - m_s) l_j,  acc_r = sum_j e^(m_j - m_s) a_j
    merged the same way into the stored state unless ``first``; s_y, t_y += the target's logits
    when its column is here. Stores the running state, or when ``last`` the finals:
        lse_s = m_s + log l_s, kl_r = acc_r / l_s - lse_s + lse_t, kl_f = acc_f / l_t - lse_t + lse_s,
        logp_y = s_y - lse_s (lse_t, logq_y likewise).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    zs_rows = zs_ptr + rows * zs_stride
    zt_rows = zs_rows
    if zt_ptr is not None:
        zt_rows = zt_ptr + rows * zt_stride
    offs = tl.arange(0, BLOCK_V)
    m_s = tl.full((BLOCK_R, BLOCK_V), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_R, BLOCK_V), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_R, BLOCK_V), tl.float32)
    l_t = tl.zeros((BLOCK_R, BLOCK_V), tl.float32)
    acc_r = tl.zeros((BLOCK_R, BLOCK_V), tl.float32)
    acc_f = tl.zeros((BLOCK_R, BLOCK_V), tl.float32)
    for start in range(0, width, BLOCK_V):
        cols = start + offs[None, :]
        live = cols < width
        mask = row_mask[:, None] & live
        s = _logits(zs_rows[:, None], bias_ptr, cols, mask, inv_temperature, softcap)
        m_s, alpha_s, e_s, l_s = _lane_step(s, live, m_s, l_s)
        if zt_ptr is not None:
            t = _logits(zt_rows[:, None], teacher_bias_ptr, cols, mask, inv_temperature, softcap)
            m_t, alpha_t, e_t, l_t = _lane_step(t, live, m_t, l_t)
            acc_r = acc_r * alpha_s + weighted(e_s, s - t)  # s - t is finite on masked columns (0 - 0)
            if MIX_FORWARD:
                acc_f = acc_f * alpha_t + weighted(e_t, t - s)

    # The one cross-lane merge per row: a max, then the rescaled sums, each one reduction (student
    # and teacher side by side in one tensor).
    if zt_ptr is not None:
        m_s_row, m_t_row = tl.split(tl.max(tl.join(m_s, m_t), axis=1))
        f_s = exp_below(m_s, m_s_row[:, None])
        f_t = exp_below(m_t, m_t_row[:, None])
        student, teacher = tl.split(tl.sum(tl.join(tl.join(weighted(f_s, l_s), weighted(f_s, acc_r)),
                                                   tl.join(weighted(f_t, l_t), weighted(f_t, acc_f))), axis=1))
        l_s_row, acc_r_row = tl.split(student)
        l_t_row, acc_f_row = tl.split(teacher)
    else:
        m_s_row = tl.max(m_s, axis=1)
        l_s_row = tl.sum(weighted(exp_below(m_s, m_s_row[:, None]), l_s), axis=1)
        acc_r_row = tl.zeros((BLOCK_R,), tl.float32)

    s_y = tl.zeros((BLOCK_R,), tl.float32)
    t_y = tl.zeros((BLOCK_R,), tl.float32)
    if targets_ptr is not None:
        y = tl.load(targets_ptr + rows, mask=row_mask, other=-1) - v0
        here = row_mask & (y >= 0) & (y < width)
        y = tl.where(here, y, 0)
        s_y = tl.where(here, _logits(zs_rows, bias_ptr, y, here, inv_temperature, softcap), 0.0)
        if zt_ptr is not None:
            t_y = tl.where(here, _logits(zt_rows, teacher_bias_ptr, y, here, inv_temperature, softcap), 0.0)

    st = state_ptr + rows
    if first == 0:
        m_s_row, l_s_row, acc_r_row = _merge(
            _load_plane(st, M_S, state_stride, row_mask), _load_plane(st, L_S, state_stride, row_mask),
            _load_plane(st, ACC_R, state_stride, row_mask), m_s_row, l_s_row, acc_r_row)
        s_y += _load_plane(st, S_Y, state_stride, row_mask)
        if zt_ptr is not None:
            m_t_row, l_t_row, acc_f_row = _merge(
                _load_plane(st, M_T, state_stride, row_mask), _load_plane(st, L_T, state_stride, row_mask),
                _load_plane(st, ACC_F, state_stride, row_mask), m_t_row, l_t_row, acc_f_row)
            t_y += _load_plane(st, T_Y, state_stride, row_mask)
    if last:
        lse_s = m_s_row + tl.log(l_s_row)
        tl.store(st + LSE_S * state_stride, lse_s, mask=row_mask)
        tl.store(st + LOGP_Y * state_stride, s_y - lse_s, mask=row_mask)
        if zt_ptr is not None:
            lse_t = m_t_row + tl.log(l_t_row)
            tl.store(st + LSE_T * state_stride, lse_t, mask=row_mask)
            tl.store(st + LOGQ_Y * state_stride, t_y - lse_t, mask=row_mask)
            # lse_s - lse_t as (m_s - m_t) + log(l_s / l_t): near-identical distributions give a
            # difference of nearly equal numbers, which this keeps to a few ulps of the KL.
            gap = m_s_row - m_t_row + tl.log(l_s_row / l_t_row)
            tl.store(st + KL_R * state_stride, acc_r_row / l_s_row - gap, mask=row_mask)
            tl.store(st + KL_F * state_stride, acc_f_row / l_t_row + gap, mask=row_mask)
    else:
        tl.store(st + M_S * state_stride, m_s_row, mask=row_mask)
        tl.store(st + L_S * state_stride, l_s_row, mask=row_mask)
        tl.store(st + S_Y * state_stride, s_y, mask=row_mask)
        if zt_ptr is not None:
            tl.store(st + ACC_R * state_stride, acc_r_row, mask=row_mask)
            tl.store(st + M_T * state_stride, m_t_row, mask=row_mask)
            tl.store(st + L_T * state_stride, l_t_row, mask=row_mask)
            tl.store(st + ACC_F * state_stride, acc_f_row, mask=row_mask)
            tl.store(st + T_Y * state_stride, t_y, mask=row_mask)


@triton.jit(**unspecialised(["n_rows", "v0", "state_stride"], ["state_ptr", "targets_ptr", "coef_ptr"]))
def row_grad_kernel(
    zs_ptr, zt_ptr, grad_ptr, bias_ptr, teacher_bias_ptr, targets_ptr, coef_ptr, state_ptr,
    n_rows, width, v0, state_stride, zs_stride, zt_stride, grad_stride, inv_temperature, softcap, reverse_weight,
    KIND: tl.constexpr, MIX_FORWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The logit gradient of rows r, columns v0 .. v0 + width, from the finals of the state
    (``zt_ptr``: the teacher's logits, given for the exact KL only), with p = e^(s - lse_s),
    q = e^(t - lse_t):
        G = c_r / tau * cap'(z) * D,  c_r = coef[r] (times logp_y - logq_y when sampled),
        D = rw p (log p - log q - kl_r) + (1 - rw)(p - q)     (kl; the first term 0 where p = 0)
        D = onehot(y) - p                                    (sampled, logprob)
    and G = 0 on rows with c_r = 0.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    zs_rows = (zs_ptr + rows * zs_stride)[:, None]
    zt_rows = zs_rows
    if zt_ptr is not None:
        zt_rows = (zt_ptr + rows * zt_stride)[:, None]
    grad_rows = (grad_ptr + rows * grad_stride)[:, None]
    offs = tl.arange(0, BLOCK_V)
    st = state_ptr + rows
    lse_s = _load_plane(st, LSE_S, state_stride, row_mask)[:, None]
    coef = tl.full((BLOCK_R,), 1.0, tl.float32)
    if coef_ptr is not None:
        coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    if KIND == KIND_KL:
        lse_t = _load_plane(st, LSE_T, state_stride, row_mask)[:, None]
        kl_r = _load_plane(st, KL_R, state_stride, row_mask)[:, None]
    else:
        y = tl.full((BLOCK_R,), -1, tl.int64)
        if targets_ptr is not None:
            y = tl.load(targets_ptr + rows, mask=row_mask, other=-1) - v0
        y = y[:, None]
        if KIND == KIND_SAMPLED:
            coef *= _load_plane(st, LOGP_Y, state_stride, row_mask) - _load_plane(st, LOGQ_Y, state_stride, row_mask)
    scale = (coef * inv_temperature)[:, None]
    live = (coef != 0.0)[:, None]
    for start in range(0, width, BLOCK_V):
        cols = start + offs[None, :]
        mask = row_mask[:, None] & (cols < width)
        s = _logits(zs_rows, bias_ptr, cols, mask, inv_temperature, softcap)
        if KIND == KIND_KL:
            t = _logits(zt_rows, teacher_bias_ptr, cols, mask, inv_temperature, softcap)
        if grad_ptr.dtype.element_ty.primitive_bitwidth < 32:
            # A 16-bit G over the fp32 logits it came from: step k stores over logit columns
            # [k B / 2, (k + 1) B / 2), B = BLOCK_V, which other threads loaded in step k // 2. A
            # barrier in step i (after its loads, before its stores) makes every load of steps <= i
            # precede every store of steps >= i; one in each step 0, 1, 2, 4, 8, ... lies in
            # [k // 2, k] for every k, so no thread stores over a logit another has still to load.
            # (An fp32 G at column c overwrites only the logit it is computed from: no barrier.)
            step = start // BLOCK_V
            if (step & (step - 1)) == 0:
                tl.debug_barrier()
        logp = s - lse_s
        p = tl.exp(logp)
        if KIND == KIND_KL:
            logq = t - lse_t
            d = reverse_weight * weighted(p, logp - logq - kl_r)
            if MIX_FORWARD:
                d += (1.0 - reverse_weight) * (p - tl.exp(logq))
        else:
            d = tl.where(cols == y, 1.0, 0.0) - p
        if softcap is not None:
            th = s / (inv_temperature * softcap)  # tanh(z / cap)
            d = d * (1.0 - th * th)
        g = tl.where(live, d * scale, 0.0)
        tl.store(grad_rows + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


def row_state(spec: LossSpec, zs: Tensor, zt: Optional[Tensor], state: Tensor, *, v0: int,
              bias: Optional[Tensor], teacher_bias: Optional[Tensor], targets: Optional[Tensor],
              first: bool, last: bool) -> None:
    """Triton twin of ``torch_impl.row_state``. Absent inputs are passed as None (never a stand-in
    tensor), so no slot can alias a real buffer."""
    n_rows, width = zs.shape
    if n_rows == 0:
        return
    block_r, block_v, num_warps = row_launch(width, STATE_BLOCK)
    with on_device(zs):
        row_state_kernel[(triton.cdiv(n_rows, block_r),)](
            zs_ptr=zs, zt_ptr=zt, bias_ptr=bias, teacher_bias_ptr=teacher_bias, targets_ptr=targets,
            state_ptr=state, n_rows=n_rows, width=width, v0=v0, state_stride=state.stride(0),
            zs_stride=zs.stride(0), zt_stride=0 if zt is None else zt.stride(0), first=int(first), last=int(last),
            inv_temperature=1.0 / spec.temperature, softcap=spec.softcap,
            MIX_FORWARD=spec.mixes_forward, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps,
        )


def row_grad(spec: LossSpec, zs: Tensor, zt: Optional[Tensor], state: Tensor, grad: Tensor, *, v0: int,
             bias: Optional[Tensor], teacher_bias: Optional[Tensor], targets: Optional[Tensor],
             coef: Optional[Tensor]) -> None:
    """Triton twin of ``torch_impl.row_grad`` (the teacher's logits are read for the exact KL only)."""
    n_rows, width = zs.shape
    if n_rows == 0:
        return
    if spec.kind != "kl":
        zt = teacher_bias = None
    block_r, block_v, num_warps = row_launch(width, GRAD_BLOCK)
    with on_device(zs):
        row_grad_kernel[(triton.cdiv(n_rows, block_r),)](
            zs_ptr=zs, zt_ptr=zt, grad_ptr=grad, bias_ptr=bias, teacher_bias_ptr=teacher_bias,
            targets_ptr=targets, coef_ptr=coef, state_ptr=state,
            n_rows=n_rows, width=width, v0=v0, state_stride=state.stride(0), zs_stride=zs.stride(0),
            zt_stride=0 if zt is None else zt.stride(0), grad_stride=grad.stride(0),
            inv_temperature=1.0 / spec.temperature, softcap=spec.softcap, reverse_weight=spec.reverse_weight,
            KIND=KIND_CODE[spec.kind], MIX_FORWARD=spec.mixes_forward,
            BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps,
        )
