"""The row kernel: the softmax/KL math over a block of fp32 logits that cuBLAS wrote.

One program per row (on a GPU; a few rows under the interpreter) streams the row's student (and
teacher) logits, ``BLOCK_V`` columns at a time:
a pass that merges them into the online state of ``opsdl_kernels.state`` (and, on the block that
ends the vocabulary, the finals), then a pass that writes the logit gradient ``G`` in the inputs'
dtype over the bytes of the logits it has just read. Memory-bound by design: no products, no
atomics, each row owned by one program, so the result is deterministic.
"""
from __future__ import annotations

import inspect
from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from ..state import P, LossSpec
from .configs import on_device, row_launch
from .tiles import cap_and_scale, online_update

M_S, L_S, M_T, L_T, ACC_R, ACC_F, S_Y, T_Y, LSE_S, LSE_T, KL_R, KL_F, LOGP_Y, LOGQ_Y = (
    tl.constexpr(P[name]) for name in ("m_s", "l_s", "m_t", "l_t", "acc_r", "acc_f", "s_y", "t_y",
                                       "lse_s", "lse_t", "kl_r", "kl_f", "logp_y", "logq_y"))
KIND_KL, KIND_SAMPLED = tl.constexpr(0), tl.constexpr(1)
KIND_CODE = {"kl": 0, "sampled": 1, "logprob": 2}


@triton.jit
def _logits(z_rows, bias_ptr, cols, col_mask, mask, inv_temperature, softcap):
    """(BLOCK_R, BLOCK_V) logits ``cap(z + b) / tau`` at ``cols`` of the rows at ``z_rows``."""
    z = tl.load(z_rows[:, None] + cols[None, :], mask=mask, other=0.0)
    if bias_ptr is not None:
        z += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return cap_and_scale(z, inv_temperature, softcap)


@triton.jit
def _load_plane(st, plane, stride, row_mask):
    return tl.load(st + plane * stride, mask=row_mask, other=0.0)


# Arguments a launch need not specialise on (equal to 1, or divisible by 16): they index per-row
# scalars or select a branch, so a specialisation would only add compiles (the GPU test run counts
# them). Widths, strides and the logits/gradient/bias pointers stay specialised: their divisibility
# is what lets the row loads and stores vectorise.
_GENERIC = ["n_rows", "v0", "state_stride", "first", "last"]
_GENERIC_ALIGNMENT = _GENERIC + ["state_ptr", "targets_ptr", "coef_ptr"]
_JIT_OPTIONS = ({"do_not_specialize": _GENERIC, "do_not_specialize_on_alignment": _GENERIC_ALIGNMENT}
                if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters
                else {"do_not_specialize": _GENERIC_ALIGNMENT})


