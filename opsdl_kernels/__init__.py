"""opsdl_kernels: the lm-head projection fused with per-token KL and log-prob math.

``fused_rkl_loss`` (OPSDL's reverse KL, exact or single-sample), ``fused_kl_loss`` (any mix of
reverse and forward KL) and ``fused_token_logprobs`` (the cross-entropy building block) never
materialise the N x V logits: fp32 logits a chunk of rows (or a vocabulary slab) at a time from
cuBLAS, and a Triton row kernel on CUDA (the same math in PyTorch elsewhere).
"""
from .api import fused_kl_loss, fused_rkl_loss, fused_token_logprobs

__all__ = ["fused_kl_loss", "fused_rkl_loss", "fused_token_logprobs"]
__version__ = "0.1.0"
