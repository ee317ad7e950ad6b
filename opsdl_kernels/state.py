"""What a loss computes per row, and the per-row state every implementation shares.

A ``LossSpec`` names the loss (``kind``) and its options. The state of a batch of rows is one fp32
tensor of shape ``(len(PLANES), N)``: the running online-softmax state over the vocabulary columns
seen so far, then the final per-row quantities once every column has been seen. Notation as in the
design note: student logits ``s = cap(W h + b) / tau``, teacher logits ``t = cap(U g + c) / tau``.

    m_s, l_s     running max of s and sum of e^(s - m_s)          (m_t, l_t likewise for t)
    acc_r        sum_v e^(s_v - m_s) (s_v - t_v)                   (reverse KL numerator)
    acc_f        sum_v e^(t_v - m_t) (t_v - s_v)                   (forward KL numerator)
    s_y, t_y     the target's logits (0 until the target's column is seen)
    lse_s, lse_t, kl_r = acc_r / l_s - lse_s + lse_t, kl_f = acc_f / l_t - lse_t + lse_s,
    logp_y = s_y - lse_s, logq_y = t_y - lse_t                     (the finals)

Partial states over disjoint column ranges merge exactly: ``m = max(m1, m2)``, every sum rescaled
by ``e^(m_k - m)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

PLANES = ("m_s", "l_s", "m_t", "l_t", "acc_r", "acc_f", "s_y", "t_y",
          "lse_s", "lse_t", "kl_r", "kl_f", "logp_y", "logq_y")
RUNNING = PLANES[:8]
P = {name: i for i, name in enumerate(PLANES)}

KINDS = ("kl", "sampled", "logprob")


@dataclass(frozen=True)
class LossSpec:
    """``kind``: "kl" (value ``rw KL(p||q) + (1 - rw) KL(q||p)``, exact), "sampled" (value
    ``log p(y) - log q(y)``, REINFORCE gradient ``sg(value) grad log p(y)``) or "logprob"
    (value ``log p(y)``, no teacher)."""

    kind: str
    temperature: float = 1.0
    softcap: Optional[float] = None
    reverse_weight: float = 1.0

    @property
    def has_teacher(self) -> bool:
        return self.kind != "logprob"

    @property
    def mixes_forward(self) -> bool:
        return self.kind == "kl" and self.reverse_weight != 1.0

    def values(self, state: Tensor) -> Tensor:
        """Per-row values from a finished state."""
        if self.kind == "logprob":
            return state[P["logp_y"]]
        if self.kind == "sampled":
            return state[P["logp_y"]] - state[P["logq_y"]]
        values = state[P["kl_r"]]
        if self.mixes_forward:
            values = self.reverse_weight * values + (1.0 - self.reverse_weight) * state[P["kl_f"]]
        return values


def new_state(n_rows: int, device: torch.device) -> Tensor:
    return torch.zeros((len(PLANES), n_rows), dtype=torch.float32, device=device)


def log_ratio(state: Tensor) -> Tensor:
    """``log p_s(y) - log p_t(y)`` per row (the single-sample KL estimate) from a finished state."""
    return state[P["logp_y"]] - state[P["logq_y"]]


def finalize(state: Tensor, teacher: bool) -> Tensor:
    """Fill the final planes of ``state`` from its running planes (in place); returns it."""
    s = {name: state[P[name]] for name in PLANES}
    torch.add(s["m_s"], torch.log(s["l_s"]), out=s["lse_s"])
    torch.sub(s["s_y"], s["lse_s"], out=s["logp_y"])
    if teacher:
        torch.add(s["m_t"], torch.log(s["l_t"]), out=s["lse_t"])
        torch.sub(s["t_y"], s["lse_t"], out=s["logq_y"])
        s["kl_r"].copy_(s["acc_r"] / s["l_s"] - s["lse_s"] + s["lse_t"])
        s["kl_f"].copy_(s["acc_f"] / s["l_t"] - s["lse_t"] + s["lse_s"])
    return state


def merge_splits(split_state: Tensor) -> Tensor:
    """Merge running states of shape ``(8, splits, N)`` over disjoint vocabulary splits into one
    ``(len(PLANES), N)`` state (running planes only)."""
    def merged(m: Tensor, *sums: Tensor) -> list[Tensor]:
        m_all = m.amax(0)
        scale = torch.exp(m - m_all)
        return [m_all, *((x * scale).sum(0) for x in sums)]

    part = dict(zip(RUNNING, split_state.unbind(0)))
    m_s, l_s, acc_r = merged(part["m_s"], part["l_s"], part["acc_r"])
    m_t, l_t, acc_f = merged(part["m_t"], part["l_t"], part["acc_f"])
    state = new_state(split_state.shape[2], split_state.device)
    # each target column lies in exactly one split; the others contributed 0
    for name, value in (("m_s", m_s), ("l_s", l_s), ("m_t", m_t), ("l_t", l_t), ("acc_r", acc_r),
                        ("acc_f", acc_f), ("s_y", part["s_y"].sum(0)), ("t_y", part["t_y"].sum(0))):
        state[P[name]] = value
    return state
