"""Naive float64 reference: materialised logits, log_softmax, autograd. The oracle of the tests."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def logits64(x: Tensor, w: Tensor, b: Optional[Tensor], temperature: float, softcap: Optional[float]) -> Tensor:
    z = x.double() @ w.double().t()
    if b is not None:
        z = z + b.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def reference_kl(
    student_hidden: Tensor, teacher_hidden: Tensor, weight: Tensor, teacher_weight: Optional[Tensor] = None, *,
    targets=None, estimator="full", mask=None, token_weights=None, temperature=1.0, softcap=None,
    bias=None, teacher_bias=None, reduction="mean", reverse_weight=1.0, upstream: Optional[Tensor] = None,
):
    """Returns (loss value, (dh, dW, db)) in float64, the gradient that of ``loss`` (or of
    ``sum(loss * upstream)`` for reduction "none") with the teacher constant; in the sampled mode the
    REINFORCE surrogate ``sg(r) log p(y)`` carries the gradient."""
    h, g = student_hidden, teacher_hidden
    h64 = h.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    u = weight if teacher_weight is None else teacher_weight
    lead = h.shape[:-1]
    s = logits64(h64.reshape(-1, h.shape[-1]), w64, b64, temperature, softcap)
    t = logits64(g.detach().reshape(-1, g.shape[-1]), u.detach(), teacher_bias, temperature, softcap)
    logp, logq = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    if estimator == "full":
        rkl = (logp.exp() * (logp - logq)).sum(-1)
        fkl = (logq.exp() * (logq - logp)).sum(-1)
        values = reverse_weight * rkl + (1 - reverse_weight) * fkl
        surrogate = values
    else:
        y = targets.reshape(-1, 1)
        lp_y = logp.gather(1, y).squeeze(1)
        values = lp_y - logq.gather(1, y).squeeze(1)
        surrogate = values.detach() * lp_y
    w = torch.ones_like(values)
    if mask is not None:
        w = w * mask.reshape(-1).double()
    if token_weights is not None:
        w = w * token_weights.reshape(-1).double()
    count = values.shape[0] if mask is None else int(mask.sum())
    # masked rows count 0 whatever they hold
    values = torch.where(w != 0, values * w, torch.zeros_like(values))
    surrogate = torch.where(w != 0, surrogate * w, torch.zeros_like(surrogate))
    if reduction == "none":
        loss, objective = values.reshape(lead), (surrogate * upstream.reshape(-1).double()).sum()
    elif reduction == "sum":
        loss, objective = values.sum(), surrogate.sum()
    else:
        loss, objective = values.sum() / max(count, 1), surrogate.sum() / max(count, 1)
    objective.backward()
    return loss.detach(), (h64.grad, w64.grad, None if b64 is None else b64.grad)


def reference_logprobs(h, weight, targets, *, bias=None, temperature=1.0, softcap=None, upstream=None):
    h64 = h.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    s = logits64(h64.reshape(-1, h.shape[-1]), w64, b64, temperature, softcap)
    logp = torch.log_softmax(s, -1).gather(1, targets.reshape(-1, 1)).squeeze(1)
    (logp * upstream.reshape(-1).double()).sum().backward()
    return logp.detach().reshape(targets.shape), (h64.grad, w64.grad, None if b64 is None else b64.grad)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (max-norm relative error), in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / scale)
