"""Backward kernel: recompute logits per tile, form the logit gradient, accumulate dh, dW, db."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .configs import BACKWARD_CONFIGS, VOCAB_SPLIT_ALIGN, all_configs, prune_for_device
from .forward import dot_precision
from .tiles import finish_logits, project_pair_tile, project_tile


@triton.autotune(
    configs=all_configs(BACKWARD_CONFIGS),
    key=["H", "HT", "MODE_KL", "SHARED_WEIGHT"],
    prune_configs_by={"early_config_prune": prune_for_device(BACKWARD_CONFIGS, backward=True)},
    reset_to_zero=["dh_ptr", "dw_ptr", "db_ptr"],
)
@triton.jit
def grad_kernel(
    h_ptr, g_ptr, w_ptr, u_ptr, b_ptr, c_ptr, y_ptr,
    lse_s_ptr, lse_t_ptr, kl_ptr, coeff_ptr,
    dh_ptr, dw_ptr, db_ptr,
    N, V, H, HT, v_offset,
    stride_hn, stride_hk, stride_gn, stride_gk, stride_wv, stride_wk, stride_uv, stride_uk,
    inv_temperature, temperature_over_cap, softcap, reverse_weight, filter_eps,
    MODE_KL: tl.constexpr, MIX_FORWARD: tl.constexpr, SHARED_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    FILTER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (row tile, vocabulary tile) of a vocabulary slab starting at ``v_offset``:
    G = coeff / tau * cap'(z) * D, then
        dh[rows] += G W[cols],   dW[cols] += G^T h[rows],   db[cols] += sum_rows G   (fp32 atomics)
    with D = rw * p (log p - log q - KL_r) + (1 - rw) (p - q)     (MODE_KL, teacher recomputed)
    or   D = onehot(y) - p                                         (REINFORCE / token log-prob).
    With FILTER, a tile whose every |cap'(z) D| is below ``filter_eps`` skips both products.
    """
    pid = tl.program_id(0)
    num_row_tiles = tl.cdiv(N, BLOCK_M)
    # Row tiles vary fastest: the programs in flight share one weight tile through L2.
    pid_m = pid % num_row_tiles
    pid_v = pid // num_row_tiles
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_mask = rows < N
    col_mask = cols < V

    coeff = tl.load(coeff_ptr + rows, mask=row_mask, other=0.0)
    lse_s = tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0)
    if MODE_KL:
        if SHARED_WEIGHT:
            zs, zt = project_pair_tile(h_ptr, g_ptr, w_ptr, rows, cols, row_mask, col_mask, H,
                                       stride_hn, stride_hk, stride_gn, stride_gk, stride_wv, stride_wk,
                                       BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
        else:
            zs = project_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H,
                              stride_hn, stride_hk, stride_wv, stride_wk, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
            zt = project_tile(g_ptr, u_ptr, rows, cols, row_mask, col_mask, HT,
                              stride_gn, stride_gk, stride_uv, stride_uk, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
        s = finish_logits(zs, b_ptr, cols, col_mask, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
        t = finish_logits(zt, c_ptr, cols, col_mask, inv_temperature, softcap, HAS_TEACHER_BIAS, HAS_SOFTCAP)
        lse_t = tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0)
        kl = tl.load(kl_ptr + rows, mask=row_mask, other=0.0)
        logp = s - lse_s[:, None]
        logq = t - lse_t[:, None]
        p = tl.exp(logp)
        d = reverse_weight * p * (logp - logq - kl[:, None])
        if MIX_FORWARD:
            d += (1.0 - reverse_weight) * (p - tl.exp(logq))
    else:
        zs = project_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H,
                          stride_hn, stride_hk, stride_wv, stride_wk, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
        s = finish_logits(zs, b_ptr, cols, col_mask, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
        y = tl.load(y_ptr + rows, mask=row_mask, other=-1) - v_offset  # column within this slab
        d = tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - tl.exp(s - lse_s[:, None])
    if HAS_SOFTCAP:
        th = s * temperature_over_cap  # tanh(z / cap)
        d = d * (1.0 - th * th)
    live = row_mask[:, None] & col_mask[None, :] & (coeff != 0.0)[:, None]
    d = tl.where(live, d, 0.0)

    if FILTER:
        # Count entries that are NOT negligible; NaN is never negligible, so it is never skipped.
        keep = tl.sum(tl.sum((~(tl.abs(d) < filter_eps)).to(tl.int32), axis=1), axis=0) > 0
    else:
        keep = True
    if keep:
        grad = d * (coeff * inv_temperature)[:, None]
        if COMPUTE_DB:
            tl.atomic_add(db_ptr + cols, tl.sum(grad, axis=0), mask=col_mask)
        grad_in = grad.to(h_ptr.dtype.element_ty)
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + ks
            k_mask = k < H
            if COMPUTE_DH:
                w = tl.load(w_ptr + cols[:, None] * stride_wv + k[None, :] * stride_wk,
                            mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                dh_part = tl.dot(grad_in, w, input_precision=DOT_PRECISION)
                tl.atomic_add(dh_ptr + rows[:, None] * H + k[None, :], dh_part,
                              mask=row_mask[:, None] & k_mask[None, :])
            if COMPUTE_DW:
                x = tl.load(h_ptr + rows[:, None] * stride_hn + k[None, :] * stride_hk,
                            mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                dw_part = tl.dot(tl.trans(grad_in), x, input_precision=DOT_PRECISION)
                tl.atomic_add(dw_ptr + cols[:, None] * H + k[None, :], dw_part,
                              mask=col_mask[:, None] & k_mask[None, :])


# fp32 accumulation buffer for one vocabulary slab of dW when the weight is 16-bit.
DW_SLAB_BYTES = 64 << 20


def _dw_slab_columns(vocab: int, hidden: int, weight_dtype: torch.dtype) -> int:
    """Vocabulary rows per backward launch: all of them when dW accumulates in place (fp32 weight),
    else as many as fit DW_SLAB_BYTES of fp32, in whole VOCAB_SPLIT_ALIGN blocks."""
    if weight_dtype == torch.float32:
        return vocab
    rows = DW_SLAB_BYTES // (4 * hidden) // VOCAB_SPLIT_ALIGN * VOCAB_SPLIT_ALIGN
    return min(vocab, max(VOCAB_SPLIT_ALIGN, rows))


def _launch(h, g, weight, teacher_weight, bias, teacher_bias, targets, lse_s, lse_t, kl_reverse, coeff,
            *, temperature, softcap, reverse_weight, needs, filter_eps):
    """Launch the kernel slab by slab over the vocabulary. dh and db accumulate in fp32 over all
    slabs; dW is final once its slab is done, so a 16-bit weight needs only one slab of fp32."""
    n, hidden = h.shape
    vocab = weight.shape[0]
    # per-row vectors are indexed densely; an upstream grad of a sum arrives expanded (stride 0)
    coeff = coeff.float().contiguous()
    targets = None if targets is None else targets.contiguous()
    need_dh, need_dw, need_db = needs
    dev = h.device
    dh = torch.zeros((n, hidden), dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_db else None
    slab = _dw_slab_columns(vocab, hidden, weight.dtype)
    dw_slab = None
    if need_dw and weight.dtype != torch.float32:
        dw_slab = torch.empty((slab, hidden), dtype=torch.float32, device=dev)
    mode_kl = g is not None
    shared = mode_kl and teacher_weight is weight
    g_, u_ = (g, teacher_weight) if mode_kl else (h, weight)
    dummy = coeff  # never read or written: its flag is off
    for v0 in range(0, vocab, slab):
        v1 = min(vocab, v0 + slab)
        if dw is None:
            dw_acc = dummy
        elif dw_slab is None:
            dw_acc = dw[v0:v1].zero_()
        else:
            dw_acc = dw_slab[: v1 - v0].zero_()
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(v1 - v0, meta["BLOCK_V"]),)  # noqa: E731
        grad_kernel[grid](
            h, g_, weight[v0:v1], u_[v0:v1],
            dummy if bias is None else bias[v0:v1], dummy if teacher_bias is None else teacher_bias[v0:v1],
            dummy if targets is None else targets,
            lse_s, dummy if lse_t is None else lse_t, dummy if kl_reverse is None else kl_reverse, coeff,
            dummy if dh is None else dh, dw_acc, dummy if db is None else db[v0:v1],
            n, v1 - v0, hidden, g_.shape[1], v0,
            h.stride(0), h.stride(1), g_.stride(0), g_.stride(1),
            weight.stride(0), weight.stride(1), u_.stride(0), u_.stride(1),
            1.0 / temperature, 0.0 if softcap is None else temperature / softcap,
            1.0 if softcap is None else softcap, reverse_weight, 0.0 if filter_eps is None else filter_eps,
            MODE_KL=mode_kl, MIX_FORWARD=mode_kl and reverse_weight != 1.0, SHARED_WEIGHT=shared,
            HAS_BIAS=bias is not None, HAS_TEACHER_BIAS=teacher_bias is not None,
            HAS_SOFTCAP=softcap is not None, COMPUTE_DH=need_dh, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
            FILTER=filter_eps is not None, DOT_PRECISION=dot_precision(h.dtype),
        )
        if dw_slab is not None:
            dw[v0:v1].copy_(dw_acc)
    return (
        None if dh is None else dh.to(h.dtype),
        dw,
        None if db is None else db.to(bias.dtype),
    )


def kl_backward(
    h: Tensor, g: Tensor, weight: Tensor, teacher_weight: Tensor,
    bias: Optional[Tensor], teacher_bias: Optional[Tensor],
    lse_s: Tensor, lse_t: Tensor, kl_reverse: Tensor, row_weight: Tensor,
    *, temperature: float, softcap: Optional[float], reverse_weight: float,
    needs: tuple[bool, bool, bool], filter_eps: Optional[float] = None,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Triton twin of ``torch_impl.kl_backward`` (plus optional gradient filtering)."""
    return _launch(h, g, weight, teacher_weight, bias, teacher_bias, None, lse_s, lse_t, kl_reverse,
                   row_weight, temperature=temperature, softcap=softcap, reverse_weight=reverse_weight,
                   needs=needs, filter_eps=filter_eps)


def reinforce_backward(
    h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse_s: Tensor, coeff: Tensor,
    *, temperature: float, softcap: Optional[float], needs: tuple[bool, bool, bool],
    filter_eps: Optional[float] = None,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Triton twin of ``torch_impl.reinforce_backward``; the teacher is never touched."""
    return _launch(h, None, weight, None, bias, None, targets, lse_s, None, None, coeff,
                   temperature=temperature, softcap=softcap, reverse_weight=1.0, needs=needs,
                   filter_eps=filter_eps)
