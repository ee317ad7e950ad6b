"""Public entry points: argument checks, flattening and row selection, reduction, impl dispatch."""
from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Optional, Union

import torch
from torch import Tensor

from . import torch_impl
from .autograd import KLDivergence, TokenLogprobs

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ESTIMATORS = ("full", "sampled")
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "triton", "torch")

# Gradient filtering threshold on |d value / d logit| per unit row weight, by gradient dtype: an
# eighth of the dtype's unit roundoff (bf16 2^-9, fp16 2^-11). fp32 gradients are computed exactly.
AUTO_FILTER_EPS = {torch.bfloat16: 2.0**-12, torch.float16: 2.0**-14, torch.float32: None}


def _triton_runnable(device: torch.device) -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    from .triton.configs import interpreting

    return device.type == "cuda" or interpreting()


def _resolve_impl(impl: str, device: torch.device) -> ModuleType:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "torch" or (impl == "auto" and device.type != "cuda"):
        return torch_impl
    if not _triton_runnable(device):
        if impl == "auto":
            return torch_impl
        raise RuntimeError(
            f"impl='triton' cannot run here: tensors are on {device} and Triton needs a CUDA device "
            "(or the interpreter, TRITON_INTERPRET=1 set before opsdl_kernels is imported) and an "
            "importable `triton` package. Use impl='torch' or impl='auto'."
        )
    return importlib.import_module(".triton", __package__)


def _resolve_filter_eps(filter_eps: Union[str, float, None], dtype: torch.dtype) -> Optional[float]:
    if filter_eps == "auto":
        return AUTO_FILTER_EPS[dtype]
    if filter_eps is None:
        return None
    if isinstance(filter_eps, str) or not (float(filter_eps) >= 0.0 and math.isfinite(float(filter_eps))):
        raise ValueError(f"filter_eps: expected 'auto', None or a finite float >= 0, got {filter_eps!r}")
    return float(filter_eps) or None


def _impl_options(impl: ModuleType, filter_eps: Union[str, float, None], dtype: torch.dtype) -> dict:
    eps = _resolve_filter_eps(filter_eps, dtype)
    return {} if impl is torch_impl else {"filter_eps": eps}


def _check_hidden(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name}: expected shape (..., hidden), got a 0-d tensor")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected dtype float32, float16 or bfloat16, got {x.dtype}")


def _check_weight(name: str, w: Tensor, hidden: int, dtype: torch.dtype, dtype_of: str) -> None:
    if not isinstance(w, Tensor) or w.dim() != 2:
        got = f"shape {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"{name}: expected a 2-d (vocab, hidden) tensor, got {got}")
    if w.shape[1] != hidden:
        raise ValueError(f"{name}: expected shape (vocab, {hidden}) to match the hidden size of {dtype_of}, "
                         f"got {tuple(w.shape)}")
    if w.dtype != dtype:
        raise ValueError(f"{name}: dtype {w.dtype} differs from {dtype_of} ({dtype}); each side's hidden "
                         "states and lm-head weight must share a dtype")


def _check_bias(name: str, b: Optional[Tensor], vocab: int) -> None:
    if b is None:
        return
    if not isinstance(b, Tensor) or b.shape != (vocab,) or b.dtype not in FLOAT_DTYPES:
        got = f"shape {tuple(b.shape)} dtype {b.dtype}" if isinstance(b, Tensor) else type(b).__name__
        raise ValueError(f"{name}: expected a float tensor of shape ({vocab},), got {got}")


def _check_row_tensor(name: str, t: Optional[Tensor], lead: torch.Size, kind: str) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or t.shape != lead:
        got = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected shape {tuple(lead)} (the leading shape of the hidden states), got {got}")
    ok = {
        "bool": t.dtype == torch.bool,
        "int": not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool,
        "float": t.dtype.is_floating_point,
    }[kind]
    if not ok:
        raise ValueError(f"{name}: expected a {kind} tensor, got dtype {t.dtype}")


def _check_scalars(temperature: float, softcap: Optional[float]) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap: expected None or a finite number > 0, got {softcap!r}")


def _check_devices(device: torch.device, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the device of the hidden states), got {t.device}")


