"""Varlen packing: many sequences in one row, attention kept inside each sequence.

``pack`` concatenates token sequences with ``cu_seqlens`` boundaries and positions that restart at
0 for every sequence. ``varlen_attention`` is registered with transformers' ``AttentionInterface``
as ``"opsdl_varlen"``; a model switched to it (``use_varlen_attention``, for good: a gradient-
checkpointing recompute in the backward must find the same attention as the forward) attends
within segments only. Per layer (softcap: an attention-logit softcap, Gemma-2; window: a sliding
window, Gemma-2, Mistral, some Qwen2):

=================================  ==============================================================
where                              path
=================================  ==============================================================
CUDA, 16-bit, flash-attn           ``flash_attn_varlen_func`` for every layer (softcap, window)
CUDA, 16-bit, no flash-attn,       PyTorch's ``varlen_attn`` where the running torch has it
no softcap                         (window included)
CUDA otherwise (float32, softcap,  softcap/window layers: compiled ``flex_attention`` (softcap
no ``varlen_attn``)                ``score_mod``, block mask: same document, causal, window);
                                   plain layers: SDPA per segment
CUDA without Triton or dynamo      softcap/window layers: the exact chunked path, warned once
CPU                                plain layers: SDPA per segment; softcap/window layers: the
                                   exact chunked path
=================================  ==============================================================

Neither softcap nor window path ever holds a (heads, L, L) matrix: compiled flex_attention is a
fused kernel (its block mask is built a few block-rows at a time and cached per boundaries, window
and device, so a forward's layers and its recompute share it); the chunked path
(``_ChunkedAttention``) computes exact softmax attention a chunk of query rows at a time,
keeping only the output and the log-sum-exp for its backward, which recomputes each chunk (as
flash attention does), with about ``SCORES_BUDGET_BYTES`` of float32 score buffers per chunk. It
serves the CPU because torch 2.13's flex_attention has no backward there (and there its C++ kernel
failed to compile any second variant in one process). ``_segment_attention``'s (heads, L, L) softcap/window
branch is the tests' reference only.
transformers alone does not isolate packed sequences on the CPU (sdpa, eager and flex all let the
second sequence see the first when given only restarted position ids). Padded batches (``generate``)
run under ``own_attention``, the model's original implementation, for the length of the call.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface

ATTENTION_NAME = "opsdl_varlen"


@dataclass
class Packed:
    input_ids: Tensor  # (1, T)
    position_ids: Tensor  # (1, T), restarting at 0 per sequence
    cu_seqlens: Tensor  # (S + 1,) int32 segment boundaries
    max_length: int

    def attention_kwargs(self) -> dict:
        """The forward kwargs transformers hands on to the attention function."""
        return {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_length, "max_length_k": self.max_length}


def pack(sequences: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> Packed:
    if not sequences:
        raise ValueError("sequences: expected at least one sequence to pack, got none")
    lengths = [len(s) for s in sequences]
    if min(lengths) < 1:
        raise ValueError(f"sequences: every sequence needs at least one token, got lengths {lengths}")
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(torch.tensor(lengths, device=device), 0)
    return Packed(ids[None], positions[None], cu, max(lengths))


def _segment_attention(q: Tensor, k: Tensor, v: Tensor, scaling: float, softcap: Optional[float],
                       sliding_window: Optional[int]) -> Tensor:
    """Exact causal attention of one segment; q (Hq, L, D), k/v (Hkv, L, D) -> (L, Hq, D). With a
    softcap or a window it builds the (Hq, L, L) scores: the reference of the tests, never dispatched."""
    groups = q.shape[0] // k.shape[0]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=0)
        v = v.repeat_interleave(groups, dim=0)
    if softcap is None and sliding_window is None:
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scaling)[0]
        return out.transpose(0, 1)
    acc = torch.promote_types(q.dtype, torch.float32)  # float32 scores, float64 for float64 inputs
    scores = (q.to(acc) @ k.to(acc).transpose(1, 2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    n = q.shape[1]
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(n, device=q.device)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed &= (i - j) < sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1).to(v.dtype) @ v
    return out.transpose(0, 1)


def _flash_attn_varlen():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def _torch_varlen(q, k, v, cu, max_len, scaling, sliding_window):
    """PyTorch's own varlen attention (torch >= 2.10); its causality argument changed between
    releases, so the signature is read at run time. None when unavailable for this layer."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    kwargs = {"scale": scaling} if "scale" in params else {}
    if "window_size" in params:  # (left, right); a window of W keys is W - 1 to the left
        kwargs["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
    elif "is_causal" in params and sliding_window is None:
        kwargs["is_causal"] = True
    else:
        return None
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    elif q.shape[1] != k.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


# Attention that never holds a (heads, L, L) matrix, for layers with an attention-logit softcap or
# a sliding window where flash-attn is absent: compiled flex_attention on CUDA (forward and backward),
# an exact chunked computation elsewhere (torch 2.13's flex_attention has no backward on the CPU).

SCORES_BUDGET_BYTES = 256 * 2**20
"""About the most the chunked path holds at once in score-sized float32 buffers per chunk of rows
(tanh, probabilities and their gradient in the backward: three (heads, rows, keys) buffers, and
room for a fourth)."""

_FLEX_BLOCK = 128  # flex_attention's default sparse block size
_MASK_CACHE: "OrderedDict[tuple, object]" = OrderedDict()
_MASK_CACHE_SIZE = 8  # a forward's layers share one mask per window; a few steps' worth kept
_WARNED: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    """torch.compile'd flex_attention (the uncompiled one materialises the scores); dynamic shapes,
    since every packed step has its own length. None where this torch cannot compile it."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    if not torch._dynamo.is_dynamo_supported():
        return None
    return torch.compile(flex_attention, dynamic=True)


def _flex_runs_on(device: torch.device) -> bool:
    """Whether the compiled flex path serves this device: CUDA with Triton (torch 2.13's flex has
    no backward on the CPU, and the student pass trains through attention)."""
    return _flex_runs_on_type(device.type)


@functools.lru_cache(maxsize=None)
def _flex_runs_on_type(device_type: str) -> bool:
    if device_type != "cuda" or _compiled_flex() is None:
        return False
    from torch.utils._triton import has_triton

    return has_triton()


@functools.lru_cache(maxsize=None)
def _softcap_mod(softcap: float, device: torch.device):
    """score_mod: ``softcap * tanh(score / softcap)`` of the scaled score (one function per value and
    device, so compiled code is reused). The cap is a tensor: compiled with dynamic shapes, a Python
    float in the closure becomes a symbol that the CPU kernel cannot lower."""
    cap = torch.tensor(softcap, dtype=torch.float32, device=device)

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return score_mod


def _document_mask_mod(doc: Tensor, window: Optional[int]):
    """mask_mod: same packed sequence, causal, fewer than ``window`` tokens back (a global layer's
    window is the row's length). One code for every layer, so sliding and global layers share the
    compiled kernels; the width is a tensor, since under dynamic shapes a Python int in the closure
    becomes a symbol that the CPU kernel cannot lower."""
    width = torch.tensor(doc.numel() if window is None else window, dtype=torch.int32, device=doc.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx) & (q_idx - kv_idx < width)
    return mask_mod


def _block_mask(bounds: tuple, window: Optional[int], device: torch.device):
    """The BlockMask of a packed row (cached per boundaries, window and device: every layer of a
    forward, and its checkpointing recompute, shares it). Built a few block-rows at a time, so
    never an (L, L) boolean either."""
    key = (bounds, window, str(device))
    if key in _MASK_CACHE:
        _MASK_CACHE.move_to_end(key)
        return _MASK_CACHE[key]
    from torch.nn.attention.flex_attention import BlockMask

    total, blk = bounds[-1], _FLEX_BLOCK
    lengths = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], device=device)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device, dtype=torch.int32), lengths)
    nb = -(-total // blk)
    padded = torch.full((nb * blk,), -1, dtype=torch.int32, device=device)  # -1: past the row, no sequence
    padded[:total] = doc
    pos = torch.arange(nb * blk, device=device)
    rows = max(1, 2**26 // (blk * blk * nb))  # block-rows per slice: about 64 MiB of booleans
    partial, full = [], []
    for r0 in range(0, nb, rows):
        r1 = min(nb, r0 + rows)
        qi = pos[r0 * blk:r1 * blk, None]
        keep = (padded[r0 * blk:r1 * blk, None] == padded[None, :]) & (padded[None, :] >= 0) & (pos[None, :] <= qi)
        if window is not None:
            keep &= (qi - pos[None, :]) < window
        count = keep.view(r1 - r0, blk, nb, blk).sum(dim=(1, 3))
        full.append(count == blk * blk)
        partial.append((count > 0) & (count < blk * blk))

    def ordered(dense: Tensor) -> tuple[Tensor, Tensor]:  # (nq, nk) -> counts (1,1,nq), indices (1,1,nq,nk)
        num = dense.sum(-1, dtype=torch.int32)
        idx = torch.argsort(dense.to(torch.uint8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num[None, None].contiguous(), idx[None, None].contiguous()

    kv_num, kv_idx = ordered(torch.cat(partial))
    full_num, full_idx = ordered(torch.cat(full))
    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=blk,
                                    mask_mod=_document_mask_mod(doc, window), seq_lengths=(total, total))
    for t in (mask.kv_num_blocks, mask.full_kv_num_blocks, mask.q_num_blocks, mask.full_q_num_blocks):
        torch._dynamo.maybe_mark_dynamic(t, 2)
    for t in (mask.kv_indices, mask.full_kv_indices, mask.q_indices, mask.full_q_indices):
        torch._dynamo.maybe_mark_dynamic(t, 2)
        torch._dynamo.maybe_mark_dynamic(t, 3)
    _MASK_CACHE[key] = mask
    while len(_MASK_CACHE) > _MASK_CACHE_SIZE:
        _MASK_CACHE.popitem(last=False)
    return mask


def _flex_varlen(query: Tensor, key: Tensor, value: Tensor, bounds: tuple, scaling: float,
                 softcap: Optional[float], sliding_window: Optional[int]) -> Tensor:
    """Compiled flex_attention over the packed row; (1, H, T, D) in, (T, Hq, D) out."""
    flex = _compiled_flex()
    if flex is None:
        raise RuntimeError(f"{ATTENTION_NAME}: flex_attention cannot be compiled by torch {torch.__version__}")
    mask = _block_mask(bounds, sliding_window, query.device)
    out = flex(query, key, value, score_mod=_softcap_mod(float(softcap), query.device) if softcap else None,
               block_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out[0].transpose(0, 1)


def _chunk_rows(heads: int, length: int, window: Optional[int]) -> int:
    """Query rows per chunk so four float32 (heads, rows, keys) buffers fit SCORES_BUDGET_BYTES (the
    backward holds three at most: tanh, probabilities, their gradient; one spare for temporaries)."""
    cells = SCORES_BUDGET_BYTES // (4 * 4 * heads)  # rows * keys
    if window is None or window >= length:
        rows = cells // length
    else:  # rows see rows + window - 1 keys at most
        rows = int((-(window - 1) + math.sqrt((window - 1) ** 2 + 4 * cells)) // 2)
    return max(1, min(length, rows))


def _chunks(bounds: Sequence[int], heads: int, window: Optional[int]) -> Iterator[tuple[int, int, int]]:
    """(first row, end row, first key) of every chunk of every segment."""
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = _chunk_rows(heads, b - a, window)
        for s in range(a, b, rows):
            yield s, min(b, s + rows), a if window is None else max(a, s - window + 1)


def _chunk_probs(qc: Tensor, kc: Tensor, s: int, e: int, ks: int, scaling: float, softcap: Optional[float],
                 window: Optional[int], lse: Optional[Tensor] = None):
    """Probabilities (Hkv, G, rows, keys) of one chunk, with its tanh (softcap) and log-sum-exp;
    in place where it can, so two score-sized buffers are alive at the end (one without softcap)."""
    scores = torch.matmul(qc, kc.transpose(-1, -2).unsqueeze(1)).mul_(scaling)
    tanh = None
    if softcap is not None:
        tanh = scores.div_(softcap).tanh_()
        scores = tanh * softcap
    i = torch.arange(s, e, device=qc.device)[:, None]
    j = torch.arange(ks, e, device=qc.device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    scores.masked_fill_(~allowed, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)  # finite: every row sees itself
    return scores.sub_(lse[..., None]).exp_(), tanh, lse


class _ChunkedAttention(torch.autograd.Function):
    """Exact causal attention within segments, a chunk of query rows at a time: the forward keeps
    the output and the log-sum-exp, the backward recomputes each chunk's probabilities (as flash
    attention does). q (Hkv, G, T, D), k/v (Hkv, T, D) -> (Hkv, G, T, D); float32 inside (float64
    for float64 inputs)."""

    @staticmethod
    def forward(ctx, q, k, v, bounds, scaling, softcap, window):
        with torch.autocast(q.device.type, enabled=False):  # float32 products under --bf16 too
            return _ChunkedAttention._forward(ctx, q, k, v, bounds, scaling, softcap, window)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _ChunkedAttention._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, q, k, v, bounds, scaling, softcap, window):
        acc = torch.promote_types(q.dtype, torch.float32)
        out = torch.empty(q.shape, dtype=acc, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=acc, device=q.device)
        heads = q.shape[0] * q.shape[1]
        for s, e, ks in _chunks(bounds, heads, window):
            p, _, row_lse = _chunk_probs(q[:, :, s:e].to(acc), k[:, ks:e].to(acc), s, e, ks, scaling, softcap, window)
            out[:, :, s:e] = torch.matmul(p, v[:, None, ks:e].to(acc))
            lse[:, :, s:e] = row_lse
            del p  # before the next chunk's buffers
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (bounds, scaling, softcap, window)
        return out.to(q.dtype)

    @staticmethod
    def _backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        bounds, scaling, softcap, window = ctx.args
        acc = out.dtype
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        heads = q.shape[0] * q.shape[1]
        for s, e, ks in _chunks(bounds, heads, window):
            qc, kc, vc = q[:, :, s:e].to(acc), k[:, ks:e].to(acc), v[:, None, ks:e].to(acc)
            p, tanh, _ = _chunk_probs(qc, kc, s, e, ks, scaling, softcap, window, lse[:, :, s:e])
            go = grad_out[:, :, s:e].to(acc)
            dv[:, ks:e] += torch.matmul(p.transpose(-1, -2), go).sum(1)
            ds = torch.matmul(go, vc.transpose(-1, -2)).sub_((go * out[:, :, s:e]).sum(-1, keepdim=True)).mul_(p)
            del p
            if tanh is not None:
                ds.mul_(tanh.mul_(tanh).neg_().add_(1))  # d softcap*tanh(x/softcap) / dx = 1 - tanh^2
            ds.mul_(scaling)
            dq[:, :, s:e] = torch.matmul(ds, kc.unsqueeze(1))
            dk[:, ks:e] += torch.matmul(ds.transpose(-1, -2), qc).sum(1)
            del ds, tanh  # before the next chunk's buffers
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _chunked_varlen(query: Tensor, key: Tensor, value: Tensor, bounds: Sequence[int], scaling: float,
                    softcap: Optional[float], sliding_window: Optional[int]) -> Tensor:
    """The exact chunked path; (1, H, T, D) in, (T, Hq, D) out."""
    hkv = key.shape[1]
    q = query[0].unflatten(0, (hkv, query.shape[1] // hkv))
    out = _ChunkedAttention.apply(q, key[0], value[0], tuple(bounds), scaling, softcap, sliding_window)
    return out.flatten(0, 1).transpose(0, 1)


def varlen_attention(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
    dropout: float = 0.0, scaling: Optional[float] = None, sliding_window: Optional[int] = None,
    softcap: Optional[float] = None, **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function; query (1, Hq, T, D), key/value (1, Hkv, T, D) -> (1, T, Hq, D)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError(f"{ATTENTION_NAME}: expected cu_seq_lens_q in the forward kwargs (use opsdl.packing.pack); "
                         "run unpacked or padded batches under opsdl.packing.own_attention(model)")
    if query.shape[0] != 1:
        raise ValueError(f"{ATTENTION_NAME}: packed batches have one row, got query batch {query.shape[0]}")
    if dropout:
        raise ValueError(f"{ATTENTION_NAME}: attention dropout is not supported, got {dropout}")
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    max_len = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):  # flash kernels: 16-bit only
        flash = _flash_attn_varlen()
        if flash is not None:
            window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
            out = flash(q, k, v, cu, cu, max_len, max_len, softmax_scale=scaling, causal=True,
                        window_size=window, softcap=softcap or 0.0)
            return out[None], None
        if softcap is None:
            out = _torch_varlen(q, k, v, cu, max_len, scaling, sliding_window)
            if out is not None:
                return out[None], None
    bounds = cu.tolist()
    if softcap is not None or sliding_window is not None:  # never a (heads, L, L) matrix
        if _flex_runs_on(query.device):
            return _flex_varlen(query, key, value, tuple(bounds), scaling, softcap, sliding_window)[None], None
        if query.is_cuda:
            _warn_once("chunked-cuda", f"{ATTENTION_NAME}: no flash-attn and no compilable flex_attention here "
                       f"(torch {torch.__version__}, Triton or dynamo missing); layers with an attention softcap "
                       "or a sliding window take the exact chunked path, slower than a fused kernel "
                       "(pip install flash-attn, or a CUDA torch with Triton)")
        return _chunked_varlen(query, key, value, bounds, scaling, softcap, sliding_window)[None], None
    outs = [
        _segment_attention(query[0, :, a:b], key[0, :, a:b], value[0, :, a:b], scaling, softcap, sliding_window)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=0)[None], None


AttentionInterface.register(ATTENTION_NAME, varlen_attention)


_OWN_ATTENTION = "_opsdl_own_attention"  # an attribute of the model object, never saved with its config


def use_varlen_attention(model: torch.nn.Module) -> None:
    """Switch ``model`` to segment-isolated attention for packed rows, keeping its own
    implementation for ``own_attention``; calling it again changes nothing."""
    current = model.config._attn_implementation
    if current != ATTENTION_NAME:
        setattr(model, _OWN_ATTENTION, current)
        model.set_attn_implementation(ATTENTION_NAME)


@contextlib.contextmanager
def own_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` with its original attention implementation inside the block (padded batches,
    ``generate``), packed-row attention again after; a model never switched is left as it is."""
    own = getattr(model, _OWN_ATTENTION, None)
    if own is None or model.config._attn_implementation != ATTENTION_NAME:
        yield
        return
    model.set_attn_implementation(own)
    try:
        yield
    finally:
        model.set_attn_implementation(ATTENTION_NAME)
