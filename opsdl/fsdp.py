"""Many GPUs (or CPU processes) under ``torchrun``, on PyTorch's own FSDP2 engine.

Each decoder layer and the root are sharded with ``fully_shard`` over a one-dimensional device
mesh. The root is a ``Policy``: the causal LM whose forward ends in the fused loss, so FSDP2
gathers the lm-head weight with the root for that forward (and keeps it through the backward, as it
does for any root) and reduce-scatters its gradient itself; no code outside reads the sharded head,
and no rank builds N x V logits. With --bf16 the weights compute in bf16 and gradients are reduced in
fp32 (``MixedPrecisionPolicy``); NCCL on GPUs, gloo on the CPU (tests).
"""
from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import PreTrainedModel

from .model import LMHead, lm_head
from .options import TrainConfig
from .objective import distillation_loss, packed_rows, sft_loss


@dataclass
class Ranks:
    rank: int
    world: int
    device: torch.device
    mesh: DeviceMesh
    owns_group: bool  # the process group was started here, and is closed at the end of the run

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_ranks(device_option: str) -> Ranks:
    """Join the process group torchrun describes: NCCL with one GPU per local rank on CUDA, gloo on
    the CPU (``--device cpu``, or no GPU)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_option.startswith("cuda") or (device_option == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device_option}: no CUDA device is visible; use --device cpu (gloo)")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank}: only {torch.cuda.device_count()} GPUs are visible; start "
                             f"torchrun with --nproc-per-node at most {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owned = not dist.is_initialized()  # a caller's own process group is used as it is, and left open
    if owned:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    world = dist.get_world_size()
    return Ranks(dist.get_rank(), world, device, init_device_mesh(device.type, (world,)), owned)


def release_process_group() -> None:
    """``destroy_process_group()`` such that it really frees the group. Device meshes hold their
    group, and DTensor (torch 2.13) keeps every mesh it met in its caches (sharding and tensor-meta
    propagation, redistribution plans and planners, mesh topologies), FSDP states in reference
    cycles: until those let go, gloo's threads outlive the destroy call, and a thread still releasing
    the last collective's tensors at interpreter exit aborts the process by chance (SIGABRT,
    "terminate called without an active exception"). The caller drops its own meshes first. A group
    already destroyed (by DeepSpeed's own call, say) leaves only the caches to clear."""
    from torch.distributed.tensor import _redistribute
    from torch.distributed.tensor._collective_utils import MeshTopoInfo
    from torch.distributed.tensor._sharding_prop import ShardingPropagator
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()
    ShardingPropagator._propagate_tensor_meta_cached.cache_clear()
    _redistribute._gen_transform_infos.cache_clear()
    _redistribute._planner_cache.clear()
    MeshTopoInfo.build_from_mesh.cache_clear()
    gc.collect()  # after: the FSDP states and the planners just dropped from the caches are in cycles
    if dist.is_initialized():
        dist.destroy_process_group()


def decoder_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The repeated blocks, by the class names transformers lists as not to be split across devices."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}): no decoder layers found to shard (its _no_split_modules "
                         f"is {sorted(names)})")
    return layers


class Policy(torch.nn.Module):
    """A causal LM whose forward ends in the loss, the unit ``fully_shard`` wraps at the root: while
    it runs, the root's parameters (embeddings, final norm, lm-head) are whole on every rank."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, prompts: list[list[int]], responses: list[list[int]], *, mode: str,
                cfg: Optional[TrainConfig] = None, targets: Optional[torch.Tensor] = None,
                teacher_rows: Optional[torch.Tensor] = None, teacher_head: Optional[LMHead] = None):
        """mode "rows": the final hidden states at the response rows (the teacher's pass);
        "distill": (sum of the per-token loss, per-row log-ratio) against ``teacher_rows`` scored
        with ``teacher_head`` (None: this model's own head, the live teacher); "sft": (sum of the
        gold tokens' negative log-probabilities, zeros)."""
        device = next(iter(self.model.parameters())).device
        rows = packed_rows(self.model, prompts, responses, device)
        if mode == "rows":
            return rows
        head = lm_head(self.model)
        if mode == "sft":
            return sft_loss(cfg, head, rows, targets, reduction="sum"), torch.zeros(len(targets))
        if mode != "distill":
            raise ValueError(f"mode: expected 'rows', 'distill' or 'sft', got {mode!r}")
        return distillation_loss(cfg, head, teacher_head or head, rows, teacher_rows, targets, reduction="sum")


def shard(model: PreTrainedModel, ranks: Ranks, bf16: bool) -> Policy:
    """Every decoder layer, then the root ``Policy``, sharded over all ranks. With ``bf16`` the
    gathered weights compute in bf16 and gradients are reduced in fp32 (on a CPU too, where it is
    slow but runs the same code as on CUDA)."""
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=ranks.mesh, mp_policy=mixed)
    policy = Policy(model)
    fully_shard(policy, mesh=ranks.mesh, mp_policy=mixed)
    with torch.no_grad():  # a first forward through the root makes it FSDP's root before any generate
        policy([[0]], [[0]], mode="rows")
    policy.reshard()
    return policy


def fsdp_modules(policy: Policy) -> list[FSDPModule]:
    return [m for m in policy.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def whole(policy: Policy) -> Iterator[None]:
    """The root's parameters (embeddings, final norm, lm-head) gathered inside the block: for a
    teacher's head read by the student's loss, or a ``generate`` that enters below the root."""
    policy.unshard()
    try:
        yield
    finally:
        policy.reshard()


@contextlib.contextmanager
def gathered_for_rollouts(policy: Policy, once: bool) -> Iterator[None]:
    """Parameters for ``generate``. once=True: every layer all-gathered once and kept whole for the
    whole rollout phase (memory: the full model per rank); False: the root whole, each layer
    gathered and freed again for every token's forward (memory: one layer at a time; the ranks then
    step ``generate`` together, ``synced_gpus``)."""
    modules = [m for m in fsdp_modules(policy) if m is not policy] if once else []
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        with whole(policy):
            yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(True, recurse=False)


def all_reduce(values: list[float], ranks: Ranks, op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    """Elementwise sums (or ``op``) over the ranks; float64 on the wire keeps token counts exact."""
    tensor = torch.tensor(values, dtype=torch.float64, device=ranks.device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()
