"""The fused reverse KL over a vocabulary-parallel lm-head: each rank holds V / K rows of the head.

    torchrun --nproc-per-node 2 examples/vocab_parallel_head.py       # on a CPU (gloo)
"""
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from opsdl_kernels import fused_rkl_loss

dist.init_process_group("gloo")  # "nccl" on GPUs, with a CUDA mesh
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
torch.manual_seed(0)  # the same hidden states and head on every rank
student = torch.randn(128, 64, requires_grad=True)  # final hidden states: whole on every rank
teacher = torch.randn(128, 64)
# what ColwiseParallel makes of model.lm_head.weight: rows (the vocabulary) split over the ranks
head = torch.nn.Parameter(distribute_tensor(torch.randn(1001, 64) * 0.05, mesh, [Shard(0)]))

loss = fused_rkl_loss(student, teacher, head)  # or: (student, teacher, my_rows, vocab_group=g, vocab_start=v0)
loss.backward()  # head.grad: this rank's rows only; student.grad: summed over the ranks
whole = fused_rkl_loss(student.detach(), teacher, head.full_tensor().detach())  # one process, for comparison
print(f"rank {dist.get_rank()}: rows {head.to_local().shape[0]} of 1001, loss {loss.item():.6f}, "
      f"whole-head loss {whole.item():.6f}, |student.grad| {student.grad.norm():.4f}", flush=True)
dist.destroy_process_group()
