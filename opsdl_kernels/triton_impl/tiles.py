"""Device helpers shared by the kernels: projection tiles, and logits from raw products."""
import triton
import triton.language as tl


@triton.jit
def project_tile(
    x_ptr, w_ptr, rows, cols, row_mask, col_mask, K,
    stride_xn, stride_xk, stride_wv, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """acc[m, v] = sum_k x[rows[m], k] * w[cols[v], k] in fp32; ``rows``/``cols`` are int64.

    The K offsets are recomputed each step from the row and column bases rather than carried as
    tiles of pointers through the loop (a carried pointer per element costs registers the fused
    forward's accumulators need)."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_xn
    w_cols = w_ptr + cols[None, :] * stride_wv
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_mask = k < K
        x = tl.load(x_rows + k[None, :] * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None] * stride_wk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def project_pair_tile(
    x_ptr, y_ptr, w_ptr, rows, cols, row_mask, col_mask, K,
    stride_xn, stride_xk, stride_yn, stride_yk, stride_wv, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Two projections through one weight, each weight tile loaded once: (x w^T, y w^T) in fp32."""
    acc_x = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    acc_y = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_xn
    y_rows = y_ptr + rows[:, None] * stride_yn
    w_cols = w_ptr + cols[None, :] * stride_wv
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_mask = k < K
        x_mask = row_mask[:, None] & k_mask[None, :]
        w = tl.load(w_cols + k[:, None] * stride_wk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        x = tl.load(x_rows + k[None, :] * stride_xk, mask=x_mask, other=0.0)
        acc_x = tl.dot(x, w, acc_x, input_precision=DOT_PRECISION)
        y = tl.load(y_rows + k[None, :] * stride_yk, mask=x_mask, other=0.0)
        acc_y = tl.dot(y, w, acc_y, input_precision=DOT_PRECISION)
    return acc_x, acc_y


@triton.jit
def cap_and_scale(z, inv_temperature, softcap):
    """s = cap * tanh(z / cap) / tau, or z / tau when ``softcap`` is None; fp32, any shape."""
    if softcap is not None:
        # tanh(u) = sign(u) (1 - e^{-2|u|}) / (1 + e^{-2|u|}): no overflow for any u
        e = tl.exp(-2.0 * tl.abs(z / softcap))
        th = (1.0 - e) / (1.0 + e)
        z = softcap * tl.where(z < 0, -th, th)
    return z * inv_temperature


@triton.jit
def exp_below(x, m):
    """e^(x - m) for x <= m, and 0 where x = -inf, m = -inf included (never (-inf) - (-inf))."""
    return tl.exp(x - tl.where(m == float("-inf"), 0.0, m))


@triton.jit
def weighted(w, x):
    """w x, and 0 where the weight w is 0: a column of probability 0 adds nothing, whatever x holds
    there (inf or NaN from -inf logits); a NaN weight stays NaN."""
    return tl.where(w == 0.0, 0.0, w * x)


@triton.jit
def online_update(
    s, t, col_mask, is_y, m_s, l_s, m_t, l_t, acc_r, acc_f, s_y, t_y,
    TEACHER: tl.constexpr, ACC_REVERSE: tl.constexpr, ACC_FORWARD: tl.constexpr, TARGETS: tl.constexpr,
):
    """Merge a (rows, columns) tile of logits s (and t, with TEACHER) into the per-row online state
    of ``opsdl_kernels.state``; columns outside ``col_mask`` and -inf logits count for nothing
    (never (-inf) - (-inf) or 0 * inf), and ``is_y`` marks each row's target column (TARGETS).
    With m the running max, per row:
        l <- l e^(m_old - m) + sum_v e^(x_v - m)                          (x = s, t)
        acc_r <- acc_r e^(m_s,old - m_s) + sum_v e^(s_v - m_s) (s_v - t_v)  (ACC_REVERSE)
        acc_f <- acc_f e^(m_t,old - m_t) + sum_v e^(t_v - m_t) (t_v - s_v)  (ACC_FORWARD)
        s_y, t_y += s[y], t[y]                                          (TARGETS)
    """
    if TARGETS:
        s_y += tl.sum(tl.where(is_y, s, 0.0), axis=1)
    if TEACHER:
        if TARGETS:
            t_y += tl.sum(tl.where(is_y, t, 0.0), axis=1)
        diff = s - t  # NaN where both are -inf, where the weights e_s, e_t below are 0
        m_t, alpha_t, e_t, l_t = _softmax_step(t, col_mask, m_t, l_t)
        if ACC_FORWARD:
            acc_f = acc_f * alpha_t - tl.sum(weighted(e_t, diff), axis=1)
    m_s, alpha_s, e_s, l_s = _softmax_step(s, col_mask, m_s, l_s)
    if TEACHER:
        if ACC_REVERSE:
            acc_r = acc_r * alpha_s + tl.sum(weighted(e_s, diff), axis=1)
    return m_s, l_s, m_t, l_t, acc_r, acc_f, s_y, t_y


@triton.jit
def _softmax_step(x, col_mask, m, l):
    """A tile of logits into a running (max, sum of exponentials) per row: the new max, the factor
    that rescales sums kept under the old one, the tile's exponentials, the new sum."""
    x = tl.where(col_mask[None, :], x, float("-inf"))
    m_new = tl.maximum(m, tl.max(x, axis=1))
    alpha = exp_below(m, m_new)
    e = exp_below(x, m_new[:, None])
    return m_new, alpha, e, l * alpha + tl.sum(e, axis=1)
