"""Chunked PyTorch implementation of the fused lm-head + KL math.

Same functions and semantics as the Triton kernels in ``opsdl_kernels.triton``; it runs on any
device and is the second oracle of the tests. Rows are processed in chunks, so the largest
temporary is ``chunk_rows x V`` (never ``N x V``). Logits are computed in fp32 from an fp32 copy of
the weight (``V x H``, made once per call when the weight is not already fp32). This path is always
exact: it does no gradient filtering.

Notation (see ``docs`` in the package ``__init__``): student logits ``s = cap(W h + b) / tau``,
teacher logits ``t = cap(U g + c) / tau``, ``p = softmax(s)``, ``q = softmax(t)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 24  # fp32 elements in one chunk x V temporary (64 MiB)


def default_chunk_rows(vocab_size: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(vocab_size, 1))


def _as_float(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.float()


def _logits(
    x: Tensor, weight_f32: Tensor, bias_f32: Optional[Tensor], temperature: float, softcap: Optional[float]
) -> Tensor:
    """fp32 logits ``cap(x W^T + b) / tau`` of one row chunk."""
    z = x.float() @ weight_f32.t()
    if bias_f32 is not None:
        z = z + bias_f32
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _logit_grad_scale(s: Tensor, temperature: float, softcap: Optional[float]) -> Optional[Tensor]:
    """d s / d z without the 1/tau factor: the softcap derivative ``1 - tanh^2(z/cap)``, or None."""
    if softcap is None:
        return None
    tanh = s * (temperature / softcap)
    return 1.0 - tanh * tanh


def _chunks(n: int, chunk_rows: Optional[int], vocab_size: int):
    step = chunk_rows or default_chunk_rows(vocab_size)
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def kl_forward(
    h: Tensor,
    g: Tensor,
    weight: Tensor,
    teacher_weight: Tensor,
    bias: Optional[Tensor],
    teacher_bias: Optional[Tensor],
    targets: Optional[Tensor],
    *,
    temperature: float,
    softcap: Optional[float],
    reverse_weight: float,
    sampled: bool,
    chunk_rows: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Per-row values and the O(N) state the backward needs.

    full:    value = rw * KL(p||q) + (1 - rw) * KL(q||p)
    sampled: value = log p_y - log q_y
    Returns ``(values, lse_student, lse_teacher, kl_reverse)``; ``kl_reverse`` is None when sampled.
    """
    n, vocab = h.shape[0], weight.shape[0]
    w32, u32 = weight.float(), teacher_weight.float()
    b32, c32 = _as_float(bias), _as_float(teacher_bias)
    values = h.new_empty(n, dtype=torch.float32)
    lse_s, lse_t = torch.empty_like(values), torch.empty_like(values)
    kl_reverse = None if sampled else torch.empty_like(values)
    for rows in _chunks(n, chunk_rows, vocab):
        s = _logits(h[rows], w32, b32, temperature, softcap)
        t = _logits(g[rows], u32, c32, temperature, softcap)
        lse_s[rows] = torch.logsumexp(s, dim=1)
        lse_t[rows] = torch.logsumexp(t, dim=1)
        logp = s - lse_s[rows, None]
        logq = t - lse_t[rows, None]
        if sampled:
            y = targets[rows, None]
            values[rows] = (logp.gather(1, y) - logq.gather(1, y)).squeeze(1)
            continue
        log_ratio = logp - logq
        kl_r = (logp.exp() * log_ratio).sum(1)
        kl_reverse[rows] = kl_r
        value = reverse_weight * kl_r
        if reverse_weight != 1.0:
            value = value - (1.0 - reverse_weight) * (logq.exp() * log_ratio).sum(1)
        values[rows] = value
    return values, lse_s, lse_t, kl_reverse


def _accumulate_grads(
    G: Tensor,
    x: Tensor,
    w32: Tensor,
    grads: dict[str, Optional[Tensor]],
    rows: slice,
) -> None:
    """dh[rows] = G W, dW += G^T h, db += sum_rows G for the gradients that were asked for."""
    if grads["dh"] is not None:
        grads["dh"][rows] = (G @ w32).to(grads["dh"].dtype)
    if grads["dw"] is not None:
        grads["dw"].addmm_(G.t(), x.float())
    if grads["db"] is not None:
        grads["db"] += G.sum(0)