@triton.jit(**_JIT_OPTIONS)
def logit_rows_kernel(
    zs_ptr, zt_ptr, grad_ptr, bias_ptr, teacher_bias_ptr, targets_ptr, coef_ptr, state_ptr,
    n_rows, width, v0, state_stride, zs_stride, zt_stride, grad_stride, first, last,
    inv_temperature, softcap, reverse_weight,
    KIND: tl.constexpr, MIX_FORWARD: tl.constexpr, UPDATE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Rows r of the block, columns v0 .. v0 + width of the vocabulary, s = cap(zs + b)/tau and
    t = cap(zt + c)/tau (``zt_ptr`` None: no teacher); BLOCK_R rows per program (1 on a GPU):

    UPDATE: from the stored state (a fresh one when ``first``), m_s <- max(m_s, max s),
            l_s <- l_s e^(m_old - m_s) + sum e^(s - m_s), acc_r <- acc_r e^(m_old - m_s) +
            sum e^(s - m_s) (s - t), likewise m_t, l_t, acc_f; s_y, t_y += the target's logits when
            its column is here. Stores the running state, or when ``last`` the finals:
            lse_s = m_s + log l_s, lse_t, kl_r = acc_r / l_s - lse_s + lse_t, kl_f,
            logp_y = s_y - lse_s, logq_y. (A gradient after an update needs ``last``.)
    grad:   G = c_r / tau * cap'(z) * D,  c_r = coef[r] (times logp_y - logq_y when sampled),
            D = rw p (log p - log q - kl_r) + (1 - rw)(p - q)     (kl)
            D = onehot(y) - p                                    (sampled, logprob)
            and G = 0 on rows with c_r = 0.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    offs = tl.arange(0, BLOCK_V)
    zs_rows = zs_ptr + rows * zs_stride
    zt_rows = zs_rows
    if zt_ptr is not None:
        zt_rows = zt_ptr + rows * zt_stride
    st = state_ptr + rows
    y = tl.full((BLOCK_R,), -1, tl.int64)
    if targets_ptr is not None:
        y = tl.load(targets_ptr + rows, mask=row_mask, other=-1) - v0

    if UPDATE:
        if first:
            m_s = tl.full((BLOCK_R,), float("-inf"), tl.float32)
            m_t = tl.full((BLOCK_R,), float("-inf"), tl.float32)
            l_s = tl.zeros((BLOCK_R,), tl.float32)
            l_t = tl.zeros((BLOCK_R,), tl.float32)
            acc_r = tl.zeros((BLOCK_R,), tl.float32)
            acc_f = tl.zeros((BLOCK_R,), tl.float32)
            s_y = tl.zeros((BLOCK_R,), tl.float32)
            t_y = tl.zeros((BLOCK_R,), tl.float32)
        else:
            m_s = _load_plane(st, M_S, state_stride, row_mask)
            m_t = _load_plane(st, M_T, state_stride, row_mask)
            l_s = _load_plane(st, L_S, state_stride, row_mask)
            l_t = _load_plane(st, L_T, state_stride, row_mask)
            acc_r = _load_plane(st, ACC_R, state_stride, row_mask)
            acc_f = _load_plane(st, ACC_F, state_stride, row_mask)
            s_y = _load_plane(st, S_Y, state_stride, row_mask)
            t_y = _load_plane(st, T_Y, state_stride, row_mask)
        for start in range(0, width, BLOCK_V):
            cols = start + offs
            col_mask = cols < width
            mask = row_mask[:, None] & col_mask[None, :]
            s = _logits(zs_rows, bias_ptr, cols, col_mask, mask, inv_temperature, softcap)
            t = s
            if zt_ptr is not None:
                t = _logits(zt_rows, teacher_bias_ptr, cols, col_mask, mask, inv_temperature, softcap)
            m_s, l_s, m_t, l_t, acc_r, acc_f, s_y, t_y = online_update(
                s, t, col_mask, cols[None, :] == y[:, None], m_s, l_s, m_t, l_t, acc_r, acc_f, s_y, t_y,
                zt_ptr is not None, True, MIX_FORWARD, targets_ptr is not None)
        lse_s = m_s + tl.log(l_s)
        logp_y = s_y - lse_s
        if zt_ptr is not None:
            lse_t = m_t + tl.log(l_t)
            kl_r = acc_r / l_s - lse_s + lse_t
            logq_y = t_y - lse_t
        if last:
            tl.store(st + LSE_S * state_stride, lse_s, mask=row_mask)
            tl.store(st + LOGP_Y * state_stride, logp_y, mask=row_mask)
            if zt_ptr is not None:
                tl.store(st + LSE_T * state_stride, lse_t, mask=row_mask)
                tl.store(st + LOGQ_Y * state_stride, logq_y, mask=row_mask)
                tl.store(st + KL_R * state_stride, kl_r, mask=row_mask)
                tl.store(st + KL_F * state_stride, acc_f / l_t - lse_t + lse_s, mask=row_mask)
        else:
            tl.store(st + M_S * state_stride, m_s, mask=row_mask)
            tl.store(st + M_T * state_stride, m_t, mask=row_mask)
            tl.store(st + L_S * state_stride, l_s, mask=row_mask)
            tl.store(st + L_T * state_stride, l_t, mask=row_mask)
            tl.store(st + ACC_R * state_stride, acc_r, mask=row_mask)
            tl.store(st + ACC_F * state_stride, acc_f, mask=row_mask)
            tl.store(st + S_Y * state_stride, s_y, mask=row_mask)
            tl.store(st + T_Y * state_stride, t_y, mask=row_mask)

    if grad_ptr is not None:
        if not UPDATE:
            lse_s = _load_plane(st, LSE_S, state_stride, row_mask)
            lse_t = _load_plane(st, LSE_T, state_stride, row_mask)
            kl_r = _load_plane(st, KL_R, state_stride, row_mask)
            logp_y = _load_plane(st, LOGP_Y, state_stride, row_mask)
            logq_y = _load_plane(st, LOGQ_Y, state_stride, row_mask)
        coef = tl.full((BLOCK_R,), 1.0, tl.float32)
        if coef_ptr is not None:
            coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
        if KIND == KIND_SAMPLED:
            coef = coef * (logp_y - logq_y)
        scale = (coef * inv_temperature)[:, None]
        live = (coef != 0.0)[:, None]
        grad_rows = grad_ptr + rows * grad_stride
        for start in range(0, width, BLOCK_V):
            cols = start + offs
            col_mask = cols < width
            mask = row_mask[:, None] & col_mask[None, :]
            s = _logits(zs_rows, bias_ptr, cols, col_mask, mask, inv_temperature, softcap)
            if KIND == KIND_KL:
                t = _logits(zt_rows, teacher_bias_ptr, cols, col_mask, mask, inv_temperature, softcap)
            # A 16-bit G overwrites the logits of columns [start/2, start/2 + BLOCK_V/2), which other
            # warps of this program read in this step (start = 0) or earlier ones: every warp must
            # have loaded its part of the step before any warp stores.
            tl.debug_barrier()
            logp = s - lse_s[:, None]
            p = tl.exp(logp)
            if KIND == KIND_KL:
                logq = t - lse_t[:, None]
                d = reverse_weight * p * (logp - logq - kl_r[:, None])
                if MIX_FORWARD:
                    d += (1.0 - reverse_weight) * (p - tl.exp(logq))
            else:
                d = tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p
            if softcap is not None:
                th = s / (inv_temperature * softcap)  # tanh(z / cap)
                d = d * (1.0 - th * th)
            g = tl.where(live, d * scale, 0.0)
            tl.store(grad_rows[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=mask)


def _launch(spec: LossSpec, zs: Tensor, zt: Optional[Tensor], state: Tensor, grad: Optional[Tensor], *, v0: int,
            bias: Optional[Tensor], teacher_bias: Optional[Tensor], targets: Optional[Tensor],
            coef: Optional[Tensor], update: bool, first: bool, last: bool) -> None:
    """Absent inputs are passed as None (never a stand-in tensor), so no slot can alias a real buffer."""
    n_rows, width = zs.shape
    if n_rows == 0:
        return
    block_r, block_v, num_warps = row_launch(width)
    with on_device(zs):
        logit_rows_kernel[(triton.cdiv(n_rows, block_r),)](
            zs_ptr=zs, zt_ptr=zt, grad_ptr=grad, bias_ptr=bias, teacher_bias_ptr=teacher_bias,
            targets_ptr=targets, coef_ptr=coef, state_ptr=state,
            n_rows=n_rows, width=width, v0=v0, state_stride=state.stride(0), zs_stride=zs.stride(0),
            zt_stride=0 if zt is None else zt.stride(0), grad_stride=0 if grad is None else grad.stride(0),
            first=int(first), last=int(last),
            inv_temperature=1.0 / spec.temperature, softcap=spec.softcap, reverse_weight=spec.reverse_weight,
            KIND=KIND_CODE[spec.kind], MIX_FORWARD=spec.mixes_forward, UPDATE=update,
            BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps,
        )


def row_state(spec: LossSpec, zs: Tensor, zt: Optional[Tensor], state: Tensor, *, v0: int,
              bias: Optional[Tensor], teacher_bias: Optional[Tensor], targets: Optional[Tensor],
              first: bool, last: bool) -> None:
    """Triton twin of ``torch_impl.row_state``."""
    _launch(spec, zs, zt, state, None, v0=v0, bias=bias, teacher_bias=teacher_bias, targets=targets, coef=None,
            update=True, first=first, last=last)


def row_grad(spec: LossSpec, zs: Tensor, zt: Optional[Tensor], state: Tensor, grad: Tensor, *, v0: int,
             bias: Optional[Tensor], teacher_bias: Optional[Tensor], targets: Optional[Tensor],
             coef: Optional[Tensor]) -> None:
    """Triton twin of ``torch_impl.row_grad``."""
    _launch(spec, zs, zt, state, grad, v0=v0, bias=bias, teacher_bias=teacher_bias, targets=targets, coef=coef,
            update=False, first=False, last=False)
