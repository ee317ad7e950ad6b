"""Triton kernels: fused lm-head projection + online softmax/KL state, forward and backward.

Same function signatures as ``opsdl_kernels.torch_impl`` (plus ``vocab_splits`` in the forward and
``filter_eps`` in the backward), so the autograd layer can call either.
"""
from .backward import kl_backward, reinforce_backward
from .forward import kl_forward, logprob_forward

__all__ = ["kl_forward", "kl_backward", "logprob_forward", "reinforce_backward"]
