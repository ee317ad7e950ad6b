"""The lm-head split over the ranks of a process group by vocabulary rows (tensor parallelism).

Each rank holds rows ``[start, start + width)`` of the head (and of the teacher's head and the
biases) and the whole hidden states. Per row it computes the partial online-softmax state of its
slice (``state.py``); the ranks merge them exactly, as the kernels merge vocabulary splits inside
one GPU: ``m = max_r m_r`` (one all-reduce), every sum rescaled by ``e^(m_r - m)`` and summed (a
second), the target's logits summed (only the owning rank's is non-zero). Communication is a few
numbers per row, never a logit. The logit gradient of a slice then needs only the merged finals,
so the weight's gradient stays local; the hidden states' gradient is summed over the group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .state import P, finalize


@dataclass(frozen=True)
class VocabShard:
    group: dist.ProcessGroup
    start: int  # the global vocabulary index of this rank's first row
    vocab: int  # the whole vocabulary, over all ranks
    widest: int  # the most rows any rank holds: every rank plans its pieces by it, so their collectives match


def _dtensor_group(weight) -> Optional[dist.ProcessGroup]:
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor) and weight.device_mesh.ndim == 1:
        return weight.device_mesh.get_group()
    return None


class VocabAgreement:
    """The ranks of a vocabulary-parallel call agree before they compute. Inside the ``with`` block
    each rank checks its own arguments (``local`` takes the head apart); on leaving it, one
    all-gather of four numbers per rank tells every rank whether any rank refused its arguments,
    how many rows each counts and how the slices tile the vocabulary, so that all ranks raise
    together rather than some waiting in a collective for one that gave up. ``shard`` is the
    result (None without a group)."""

    def __init__(self, weight, vocab_group: Optional[dist.ProcessGroup]):
        self.group = vocab_group if vocab_group is not None else _dtensor_group(weight)
        self.start, self.width, self.rows = 0, 0, 0
        self.targets = (0, -1)  # the smallest and largest target id this rank counts (none: an empty range)
        self.shard: Optional[VocabShard] = None

    def check_targets(self, targets: Tensor) -> None:
        """Keep the range of this rank's target ids (of the rows that count): checked against the
        whole vocabulary on leaving the block, when the slices are known."""
        if targets.numel():
            self.targets = (int(targets.min()), int(targets.max()))

    def local(self, weight, vocab_group: Optional[dist.ProcessGroup], vocab_start: Optional[int]):
        """This rank's rows of the head (a DTensor's local part, or the plain tensor given)."""
        from torch.distributed.tensor import DTensor, Shard

        if isinstance(weight, DTensor):
            if vocab_group is not None or vocab_start is not None:
                raise ValueError("vocab_group/vocab_start: a DTensor weight carries its own group and offset; pass "
                                 "neither, or pass the local rows as a plain tensor")
            mesh, placements = weight.device_mesh, weight.placements
            if mesh.ndim != 1 or placements != (Shard(0),):
                raise ValueError(f"weight: a DTensor head must be sharded on the vocabulary dimension over a 1-d "
                                 f"mesh (placements (Shard(0),)), got {placements} over a {mesh.ndim}-d mesh")
            chunk = -(-weight.shape[0] // mesh.size())  # DTensor's Shard(0) splits as torch.chunk does
            self.start = min(mesh.get_local_rank() * chunk, weight.shape[0])
            weight = weight.to_local()
        elif vocab_group is None:
            if vocab_start is not None:
                raise ValueError(f"vocab_start: given ({vocab_start}) without vocab_group; pass the process group "
                                 "over which the vocabulary is split")
            return weight
        elif isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
            raise ValueError(f"vocab_start: expected the global index (an int >= 0) of the first vocabulary row "
                             f"this rank holds, got {vocab_start!r}")
        else:
            self.start = vocab_start
        self.width = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() == 2 else 0
        return weight

    def __enter__(self) -> "VocabAgreement":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if self.group is None:
            return False
        device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl"
                  else torch.device("cpu"))
        mine = torch.tensor([int(error is not None), self.start, self.width, self.rows, *self.targets],
                            dtype=torch.int64, device=device)
        everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(everyone, mine, group=self.group)
        if error is not None:
            return False  # this rank's own error goes on
        table = [[int(x) for x in t] for t in everyone]
        refused = [r for r, row in enumerate(table) if row[0]]
        if refused:
            raise ValueError(f"vocab_group: rank(s) {refused} refused their arguments (their own errors say why); "
                             "every rank of the group must make the same call")
        rows = [row[3] for row in table]
        if len(set(rows)) > 1:
            raise ValueError(f"mask/hidden states: every rank must count the same rows, got {rows} by rank")
        expected = 0
        for r, (_, start, width, *_) in enumerate(table):
            if start != expected:
                slices = [(row[1], row[2]) for row in table]
                raise ValueError(f"vocab_start: the ranks' slices must tile the vocabulary in rank order, got "
                                 f"(start, rows) = {slices}; rank {r} starts at {start}, expected {expected}")
            expected += width
        for r, (*_, low, high) in enumerate(table):
            if low <= high and (low < 0 or high >= expected):
                raise ValueError(f"targets: expected token ids in [0, {expected}) on the rows that count, got "
                                 f"values in [{low}, {high}] on rank {r}")
        self.shard = VocabShard(self.group, self.start, expected, max(row[2] for row in table))
        return False


def local_rows(name: str, t: Optional[Tensor], group: Optional[dist.ProcessGroup]) -> Optional[Tensor]:
    """A teacher head or a bias given as a DTensor: its local rows, which must be the weight's."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t
    if group is None or t.device_mesh.ndim != 1 or t.placements != (Shard(0),):
        raise ValueError(f"{name}: a DTensor is accepted only beside a DTensor weight, sharded the same way on the "
                         f"vocabulary dimension (placements (Shard(0),)); got placements {t.placements}")
    return t.to_local()


def merge_over_ranks(state: Tensor, shard: VocabShard, teacher: bool) -> Tensor:
    """Merge the running planes of every rank's partial state (of the same rows) in place, then fill
    the finals: identical on every rank afterwards. A side whose max is -inf on a rank (nothing
    finite in its slice) contributes nothing."""
    sides = [("m_s", ("l_s", "acc_r", "s_y"))] + ([("m_t", ("l_t", "acc_f", "t_y"))] if teacher else [])
    peaks = state[[P[m] for m, _ in sides]].clone()
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=shard.group)
    parts = []
    for side, (m_name, (l_name, acc_name, y_name)) in enumerate(sides):
        scale = torch.where(torch.isneginf(state[P[m_name]]), 0.0, torch.exp(state[P[m_name]] - peaks[side]))
        parts += [state[P[l_name]] * scale, state[P[acc_name]] * scale, state[P[y_name]]]
    summed = torch.stack(parts)
    dist.all_reduce(summed, group=shard.group)
    for side, (m_name, names) in enumerate(sides):
        state[P[m_name]] = peaks[side]
        for i, name in enumerate(names):
            state[P[name]] = summed[3 * side + i]
    return finalize(state, teacher)


def sum_over_ranks_(t: Tensor, shard: Optional[VocabShard]) -> Tensor:
    """The hidden states' gradient: each rank's slice contributes a part; in place."""
    if shard is not None:
        dist.all_reduce(t, group=shard.group)
    return t
