"""Triton kernels: the row kernel of the gradient paths and the fused no-gradient forward.

Same functions as ``opsdl_kernels.torch_impl`` (``row_state``, ``row_grad``, ``forward_state``), so the loops
and the autograd layer can call either.
"""
from .forward import forward_state
from .rows import row_grad, row_state

__all__ = ["forward_state", "row_grad", "row_state"]