def _check_targets(targets: Tensor, vocab: int) -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets: expected token ids in [0, {vocab}) on the rows that count, "
                         f"got values in [{int(targets.min())}, {int(targets.max())}]")


def _counted_rows(mask: Optional[Tensor], n_rows: int) -> Optional[Tensor]:
    """Indices of the rows that count, or None when every row does."""
    return None if mask is None else mask.reshape(n_rows).nonzero().squeeze(1)


def _take(x: Optional[Tensor], rows: Optional[Tensor], width: Optional[int] = None) -> Optional[Tensor]:
    if x is None:
        return None
    flat = x.reshape(-1) if width is None else x.reshape(-1, width)
    return flat if rows is None else flat.index_select(0, rows)


def _reduce(values: Tensor, rows: Optional[Tensor], lead: torch.Size, reduction: str) -> Tensor:
    if reduction == "none":
        n_rows = math.prod(lead)
        full = values if rows is None else values.new_zeros(n_rows).index_copy(0, rows, values)
        return full.reshape(lead)
    total = values.sum()
    if reduction == "mean":
        total = total / max(values.shape[0], 1)
    return total


def fused_kl_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    teacher_weight: Optional[Tensor] = None,
    *,
    reverse_weight: float = 1.0,
    targets: Optional[Tensor] = None,
    estimator: str = "full",
    mask: Optional[Tensor] = None,
    token_weights: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    reduction: str = "mean",
    impl: str = "auto",
    filter_eps: Union[str, float, None] = "auto",
) -> Tensor:
    """Per-token KL between the student's and the teacher's next-token distributions, fused with
    both lm-head projections; no N x V logits are ever materialised.

    ``reverse_weight`` mixes the directions: the per-row value is
    ``rw * KL(p_student || p_teacher) + (1 - rw) * KL(p_teacher || p_student)``; 1.0 (default) is
    the reverse KL of OPSDL, 0.0 the forward KL of classic distillation. ``estimator="sampled"`` (the
    paper's single-sample estimator, reverse KL only) returns ``log p_s(y) - log p_t(y)`` per row
    with the REINFORCE gradient ``sg(value) * grad log p_s(y)``; ``targets`` are then required
    (``estimator="full"`` does not use them but still checks them).

    The teacher side (``teacher_hidden``, ``teacher_weight``, ``teacher_bias``) is always constant,
    even when it requires grad or when ``teacher_weight`` is ``weight``. Gradients reach
    ``student_hidden``, ``weight`` and ``bias``, in their own dtypes; the returned loss is fp32.
    ``mask`` selects the rows that count (others get value 0 and no gradient, and are never
    computed); ``token_weights`` scale rows; "mean" divides by the number of counted rows.
    ``filter_eps`` (Triton path): skip gradient tiles whose every ``|d value / d logit|`` per unit
    row weight is below it; "auto" picks by gradient dtype (fp32: exact), None or 0 turns it off.
    The torch path is always exact.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(reverse_weight, (int, float)) or not 0.0 <= reverse_weight <= 1.0:
        raise ValueError(f"reverse_weight: expected a number in [0, 1], got {reverse_weight!r}")
    sampled = estimator == "sampled"
    if sampled and reverse_weight != 1.0:
        raise ValueError(f"reverse_weight: estimator='sampled' estimates the reverse KL only and needs "
                         f"reverse_weight=1.0, got {reverse_weight!r}")
    _check_scalars(temperature, softcap)
    _check_hidden("student_hidden", student_hidden)
    _check_hidden("teacher_hidden", teacher_hidden)
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"teacher_hidden: expected leading shape {tuple(lead)} to match student_hidden "
                         f"{tuple(student_hidden.shape)}, got {tuple(teacher_hidden.shape)}")
    hidden, teacher_hidden_size = student_hidden.shape[-1], teacher_hidden.shape[-1]
    _check_weight("weight", weight, hidden, student_hidden.dtype, "student_hidden")
    vocab = weight.shape[0]
    if teacher_weight is not None and teacher_weight is not weight:
        _check_weight("teacher_weight", teacher_weight, teacher_hidden_size, teacher_hidden.dtype, "teacher_hidden")
        if teacher_weight.shape[0] != vocab:
            raise ValueError(f"teacher_weight: expected vocabulary size {vocab} (that of weight), "
                             f"got {teacher_weight.shape[0]}")
    else:
        _check_weight("teacher_hidden (with teacher_weight=None the teacher uses weight)",
                      weight, teacher_hidden_size, teacher_hidden.dtype, "teacher_hidden")
    _check_bias("bias", bias, vocab)
    _check_bias("teacher_bias", teacher_bias, vocab)
    if sampled and targets is None:
        raise ValueError("targets: estimator='sampled' needs the sampled token ids, got None")
    _check_row_tensor("targets", targets, lead, "int")
    _check_row_tensor("mask", mask, lead, "bool")
    _check_row_tensor("token_weights", token_weights, lead, "float")
    device = student_hidden.device
    _check_devices(device, teacher_hidden=teacher_hidden, weight=weight, teacher_weight=teacher_weight,
                   bias=bias, teacher_bias=teacher_bias, targets=targets, mask=mask, token_weights=token_weights)
    backend = _resolve_impl(impl, device)
    impl_options = _impl_options(backend, filter_eps, student_hidden.dtype)

    rows = _counted_rows(mask, math.prod(lead))
    row_targets = _take(targets, rows)
    if row_targets is not None:
        _check_targets(row_targets, vocab)
        row_targets = row_targets.long()
    shared = teacher_weight is None or teacher_weight is weight
    values = KLDivergence.apply(
        _take(student_hidden, rows, hidden),
        weight,
        bias,
        _take(teacher_hidden.detach(), rows, teacher_hidden_size),
        weight if shared else teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        row_targets,
        backend,
        {"temperature": float(temperature), "softcap": None if softcap is None else float(softcap),
         "reverse_weight": float(reverse_weight), "sampled": sampled},
        impl_options,
    )
    if token_weights is not None:
        values = values * _take(token_weights, rows).float()
    return _reduce(values, rows, lead, reduction)


def fused_rkl_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    teacher_weight: Optional[Tensor] = None,
    *,
    targets: Optional[Tensor] = None,
    estimator: str = "full",
    mask: Optional[Tensor] = None,
    token_weights: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    reduction: str = "mean",
    impl: str = "auto",
    filter_eps: Union[str, float, None] = "auto",
) -> Tensor:
    """Per-token reverse KL ``KL(p_student || p_teacher)`` fused with the lm-head: OPSDL's loss.

    ``fused_kl_loss`` with ``reverse_weight=1.0``; see it for every argument.
    """
    return fused_kl_loss(
        student_hidden, teacher_hidden, weight, teacher_weight, reverse_weight=1.0, targets=targets,
        estimator=estimator, mask=mask, token_weights=token_weights, temperature=temperature,
        softcap=softcap, bias=bias, teacher_bias=teacher_bias, reduction=reduction, impl=impl,
        filter_eps=filter_eps,
    )


def fused_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    impl: str = "auto",
    filter_eps: Union[str, float, None] = "auto",
) -> Tensor:
    """``log softmax(cap(hidden @ weight.T + bias) / tau)[targets]`` per row, shape ``hidden.shape[:-1]``,
    fp32, differentiable in ``hidden``, ``weight`` and ``bias``; the logits are never materialised.
    ``-fused_token_logprobs(...).mean()`` is the cross-entropy loss."""
    _check_scalars(temperature, softcap)
    _check_hidden("hidden", hidden)
    lead, width = hidden.shape[:-1], hidden.shape[-1]
    _check_weight("weight", weight, width, hidden.dtype, "hidden")
    _check_bias("bias", bias, weight.shape[0])
    if targets is None:
        raise ValueError("targets: expected the token ids to score, got None")
    _check_row_tensor("targets", targets, lead, "int")
    _check_devices(hidden.device, weight=weight, bias=bias, targets=targets)
    backend = _resolve_impl(impl, hidden.device)
    flat_targets = targets.reshape(-1)
    _check_targets(flat_targets, weight.shape[0])
    logp = TokenLogprobs.apply(
        hidden.reshape(-1, width), weight, bias, flat_targets.long(), backend,
        {"temperature": float(temperature), "softcap": None if softcap is None else float(softcap)},
        _impl_options(backend, filter_eps, hidden.dtype),
    )
    return logp.reshape(lead)
