"""Triton kernels: the row kernel of the gradient paths and the fused no-gradient forward.

Same functions as ``opsdl_kernels.torch_impl`` (``logit_rows``, ``forward_state``), so the paths
and the autograd layer can call either.
"""
from .forward import forward_state
from .rows import logit_rows

__all__ = ["forward_state", "logit_rows"]
