"""Quickstart: OPSDL's per-token reverse KL on one batch, fused vs. the naive materialised version.

Runs anywhere (Triton on CUDA, the PyTorch implementation elsewhere):
    python examples/quickstart.py
"""
import time

import torch

from opsdl_kernels import fused_rkl_loss

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
n_tokens, hidden, vocab = 2048, 576, 49152  # SmolLM2-135M's lm-head
torch.manual_seed(0)
weight = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_()
student = torch.randn(n_tokens, hidden, device=device, dtype=dtype, requires_grad=True)  # long-context view
teacher = (student.detach() + 0.3 * torch.randn_like(student)).to(dtype)  # short-context view, no grad
sampled = torch.randint(0, vocab, (n_tokens,), device=device)  # the on-policy tokens


def naive() -> torch.Tensor:
    logp = torch.log_softmax((student @ weight.T).float(), -1)
    logq = torch.log_softmax((teacher @ weight.detach().T).float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


for name, fn in [
    ("naive (N x V logits)", naive),
    ("fused, exact KL", lambda: fused_rkl_loss(student, teacher, weight)),
    ("fused, sampled (paper)", lambda: fused_rkl_loss(student, teacher, weight, targets=sampled, estimator="sampled")),
]:
    student.grad = weight.grad = None
    start = time.perf_counter()
    loss = fn()
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{name:24s} loss {loss.item():.6f}  |grad W| {weight.grad.float().norm():.4f}  "
          f"{time.perf_counter() - start:.2f}s")
