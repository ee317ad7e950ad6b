"""Forward kernel: both lm-head projections per tile, online softmax/KL state, split-V merge."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .configs import FORWARD_CONFIGS, VOCAB_SPLIT_ALIGN, all_configs, interpreting, prune_for_device
from .tiles import finish_logits, project_pair_tile, project_tile

# Planes of the (plane, split, row) state buffer: ints for the host, constexpr for the kernel.
STATE_PLANES = ("m_s", "l_s", "m_t", "l_t", "acc_r", "acc_f", "s_y", "t_y")
M_S, L_S, M_T, L_T, ACC_R, ACC_F, S_Y, T_Y = (tl.constexpr(i) for i in range(len(STATE_PLANES)))


@triton.autotune(
    configs=all_configs(FORWARD_CONFIGS),
    key=["H", "HT", "HAS_TEACHER", "SHARED_WEIGHT"],
    prune_configs_by={"early_config_prune": prune_for_device(FORWARD_CONFIGS, backward=False)},
)
@triton.jit
def kl_forward_kernel(
    h_ptr, g_ptr, w_ptr, u_ptr, b_ptr, c_ptr, y_ptr, state_ptr,
    N, V, H, HT, split_size, num_splits,
    stride_hn, stride_hk, stride_gn, stride_gk, stride_wv, stride_wk, stride_uv, stride_uk,
    inv_temperature, softcap,
    HAS_TEACHER: tl.constexpr, SHARED_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_TEACHER_BIAS: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ACC_REVERSE: tl.constexpr, ACC_FORWARD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Online state over the vocabulary slice ``[split * split_size, (split + 1) * split_size)``.

    With s = cap(W h + b)/tau and t = cap(U g + c)/tau, per row and running max m:
        l_s = sum_v e^(s_v - m_s)                 l_t = sum_v e^(t_v - m_t)
        A   = sum_v e^(s_v - m_s) (s_v - t_v)     B   = sum_v e^(t_v - m_t) (t_v - s_v)
        s_y = s[y], t_y = t[y] (when targets are given)
    each rescaled by e^(m_old - m_new) when the max grows. No logits tile leaves the program.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < N
    if HAS_TARGETS:
        y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
        s_y = tl.zeros((BLOCK_M,), dtype=tl.float32)
        t_y = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_s = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_t = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_M,), dtype=tl.float32)

    v_start = split.to(tl.int64) * split_size
    v_end = tl.minimum(v_start + split_size, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        if HAS_TEACHER:
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

        s = finish_logits(zs, b_ptr, cols, col_mask, inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
        if HAS_TEACHER:
            t = finish_logits(zt, c_ptr, cols, col_mask, inv_temperature, softcap, HAS_TEACHER_BIAS, HAS_SOFTCAP)
            diff = s - t  # finite on padded columns too; their weights e_s, e_t below are 0
            t = tl.where(col_mask[None, :], t, float("-inf"))
        s = tl.where(col_mask[None, :], s, float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
        alpha_s = tl.exp(m_s - m_s_new)
        e_s = tl.exp(s - m_s_new[:, None])
        l_s = l_s * alpha_s + tl.sum(e_s, axis=1)
        m_s = m_s_new
        if HAS_TARGETS:
            is_y = cols[None, :] == y[:, None]
            s_y += tl.sum(tl.where(is_y, s, 0.0), axis=1)
        if HAS_TEACHER:
            m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
            alpha_t = tl.exp(m_t - m_t_new)
            e_t = tl.exp(t - m_t_new[:, None])
            l_t = l_t * alpha_t + tl.sum(e_t, axis=1)
            m_t = m_t_new
            if ACC_REVERSE:
                acc_r = acc_r * alpha_s + tl.sum(e_s * diff, axis=1)
            if ACC_FORWARD:
                acc_f = acc_f * alpha_t - tl.sum(e_t * diff, axis=1)
            if HAS_TARGETS:
                t_y += tl.sum(tl.where(is_y, t, 0.0), axis=1)

    plane = num_splits.to(tl.int64) * N
    out = state_ptr + split.to(tl.int64) * N + rows
    tl.store(out + M_S * plane, m_s, mask=row_mask)
    tl.store(out + L_S * plane, l_s, mask=row_mask)
    if HAS_TARGETS:
        tl.store(out + S_Y * plane, s_y, mask=row_mask)
    if HAS_TEACHER:
        tl.store(out + M_T * plane, m_t, mask=row_mask)
        tl.store(out + L_T * plane, l_t, mask=row_mask)
        if ACC_REVERSE:
            tl.store(out + ACC_R * plane, acc_r, mask=row_mask)
        if ACC_FORWARD:
            tl.store(out + ACC_F * plane, acc_f, mask=row_mask)
        if HAS_TARGETS:
            tl.store(out + T_Y * plane, t_y, mask=row_mask)


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


def _merge(m: Tensor, l: Tensor, *accs: Tensor) -> tuple[Tensor, ...]:
    """Exact merge of per-split states: m = max m_k, l = sum l_k e^(m_k - m), likewise each acc."""
    m_all = m.amax(0)
    scale = torch.exp(m - m_all)
    return (m_all, (l * scale).sum(0), *((a * scale).sum(0) for a in accs))


def _launch(h, g, weight, teacher_weight, bias, teacher_bias, targets, *, temperature, softcap,
            acc_reverse, acc_forward, vocab_splits) -> dict[str, Tensor]:
    n, vocab = h.shape[0], weight.shape[0]
    has_teacher = g is not None
    targets = None if targets is None else targets.contiguous()
    splits, split_size = plan_vocab_splits(n, vocab, h.device, vocab_splits)
    state = torch.zeros((len(STATE_PLANES), splits, n), dtype=torch.float32, device=h.device)
    shared = has_teacher and teacher_weight is weight
    g_, u_ = (g, teacher_weight) if has_teacher else (h, weight)
    dummy = state  # never read: its flag is off
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits)  # noqa: E731
    kl_forward_kernel[grid](
        h, g_, weight, u_,
        dummy if bias is None else bias, dummy if teacher_bias is None else teacher_bias,
        dummy if targets is None else targets, state,
        n, vocab, h.shape[1], g_.shape[1], split_size, splits,
        h.stride(0), h.stride(1), g_.stride(0), g_.stride(1),
        weight.stride(0), weight.stride(1), u_.stride(0), u_.stride(1),
        1.0 / temperature, 1.0 if softcap is None else softcap,
        HAS_TEACHER=has_teacher, SHARED_WEIGHT=shared, HAS_BIAS=bias is not None,
        HAS_TEACHER_BIAS=teacher_bias is not None, HAS_TARGETS=targets is not None,
        HAS_SOFTCAP=softcap is not None, ACC_REVERSE=acc_reverse, ACC_FORWARD=acc_forward,
        DOT_PRECISION=dot_precision(h.dtype),
    )
    return dict(zip(STATE_PLANES, state.unbind(0)))


def kl_forward(
    h: Tensor, g: Tensor, weight: Tensor, teacher_weight: Tensor,
    bias: Optional[Tensor], teacher_bias: Optional[Tensor], targets: Optional[Tensor],
    *, temperature: float, softcap: Optional[float], reverse_weight: float, sampled: bool,
    vocab_splits: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Triton twin of ``torch_impl.kl_forward``: ``(values, lse_student, lse_teacher, kl_reverse)``."""
    acc_reverse = not sampled
    acc_forward = not sampled and reverse_weight != 1.0
    state = _launch(h, g, weight, teacher_weight, bias, teacher_bias, targets if sampled else None,
                    temperature=temperature, softcap=softcap, acc_reverse=acc_reverse,
                    acc_forward=acc_forward, vocab_splits=vocab_splits)
    m_s, l_s, acc_r = _merge(state["m_s"], state["l_s"], state["acc_r"])
    m_t, l_t, acc_f = _merge(state["m_t"], state["l_t"], state["acc_f"])
    lse_s = m_s + torch.log(l_s)
    lse_t = m_t + torch.log(l_t)
    if sampled:
        # each target column lies in exactly one split; the others contributed 0
        s_y, t_y = state["s_y"].sum(0), state["t_y"].sum(0)
        return (s_y - lse_s) - (t_y - lse_t), lse_s, lse_t, None
    # sum_v p_v (s_v - t_v) = A / l_s; KL(p||q) = E_p[s - t] - lse_s + lse_t
    kl_r = acc_r / l_s - lse_s + lse_t
    values = kl_r if reverse_weight == 1.0 else reverse_weight * kl_r
    if acc_forward:
        kl_f = acc_f / l_t - lse_t + lse_s
        values = values + (1.0 - reverse_weight) * kl_f
    return values, lse_s, lse_t, kl_r


def logprob_forward(
    h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    *, temperature: float, softcap: Optional[float], vocab_splits: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Triton twin of ``torch_impl.logprob_forward``: ``(log p_y, lse)``."""
    state = _launch(h, None, weight, None, bias, None, targets, temperature=temperature,
                    softcap=softcap, acc_reverse=False, acc_forward=False, vocab_splits=vocab_splits)
    m_s, l_s = _merge(state["m_s"], state["l_s"])
    lse = m_s + torch.log(l_s)
    return state["s_y"].sum(0) - lse, lse
