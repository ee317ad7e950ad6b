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
    widest: int  # the most rows any rank holds: every rank plans its chunks by it, so their collectives match


def _dtensor_rows(weight: Tensor) -> Optional[tuple[Tensor, dist.ProcessGroup, int]]:
    """(local rows, group, start) of a DTensor sharded on the vocabulary dimension; None otherwise."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return None
    mesh, placements = weight.device_mesh, weight.placements
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(f"weight: a DTensor head must be sharded on the vocabulary dimension over a 1-d mesh "
                         f"(placements (Shard(0),)), got {placements} over a {mesh.ndim}-d mesh")
    rank, world, vocab = mesh.get_local_rank(), mesh.size(), weight.shape[0]
    chunk = -(-vocab // world)  # DTensor's Shard(0) splits as torch.chunk does
    return weight.to_local(), mesh.get_group(), min(rank * chunk, vocab)


def vocab_shard(weight: Tensor, vocab_group: Optional[dist.ProcessGroup], vocab_start: Optional[int],
                ) -> tuple[Tensor, Optional[VocabShard]]:
    """The local head and its place in the vocabulary, checked over the group: every rank's slice
    must follow the previous rank's, from 0, without gaps or overlaps (one all-gather of two ints)."""
    if not isinstance(weight, Tensor):  # the caller's checks name what it is
        return weight, None
    from_dtensor = _dtensor_rows(weight)
    if from_dtensor is not None:
        if vocab_group is not None or vocab_start is not None:
            raise ValueError("vocab_group/vocab_start: a DTensor weight carries its own group and offset; pass "
                             "neither, or pass the local rows as a plain tensor")
        weight, vocab_group, vocab_start = from_dtensor
    elif vocab_group is None:
        if vocab_start is not None:
            raise ValueError(f"vocab_start: given ({vocab_start}) without vocab_group; pass the process group "
                             "over which the vocabulary is split")
        return weight, None
    if vocab_start is None or isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start: expected the global index (an int >= 0) of the first vocabulary row this "
                         f"rank holds, got {vocab_start!r}")
    world, rank = dist.get_world_size(vocab_group), dist.get_rank(vocab_group)
    mine = torch.tensor([vocab_start, weight.shape[0]], dtype=torch.int64, device=weight.device)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=vocab_group)
    slices = [tuple(int(x) for x in t) for t in everyone]
    expected = 0
    for r, (start, width) in enumerate(slices):
        if start != expected:
            raise ValueError(f"vocab_start: the ranks' slices must tile the vocabulary in rank order, got (start, "
                             f"rows) = {slices}; rank {r} starts at {start}, expected {expected} (this is rank {rank})")
        expected += width
    return weight, VocabShard(vocab_group, vocab_start, expected, max(width for _, width in slices))


def local_rows(name: str, t: Optional[Tensor], shard: Optional[VocabShard]) -> Optional[Tensor]:
    """A teacher head or a bias given as a DTensor: its local rows, which must be the weight's."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t
    if shard is None or t.device_mesh.ndim != 1 or t.placements != (Shard(0),):
        raise ValueError(f"{name}: a DTensor is accepted only beside a DTensor weight, sharded the same way on the "
                         f"vocabulary dimension (placements (Shard(0),)); got placements {t.placements}")
    return t.to_local()


def merge_over_ranks(state: Tensor, shard: VocabShard, teacher: bool) -> Tensor:
    """Merge the running planes of every rank's partial state (of the same rows) in place, then fill
    the finals: identical on every rank afterwards."""
    m_names, sums = ("m_s", "m_t"), (("l_s", "acc_r", "s_y"), ("l_t", "acc_f", "t_y"))
    peaks = state[[P[m] for m in m_names]].clone()
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=shard.group)
    parts = []
    for side, (m_name, (l_name, acc_name, y_name)) in enumerate(zip(m_names, sums)):
        scale = torch.exp(state[P[m_name]] - peaks[side])
        parts += [state[P[l_name]] * scale, state[P[acc_name]] * scale, state[P[y_name]]]
    summed = torch.stack(parts)
    dist.all_reduce(summed, group=shard.group)
    for i, name in enumerate(("l_s", "acc_r", "s_y", "l_t", "acc_f", "t_y")):
        state[P[name]] = summed[i]
    state[P["m_s"]], state[P["m_t"]] = peaks[0], peaks[1]
    return finalize(state, teacher)


def sum_over_ranks_(t: Tensor, shard: Optional[VocabShard]) -> Tensor:
    """The hidden states' gradient: each rank's slice contributes a part; in place."""
    if shard is not None:
        dist.all_reduce(t, group=shard.group)
    return t
