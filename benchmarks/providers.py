"""Every provider computes forward + backward of the same per-token reverse KL (teacher constant,
gradients for the student hidden states and the lm-head weight), mean over rows."""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from opsdl_kernels import fused_rkl_loss

from .problems import Problem


def naive_reverse_kl(student: Tensor, teacher: Tensor, weight: Tensor) -> Tensor:
    """What a trainer writes without fused kernels: both logits materialised, fp32 log_softmax."""
    logp = torch.log_softmax((student @ weight.t()).float(), dim=-1)
    with torch.no_grad():
        logq = torch.log_softmax((teacher @ weight.t()).float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


@functools.lru_cache(maxsize=None)
def _compiled_naive() -> Callable:
    return torch.compile(naive_reverse_kl, dynamic=True)


@functools.lru_cache(maxsize=None)
def _liger_triton():
    from liger_kernel.transformers import LigerFusedLinearJSD

    return LigerFusedLinearJSD(jsd_beta=1.0)  # beta = 1: KL(student || teacher), checked by a test


@functools.lru_cache(maxsize=None)
def _liger_chunked(compiled: bool):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    return LigerFusedLinearJSDLoss(beta=1.0, weight_hard_loss=0.0, weight_soft_loss=1.0, compiled=compiled)


@dataclass(frozen=True)
class Provider:
    name: str
    loss: Callable[[Problem], Tensor]
    devices: tuple[str, ...]  # where it is timed
    requires: str = ""  # a module that must be importable
    estimator: str = "full"  # what its value is: the exact KL, or the single-sample estimate

    def available(self) -> bool:
        return not self.requires or importlib.util.find_spec(self.requires) is not None


LEAN_BUDGET = 256 << 20  # the lean path's target: at most 256 MiB of working memory at any V


PROVIDERS = {
    p.name: p
    for p in [
        # the default path (memory="auto": the fast path, gradient formed in the forward, at these shapes)
        Provider("opsdl_fast", lambda pb: fused_rkl_loss(pb.student, pb.teacher, pb.weight, impl="triton"), ("cuda",)),
        Provider("opsdl_fast_sampled",
                 lambda pb: fused_rkl_loss(pb.student, pb.teacher, pb.weight, targets=pb.targets,
                                           estimator="sampled", impl="triton"),
                 ("cuda",), estimator="sampled"),
        Provider("opsdl_lean",
                 lambda pb: fused_rkl_loss(pb.student, pb.teacher, pb.weight, impl="triton", memory="lean",
                                           memory_budget=LEAN_BUDGET),
                 ("cuda",)),
        # the same paths with the row math in PyTorch (the CPU implementation: compiled for large blocks on the CPU)
        Provider("opsdl_torch", lambda pb: fused_rkl_loss(pb.student, pb.teacher, pb.weight, impl="torch"),
                 ("cpu", "cuda")),
        Provider("opsdl_torch_lean",
                 lambda pb: fused_rkl_loss(pb.student, pb.teacher, pb.weight, impl="torch", memory="lean",
                                           memory_budget=LEAN_BUDGET),
                 ("cpu",)),
        Provider("naive", lambda pb: naive_reverse_kl(pb.student, pb.teacher, pb.weight), ("cpu", "cuda")),
        # torch.compile on the CPU spends minutes in its C++ compiler per shape: GPU only.
        Provider("naive_compile", lambda pb: _compiled_naive()(pb.student, pb.teacher, pb.weight), ("cuda",)),
        Provider("liger_fused_linear_jsd",
                 lambda pb: _liger_triton()(pb.student, pb.weight, pb.teacher, pb.weight.detach(), None),
                 ("cuda",), requires="liger_kernel"),
        # Liger's chunked path is plain PyTorch; on the CPU without its torch.compile here, and with it
        # below (its default; a chunk compiles in seconds with gcc)
        Provider("liger_jsd_loss_chunked",
                 lambda pb: _liger_chunked(pb.student.is_cuda)(pb.student, pb.weight, pb.teacher,
                                                               pb.weight.detach(), pb.targets),
                 ("cpu", "cuda"), requires="liger_kernel"),
        Provider("liger_jsd_loss_chunked_compiled",
                 lambda pb: _liger_chunked(True)(pb.student, pb.weight, pb.teacher, pb.weight.detach(), pb.targets),
                 ("cpu",), requires="liger_kernel"),
    ]
}