def _new_grads(h: Tensor, weight: Tensor, needs: tuple[bool, bool, bool]) -> dict[str, Optional[Tensor]]:
    need_dh, need_dw, need_db = needs
    return {
        "dh": torch.empty_like(h) if need_dh else None,
        "dw": torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None,
        "db": torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_db else None,
    }


def _finish_grads(
    grads: dict[str, Optional[Tensor]], weight: Tensor, bias: Optional[Tensor]
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    dw = None if grads["dw"] is None else grads["dw"].to(weight.dtype)
    db = None if grads["db"] is None else grads["db"].to(bias.dtype)
    return grads["dh"], dw, db


def kl_backward(
    h: Tensor,
    g: Tensor,
    weight: Tensor,
    teacher_weight: Tensor,
    bias: Optional[Tensor],
    teacher_bias: Optional[Tensor],
    lse_s: Tensor,
    lse_t: Tensor,
    kl_reverse: Tensor,
    row_weight: Tensor,
    *,
    temperature: float,
    softcap: Optional[float],
    reverse_weight: float,
    needs: tuple[bool, bool, bool],
    chunk_rows: Optional[int] = None,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Exact gradient of ``sum_i w_i value_i`` with the teacher constant.

    dvalue/ds_v = rw * p_v (log p_v - log q_v - KL_r) + (1 - rw) (p_v - q_v), times 1/tau and the
    softcap derivative; then dh = G W, dW = G^T h, db = sum_i G.
    """
    n, vocab = h.shape[0], weight.shape[0]
    w32, u32 = weight.float(), teacher_weight.float()
    b32, c32 = _as_float(bias), _as_float(teacher_bias)
    grads = _new_grads(h, weight, needs)
    for rows in _chunks(n, chunk_rows, vocab):
        s = _logits(h[rows], w32, b32, temperature, softcap)
        t = _logits(g[rows], u32, c32, temperature, softcap)
        logp = s - lse_s[rows, None]
        logq = t - lse_t[rows, None]
        p = logp.exp()
        G = reverse_weight * p * (logp - logq - kl_reverse[rows, None])
        if reverse_weight != 1.0:
            G = G + (1.0 - reverse_weight) * (p - logq.exp())
        G = G * (row_weight[rows, None] / temperature)
        cap_scale = _logit_grad_scale(s, temperature, softcap)
        if cap_scale is not None:
            G = G * cap_scale
        _accumulate_grads(G, h[rows], w32, grads, rows)
    return _finish_grads(grads, weight, bias)


def logprob_forward(
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    *,
    temperature: float,
    softcap: Optional[float],
    chunk_rows: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """``(log p_y, lse)`` per row, ``log p_y = s_y - logsumexp(s)``."""
    n, vocab = h.shape[0], weight.shape[0]
    w32, b32 = weight.float(), _as_float(bias)
    logp = h.new_empty(n, dtype=torch.float32)
    lse = torch.empty_like(logp)
    for rows in _chunks(n, chunk_rows, vocab):
        s = _logits(h[rows], w32, b32, temperature, softcap)
        lse[rows] = torch.logsumexp(s, dim=1)
        logp[rows] = s.gather(1, targets[rows, None]).squeeze(1) - lse[rows]
    return logp, lse


def reinforce_backward(
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    lse_s: Tensor,
    coeff: Tensor,
    *,
    temperature: float,
    softcap: Optional[float],
    needs: tuple[bool, bool, bool],
    chunk_rows: Optional[int] = None,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradient of ``sum_i coeff_i log p_{y_i}``: ``G = coeff / tau * (onehot(y) - p)``.

    With ``coeff = w`` this is the token log-prob gradient; with ``coeff = w * r`` it is the
    REINFORCE gradient of the single-sample KL estimator. The teacher is not needed.
    """
    n, vocab = h.shape[0], weight.shape[0]
    w32, b32 = weight.float(), _as_float(bias)
    grads = _new_grads(h, weight, needs)
    for rows in _chunks(n, chunk_rows, vocab):
        s = _logits(h[rows], w32, b32, temperature, softcap)
        G = -(s - lse_s[rows, None]).exp()
        G.scatter_add_(1, targets[rows, None], torch.ones_like(G[:, :1]))
        G = G * (coeff[rows, None] / temperature)
        cap_scale = _logit_grad_scale(s, temperature, softcap)
        if cap_scale is not None:
            G = G * cap_scale
        _accumulate_grads(G, h[rows], w32, grads, rows)
    return _finish_grads(grads, weight, bias)
