"""Varlen packing: many sequences in one row, attention kept inside each sequence.

``pack`` concatenates token sequences with ``cu_seqlens`` boundaries and positions that restart at
0 for every sequence. ``varlen_attention`` is registered with transformers' ``AttentionInterface``
as ``"opsdl_varlen"``; a model switched to it (``use_varlen_attention``, for good: a gradient-
checkpointing recompute in the backward must find the same attention as the forward) attends
within segments only: ``flash_attn_varlen_func`` on CUDA when flash-attn is installed,
PyTorch's ``varlen_attn`` on CUDA otherwise (where the running torch has it and the layer needs
no attention-logit softcap), and an exact per-segment computation elsewhere.
transformers alone does not isolate packed sequences on the CPU (sdpa, eager and flex all let the
second sequence see the first when given only restarted position ids). Padded batches (``generate``)
run under ``own_attention``, the model's original implementation, for the length of the call.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import math
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
    """Exact causal attention of one segment; q (Hq, L, D), k/v (Hkv, L, D) -> (L, Hq, D)."""
    groups = q.shape[0] // k.shape[0]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=0)
        v = v.repeat_interleave(groups, dim=0)
    if softcap is None and sliding_window is None:
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scaling)[0]
        return out.transpose(0, 1)
    scores = (q.float() @ k.float().transpose(1, 2)) * scaling
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
