"""The row math in plain PyTorch: the CPU path and the second oracle of the tests.

Same functions and semantics as ``opsdl_kernels.triton_impl``: ``row_state`` and ``row_grad`` (the
row kernels' twins, called by the loops of ``schedule.py``) and ``forward_state`` (the no-gradient
forward, here the lean path's slab loop).

The math over a block of logits lives in four functions of tensors (``_student_stats``,
``_pair_stats``, ``_kl_grad_``, ``_target_grad_``); the per-row merges are O(rows). Eager, each
materialises a few temporaries of the block's size and passes over them a dozen times. On the CPU a
block of at least ``COMPILE_MIN_ELEMENTS`` logits runs the same functions compiled by
``torch.compile`` (inductor's C++ code, dynamic shapes: one compile per variant, not per shape),
which reads each row once or twice from cache (a state pass over 1024 x 49152 logits pairs: 0.23 s
against 3.0 s eager on 2 AVX-512 cores; a gradient pass: 0.06 s against 3.0 s). Smaller blocks (the
tests) stay eager; if compiling fails, everything stays eager after one warning.

A column of probability 0 (a -inf logit, e.g. a -inf bias entry) contributes 0 to every sum and
to the gradient: no ``-inf - -inf`` or ``0 * inf`` NaN. A teacher -inf where the student has mass
is a KL of +inf, as it should be.
"""
from __future__ import annotations

import functools
import sys
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from . import schedule
from .plan import lean_plan
from .state import P, LossSpec, finalize

COMPILE_MIN_ELEMENTS = 1 << 22  # logits per block (16 MiB in fp32) from which the CPU runs compiled code
_compile_failed: list = []  # the first failure of torch.compile, after which everything runs eagerly


def _logits(z: Tensor, bias: Tensor, temperature: float, softcap: Optional[float]) -> Tensor:
    """``cap(z + b) / tau`` in fp32 (a block with a (width,) bias, or one column per row)."""
    z = z + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _shifted_exp(x: Tensor) -> tuple[Tensor, Tensor]:
    """The row max ``m`` and ``e^(x - m)``; a row of -inf is shifted by 0 (its e's are 0, not NaN)."""
    m = x.amax(1, keepdim=True)
    return m.squeeze(1), torch.exp(x - torch.where(m == float("-inf"), 0.0, m))


def _student_stats(zs: Tensor, bias: Tensor, temperature: float, softcap: Optional[float]):
    """The block's max and sum of exponentials of the student's logits."""
    m, e = _shifted_exp(_logits(zs, bias, temperature, softcap))
    return m, e.sum(1)


def _pair_stats(zs: Tensor, zt: Tensor, bias: Tensor, teacher_bias: Tensor, temperature: float,
                softcap: Optional[float]):
    """The block's ``m_s, l_s, m_t, l_t, acc_r, acc_f`` (``state.py``), each relative to its max."""
    s = _logits(zs, bias, temperature, softcap)
    t = _logits(zt, teacher_bias, temperature, softcap)
    m_s, e_s = _shifted_exp(s)
    m_t, e_t = _shifted_exp(t)
    diff = s - t
    acc_r = torch.where(e_s == 0, 0.0, e_s * diff).sum(1)  # NaN stays NaN
    acc_f = torch.where(e_t == 0, 0.0, e_t * diff).sum(1).neg()
    return m_s, e_s.sum(1), m_t, e_t.sum(1), acc_r, acc_f


def _scaled(d: Tensor, s: Tensor, scale: Tensor, temperature: float, softcap: Optional[float]) -> Tensor:
    """``scale * cap'(z) * d`` per row (``scale = weight / tau``), exactly 0 on rows of weight 0."""
    if softcap is not None:
        tanh = s * (temperature / softcap)
        d = d * (1.0 - tanh * tanh)
    return torch.where(scale[:, None] != 0, d * scale[:, None], 0.0)


def _kl_grad_(out: Tensor, zs: Tensor, zt: Tensor, bias: Tensor, teacher_bias: Tensor, lse_s: Tensor,
              lse_t: Tensor, kl_r: Tensor, scale: Tensor, temperature: float, softcap: Optional[float],
              reverse_weight: float, mixes_forward: bool) -> None:
    """``out = G`` of the KL (``out`` may be ``zt`` itself, read before it is written)."""
    s = _logits(zs, bias, temperature, softcap)
    logp = s - lse_s[:, None]
    logq = _logits(zt, teacher_bias, temperature, softcap) - lse_t[:, None]
    p = torch.exp(logp)
    d = reverse_weight * torch.where(p == 0, 0.0, p * (logp - logq - kl_r[:, None]))
    if mixes_forward:
        d = d + (1.0 - reverse_weight) * (p - torch.exp(logq))
    out.copy_(_scaled(d, s, scale, temperature, softcap))


