"""Public entry points: argument checks, flattening, row weights, reduction, impl and path choice."""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional, Union

import torch
from torch import Tensor

from .autograd import Call, run
from .plan import DEFAULT_MEMORY_BUDGET, MIN_FAST_ROWS, fast_chunk_rows
from .state import LossSpec, log_ratio
from .vocab_parallel import VocabAgreement, local_rows

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ESTIMATORS = ("full", "sampled")
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "triton", "torch")
MEMORY = ("auto", "fast", "lean")
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _resolve_impl(impl: str, device: torch.device) -> str:
    """"torch" or "triton": the Triton kernels on CUDA (or under the interpreter), PyTorch elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "torch" or (impl == "auto" and device.type != "cuda"):
        return "torch"
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not (_HAS_TRITON and (device.type == "cuda" or interpreting)):
        if impl == "auto":
            return "torch"
        raise RuntimeError(
            f"impl='triton' cannot run here: tensors are on {device} and Triton needs a CUDA device "
            "(or the interpreter, TRITON_INTERPRET=1 set before opsdl_kernels is imported) and an "
            "importable `triton` package. Use impl='torch' or impl='auto'."
        )
    return "triton"


def _check_hidden(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name}: expected shape (..., hidden), got a 0-d tensor")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected dtype float32, float16 or bfloat16, got {x.dtype}")


def _check_weight(name: str, w: Tensor, hidden: int, dtype: torch.dtype, dtype_of: str) -> None:
    if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[0] == 0:
        got = f"shape {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"{name}: expected a 2-d (vocab, hidden) tensor with vocab >= 1, got {got}")
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
    ok, expected = {
        "bool": (t.dtype == torch.bool, "a boolean"),
        "int": (not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool, "an integer"),
        "float": (t.dtype.is_floating_point, "a floating-point"),
    }[kind]
    if not ok:
        raise ValueError(f"{name}: expected {expected} tensor, got dtype {t.dtype}")


def _check_scalars(temperature: float, softcap: Optional[float]) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap: expected None or a finite number > 0, got {softcap!r}")


def _check_devices(device: torch.device, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the device of the hidden states), got {t.device}")


def _rows(x: Optional[Tensor], width: Optional[int] = None) -> Optional[Tensor]:
    """A per-row tensor flattened over the leading shape (``width``: keep the last dimension)."""
    if x is None:
        return None
    return x.reshape(-1) if width is None else x.reshape(-1, width)


def _check_targets(targets: Tensor, mask: Optional[Tensor], vocab: int) -> None:
    """Token ids in [0, vocab) on the rows that count. On CPU tensors in eager mode the values are
    read and named; elsewhere the check runs on the device, asynchronously (no host sync)."""
    bad = (targets < 0) | (targets >= vocab)
    if mask is not None:
        bad = bad & mask.reshape(-1)
    expected = f"targets: expected token ids in [0, {vocab}) on the rows that count"
    if targets.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            wrong = targets[bad]
            raise ValueError(f"{expected}, got values in [{int(wrong.min())}, {int(wrong.max())}]")
        return
    torch._assert_async(~bad.any(), f"{expected}, got an id outside that range")


def _check_memory(memory: str, memory_budget: Optional[int], reduction: str) -> int:
    if memory not in MEMORY:
        raise ValueError(f"memory: expected one of {MEMORY}, got {memory!r}")
    if memory == "fast" and reduction == "none":
        raise ValueError("memory: 'fast' forms the gradient in the forward and needs each row's weight then, "
                         "so reduction 'mean' or 'sum'; got reduction='none' (use memory='auto' or 'lean')")
    if memory_budget is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0:
        raise ValueError(f"memory_budget: expected None or a number of bytes > 0, got {memory_budget!r}")
    return memory_budget


def _agree_on_targets(agreement: VocabAgreement, targets: Tensor, mask: Optional[Tensor], vocab: int) -> None:
    """Targets checked here (one head), or by all ranks at once on leaving the agreement (a head split
    over a vocabulary group, whose size is known only then)."""
    if agreement.group is None:
        _check_targets(targets, mask, vocab)
    else:
        agreement.check_targets(targets if mask is None else targets[mask.reshape(-1)])


def _row_weights(mask: Optional[Tensor], token_weights: Optional[Tensor]) -> Optional[Tensor]:
    """The weight of each row in the loss (mask and token weights multiplied), or None for all 1."""
    if mask is None:
        return token_weights
    weights = mask.to(torch.float32)
    return weights if token_weights is None else weights * token_weights


def _per_row(values: Tensor, mask: Optional[Tensor], lead: torch.Size) -> Tensor:
    """Per-row values in the leading shape, exactly 0 on rows that do not count."""
    if mask is not None:
        values = torch.where(mask, values, 0.0)
    return values.reshape(lead)


def _reduce(values: Tensor, weights: Optional[Tensor], mask: Optional[Tensor], lead: torch.Size,
            reduction: str) -> Tensor:
    """The loss from per-row values: weighted, then per row, summed, or averaged over the counted rows."""
    if weights is not None:
        values = values * weights
    if reduction == "none":
        return _per_row(values, mask, lead)
    if mask is not None:  # a masked row's value is never read (it may be anything)
        values = torch.where(mask, values, 0.0)
    total = values.sum()
    if reduction == "mean":
        total = total / _count(mask, values.shape[0])
    return total


def _count(mask: Optional[Tensor], n_rows: int) -> Union[Tensor, int]:
    """Rows that count, at least 1 (a mean over no rows is 0): a tensor with a mask (no host sync)."""
    return max(n_rows, 1) if mask is None else mask.sum().clamp_min(1)


def _fast_chunk(n_rows: int, weight: Tensor, teacher: bool, token_weights: Optional[Tensor], reduction: str,
                memory: str, budget: int, planned_vocab: int) -> int:
    """Rows per chunk of the fast path, or 0 for the lean one. "auto" goes lean where the fast path
    cannot serve: no reduction (each row's weight comes with the backward), token weights that
    require grad (their gradient needs the per-row values in the graph), fp16 (a loss scaler's
    factor also comes with the backward, after the fast path has rounded its gradients), or no room
    for a chunk of ``MIN_FAST_ROWS`` rows in ``budget``."""
    if memory == "lean" or reduction == "none" or (token_weights is not None and token_weights.requires_grad):
        return 0
    if memory == "auto" and weight.dtype == torch.float16:
        return 0
    chunk = fast_chunk_rows(n_rows, planned_vocab, teacher, budget)
    if memory == "fast" and not chunk:
        rows = min(n_rows, MIN_FAST_ROWS)
        raise ValueError(f"memory_budget: memory='fast' needs a chunk of {rows} rows of fp32 logits "
                         f"({rows * planned_vocab * 4 * (2 if teacher else 1)} bytes), got a budget of {budget} "
                         "bytes; raise it or use memory='auto' or 'lean'")
    return chunk


def _fused(
    spec: LossSpec, impl: str, h: Tensor, weight: Tensor, bias: Optional[Tensor], g: Optional[Tensor],
    teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor], targets: Optional[Tensor],
    mask: Optional[Tensor], token_weights: Optional[Tensor], lead: torch.Size, reduction: str, memory: str,
    budget: int, agreement: VocabAgreement,
) -> tuple[Tensor, Tensor]:
    """The loss (reduced, or per row in the leading shape) and the per-row state, by the path that
    fits: no gradient -> the no-gradient forward; gradient and row weights known now -> the fast path
    when a chunk fits ``budget``; otherwise the lean (recompute) path. Every row is computed; rows
    that do not count weigh 0, their hidden states replaced by zeros (no data-dependent shapes, so
    nothing here syncs with the device)."""
    n_rows = h.shape[0]
    shard = agreement.shard
    where = {} if shard is None else dict(vocab_group=shard.group.group_name, vocab_start=shard.start,
                                          vocab_total=shard.vocab, vocab_widest=shard.widest)
    weights = _row_weights(mask, token_weights)
    if mask is not None:  # rows that do not count are computed as zeros: whatever they hold stays out
        h = torch.where(mask[:, None], h, 0.0)
        g = None if g is None else torch.where(mask[:, None], g, 0.0)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    planned_vocab = weight.shape[0] if shard is None else shard.widest
    chunk = _fast_chunk(n_rows, weight, g is not None, token_weights, reduction, memory, budget, planned_vocab) if grad else 0
    if chunk:
        coef, scale = weights, 1.0 / max(n_rows, 1) if reduction == "mean" else 1.0
        if mask is not None and reduction == "mean":
            coef, scale = weights / _count(mask, n_rows), 1.0
        loss, state = run(Call(spec, impl, "fast", chunk, budget, scale, **where), h, weight, bias, g,
                          teacher_weight, teacher_bias, targets,
                          None if coef is None else coef.detach().float().contiguous())
        return loss, state
    values, state = run(Call(spec, impl, "lean" if grad else "no_grad", 0, budget, 1.0, **where), h, weight,
                        bias, g, teacher_weight, teacher_bias, targets, None)
    return _reduce(values, weights, mask, lead, reduction), state


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
    memory: str = "auto",
    memory_budget: Optional[int] = None,
    return_log_ratio: bool = False,
    vocab_group: Optional["torch.distributed.ProcessGroup"] = None,
    vocab_start: Optional[int] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
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

    How the gradient is computed (all paths use fp32 logits from cuBLAS and no atomics):

    - ``memory="fast"``: formed in the forward, rows in chunks of fp32 logits that fit
      ``memory_budget``; four matrix products per chunk; the backward only scales it. Needs
      reduction "mean" or "sum", and one backward per call.
    - ``memory="lean"``: the forward keeps O(1) numbers per row; the backward recomputes the
      logits in vocabulary slabs within ``memory_budget``; six products (five when sampled).
    - ``memory="auto"`` (default): fast when a chunk of 256 rows fits the budget and the reduction
      allows it, else lean. ``reduction="none"`` with a gradient always takes the lean path.
    - No gradient needed (``torch.no_grad()``, nothing requires grad): one fused pass on the Triton
      path, the lean forward on the PyTorch path.

    ``memory_budget``: bytes of working memory beyond inputs, outputs and gradients (default 1 GiB:
    1024 rows at V=128K on the fast path).
    ``return_log_ratio=True`` also returns the per-row ``log p_s(y) - log p_t(y)`` at ``targets``
    (leading shape, fp32, no gradient, 0 on rows that do not count), from the same pass.

    **Vocabulary-parallel heads** (tensor parallelism): with ``vocab_group`` (a process group) the
    weights (``weight``, ``teacher_weight``, the biases) are this rank's rows ``[vocab_start,
    vocab_start + rows)`` of the heads, the ranks' slices following each other in rank order (any
    sizes); or pass ``weight`` (and the teacher's) as a DTensor sharded on dim 0 (``Shard(0)``) and
    neither argument. Hidden states, targets (global ids), masks and weights are the same on every
    rank. Per row the ranks merge partial softmax states with two all-reduces of a few numbers per
    row; the loss is exact and the same on every rank, each rank's weight gradient is its slice's,
    and the hidden states' gradient is summed over the group. Every rank must make the same call.
    """
    # every rank of a vocabulary group checks its arguments, then all agree (or all raise) at once
    with VocabAgreement(weight, vocab_group) as agreement:
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
        budget = _check_memory(memory, memory_budget, reduction)
        _check_scalars(temperature, softcap)
        _check_hidden("student_hidden", student_hidden)
        _check_hidden("teacher_hidden", teacher_hidden)
        lead = student_hidden.shape[:-1]
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(f"teacher_hidden: expected leading shape {tuple(lead)} to match student_hidden "
                             f"{tuple(student_hidden.shape)}, got {tuple(teacher_hidden.shape)}")
        hidden, teacher_hidden_size = student_hidden.shape[-1], teacher_hidden.shape[-1]
        shared = teacher_weight is None or teacher_weight is weight
        weight = agreement.local(weight, vocab_group, vocab_start)
        teacher_weight = weight if shared else local_rows("teacher_weight", teacher_weight, agreement.group)
        bias = local_rows("bias", bias, agreement.group)
        teacher_bias = local_rows("teacher_bias", teacher_bias, agreement.group)
        _check_weight("weight", weight, hidden, student_hidden.dtype, "student_hidden")
        vocab = weight.shape[0]
        if not shared:
            _check_weight("teacher_weight", teacher_weight, teacher_hidden_size, teacher_hidden.dtype, "teacher_hidden")
            if teacher_weight.shape[0] != vocab:
                raise ValueError(f"teacher_weight: expected vocabulary size {vocab} (that of weight), "
                                 f"got {teacher_weight.shape[0]}")
        elif teacher_hidden_size != hidden:
            raise ValueError(f"teacher_hidden: width {teacher_hidden_size} differs from student_hidden's {hidden}, and "
                             "teacher_weight is None, so the teacher would use weight; pass the teacher's own head as "
                             f"teacher_weight (shape (vocab, {teacher_hidden_size})), or teacher hidden states of width "
                             f"{hidden}")
        _check_bias("bias", bias, vocab)
        _check_bias("teacher_bias", teacher_bias, vocab)
        if targets is None and (sampled or return_log_ratio):
            need = "estimator='sampled'" if sampled else "return_log_ratio=True"
            raise ValueError(f"targets: {need} needs the sampled token ids, got None")
        _check_row_tensor("targets", targets, lead, "int")
        _check_row_tensor("mask", mask, lead, "bool")
        _check_row_tensor("token_weights", token_weights, lead, "float")
        device = student_hidden.device
        _check_devices(device, teacher_hidden=teacher_hidden, weight=weight, teacher_weight=teacher_weight,
                       bias=bias, teacher_bias=teacher_bias, targets=targets, mask=mask, token_weights=token_weights)
        backend = _resolve_impl(impl, device)
        flat_targets = _rows(targets)
        if flat_targets is not None:
            _agree_on_targets(agreement, flat_targets, mask, vocab)
            flat_targets = flat_targets.long().contiguous()
        h = _rows(student_hidden, hidden)
        agreement.rows = h.shape[0]
    spec = LossSpec("sampled" if sampled else "kl", float(temperature), None if softcap is None else float(softcap),
                    float(reverse_weight))
    loss, state = _fused(
        spec, backend, h, weight, bias, _rows(teacher_hidden.detach(), teacher_hidden_size),
        None if shared else teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(),
        flat_targets, _rows(mask), _rows(token_weights), lead, reduction, memory, budget, agreement)
    if return_log_ratio:
        return loss, _per_row(log_ratio(state), _rows(mask), lead)
    return loss


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
    memory: str = "auto",
    memory_budget: Optional[int] = None,
    return_log_ratio: bool = False,
    vocab_group: Optional["torch.distributed.ProcessGroup"] = None,
    vocab_start: Optional[int] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Per-token reverse KL ``KL(p_student || p_teacher)`` fused with the lm-head: OPSDL's loss.

    ``fused_kl_loss`` with ``reverse_weight=1.0``; see it for every argument.
    """
    return fused_kl_loss(
        student_hidden, teacher_hidden, weight, teacher_weight, reverse_weight=1.0, targets=targets,
        estimator=estimator, mask=mask, token_weights=token_weights, temperature=temperature,
        softcap=softcap, bias=bias, teacher_bias=teacher_bias, reduction=reduction, impl=impl,
        memory=memory, memory_budget=memory_budget, return_log_ratio=return_log_ratio, vocab_group=vocab_group,
        vocab_start=vocab_start,
    )


def fused_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    reduction: str = "none",
    impl: str = "auto",
    memory: str = "auto",
    memory_budget: Optional[int] = None,
    vocab_group: Optional["torch.distributed.ProcessGroup"] = None,
    vocab_start: Optional[int] = None,
) -> Tensor:
    """``log softmax(cap(hidden @ weight.T + bias) / tau)[targets]`` per row, fp32, differentiable in
    ``hidden``, ``weight`` and ``bias``; the logits are never materialised.

    ``reduction="none"`` (default) returns shape ``hidden.shape[:-1]`` and computes a gradient by the
    lean (recompute) path; "mean" and "sum" reduce over the rows and take the fast path when it fits
    (``-fused_token_logprobs(..., reduction="mean")`` is the cross-entropy loss). ``memory`` and
    ``memory_budget``, and ``vocab_group``/``vocab_start`` for a vocabulary-parallel head, as in
    ``fused_kl_loss``."""
    with VocabAgreement(weight, vocab_group) as agreement:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        budget = _check_memory(memory, memory_budget, reduction)
        _check_scalars(temperature, softcap)
        _check_hidden("hidden", hidden)
        lead, width = hidden.shape[:-1], hidden.shape[-1]
        weight = agreement.local(weight, vocab_group, vocab_start)
        bias = local_rows("bias", bias, agreement.group)
        _check_weight("weight", weight, width, hidden.dtype, "hidden")
        _check_bias("bias", bias, weight.shape[0])
        if targets is None:
            raise ValueError("targets: expected the token ids to score, got None")
        _check_row_tensor("targets", targets, lead, "int")
        _check_devices(hidden.device, weight=weight, bias=bias, targets=targets)
        backend = _resolve_impl(impl, hidden.device)
        flat_targets = targets.reshape(-1)
        _agree_on_targets(agreement, flat_targets, None, weight.shape[0])
        h = hidden.reshape(-1, width)
        agreement.rows = h.shape[0]
    spec = LossSpec("logprob", float(temperature), None if softcap is None else float(softcap))
    loss, _ = _fused(spec, backend, h, weight, bias, None, None, None, flat_targets.long().contiguous(), None,
                     None, lead, reduction, memory, budget, agreement)
    return loss