def _target_grad_(out: Tensor, zs: Tensor, bias: Tensor, lse_s: Tensor, col: Tensor, inside: Tensor,
                  scale: Tensor, temperature: float, softcap: Optional[float]) -> None:
    """``out = G`` of ``log p(y)`` (weighted): ``onehot(y) - p`` (``out`` may be ``zs`` itself)."""
    s = _logits(zs, bias, temperature, softcap)
    p = torch.exp(s - lse_s[:, None])
    hit = (torch.arange(s.shape[1], device=s.device) == col) & inside[:, None]
    out.copy_(_scaled(torch.where(hit, 1.0 - p, -p), s, scale, temperature, softcap))


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    """``fn`` compiled for every shape. The vector width is named in the options although it is the
    one inductor would pick: its on-disk cache (torch 2.13) does not key on the CPU's instruction
    set, and code made for AVX2 (8 lanes) loaded under AVX-512 (16) wrote past its buffers."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return torch.compile(fn, dynamic=True, options={"cpp.simdlen": pick_vec_isa().bit_width()})


def _run(fn: Callable, block: Tensor, *args):
    """``fn(*args)``, compiled where ``block`` (the logits) is a large CPU block."""
    if (block.device.type == "cpu" and block.numel() >= COMPILE_MIN_ELEMENTS and not _compile_failed
            and not torch.compiler.is_compiling()):
        try:
            return _compiled(fn)(*args)
        except Exception as error:  # no C++ compiler, an unsupported platform: the math itself is eager-safe
            _compile_failed.append(error)
            warnings.warn(f"opsdl_kernels: torch.compile of the CPU row math failed ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); it runs in eager PyTorch from now "
                          "on, several times slower", stacklevel=2)
    return fn(*args)


def _bias(bias: Optional[Tensor], width: int, device: torch.device) -> Tensor:
    """The block's bias in fp32 (zeros without one: one variant of each compiled function)."""
    if bias is None:
        return torch.zeros(width, dtype=torch.float32, device=device)
    return bias.detach().float()


def _target_column(targets: Optional[Tensor], v0: int, width: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The target's column within this block (clamped, shape (rows, 1)), and whether it lies in it."""
    if targets is None:
        return None, None
    col = targets - v0
    inside = (col >= 0) & (col < width)
    return col.clamp(0, width - 1).unsqueeze(1), inside


def _rescale(m: Tensor, m_new: Tensor) -> Tensor:
    """``e^(m - m_new)``, 1 where they are equal (two maxima of -inf: sums of 0 stay 0, not NaN)."""
    return torch.where(m == m_new, 1.0, torch.exp(m - m_new))


def _merge(state: Tensor, m_name: str, sums: dict[str, Tensor], m_blk: Tensor, first: bool) -> None:
    """Merge a block's max and sums (relative to it) into the running planes of ``state``."""
    if first:
        state[P[m_name]] = m_blk
        for name, value in sums.items():
            state[P[name]] = value
        return
    m_new = torch.maximum(state[P[m_name]], m_blk)
    old, new = _rescale(state[P[m_name]], m_new), _rescale(m_blk, m_new)
    for name, value in sums.items():
        state[P[name]] = state[P[name]] * old + value * new
    state[P[m_name]] = m_new


def row_state(
    spec: LossSpec, zs: Tensor, zt: Optional[Tensor], state: Tensor, *, v0: int,
    bias: Optional[Tensor], teacher_bias: Optional[Tensor], targets: Optional[Tensor], first: bool, last: bool,
) -> None:
    """Merge a block of raw fp32 logits ``zs = h W[v0:v0+w]^T`` (and ``zt`` for the teacher) into
    the running per-row state (``first``: start it; ``last``: then fill the finals)."""
    width = zs.shape[1]
    b = _bias(bias, width, zs.device)
    c = None if zt is None else _bias(teacher_bias, width, zs.device)
    if zt is None:
        m_s, l_s = _run(_student_stats, zs, zs, b, spec.temperature, spec.softcap)
        _merge(state, "m_s", {"l_s": l_s}, m_s, first)
    else:
        m_s, l_s, m_t, l_t, acc_r, acc_f = _run(_pair_stats, zs, zs, zt, b, c, spec.temperature, spec.softcap)
        _merge(state, "m_t", {"l_t": l_t, "acc_f": acc_f}, m_t, first)
        _merge(state, "m_s", {"l_s": l_s, "acc_r": acc_r}, m_s, first)
    col, inside = _target_column(targets, v0, width)
    if col is not None:
        for name, z, z_bias in (("s_y", zs, b), ("t_y", zt, c)):
            if z is not None:
                picked = _logits(z.gather(1, col).squeeze(1), z_bias[col.squeeze(1)], spec.temperature, spec.softcap)
                picked = torch.where(inside, picked, 0.0)
                state[P[name]] = picked if first else state[P[name]] + picked
    if last:
        finalize(state, spec.has_teacher)


def row_grad(
    spec: LossSpec, zs: Tensor, zt: Optional[Tensor], state: Tensor, grad: Tensor, *, v0: int,
    bias: Optional[Tensor], teacher_bias: Optional[Tensor], targets: Optional[Tensor], coef: Optional[Tensor],
) -> None:
    """Write the logit gradient of a block of raw fp32 logits into ``grad``, from the finals of
    ``state`` (every column of the rows seen). An fp32 ``grad`` is written in place (it may be one
    of the logits blocks); a 16-bit one, a view over a block's bytes, is copied from a fresh block."""
    width = zs.shape[1]
    weight = torch.ones_like(state[0]) if coef is None else coef.float()
    if spec.kind == "sampled":
        weight = weight * (state[P["logp_y"]] - state[P["logq_y"]])
    scale = weight / spec.temperature
    out = grad if grad.dtype == torch.float32 else torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    b = _bias(bias, width, zs.device)
    if spec.kind == "kl":
        _run(_kl_grad_, zs, out, zs, zt, b, _bias(teacher_bias, width, zs.device), state[P["lse_s"]],
             state[P["lse_t"]], state[P["kl_r"]], scale, spec.temperature, spec.softcap, spec.reverse_weight,
             spec.mixes_forward)
    else:
        col, inside = _target_column(targets, v0, width)
        _run(_target_grad_, zs, out, zs, b, state[P["lse_s"]], col, inside, scale, spec.temperature, spec.softcap)
    if out is not grad:
        grad.copy_(out)


def forward_state(ops: "schedule.Operands", budget: int) -> Tensor:
    """The finished per-row state without gradients: the lean path's forward."""
    plan = lean_plan(ops.h.shape[0], 0, ops.weight.shape[0], ops.g is not None, budget)
    return schedule.lean_forward(sys.modules[__name__], ops, plan)
