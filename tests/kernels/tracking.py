"""Watching what the kernels' host code asks of torch: every tensor created, the bytes alive at
the peak, and the matrix products issued. Works on any device, the meta device included, where the
real GPU shapes cost nothing to run."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch._library.custom_ops import OPDEFS
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PRODUCTS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_}


@dataclass
class Product:
    op: str
    m: int
    n: int
    k: int
    out_dtype: torch.dtype

    @property
    def flop(self) -> float:
        return 2.0 * self.m * self.n * self.k


@dataclass
class Tracker(TorchDispatchMode):
    """Inside ``with Tracker() as t``: ``t.shapes`` of every floating tensor an op returns,
    ``t.allocated`` storages created (shape, bytes), ``t.peak_bytes`` of storages alive at once
    (created inside the block), ``t.products``; inside the fused loss's custom ops too."""

    shapes: list = field(default_factory=list)
    allocated: list = field(default_factory=list)  # (shape, bytes) of every new storage an op returned
    products: list = field(default_factory=list)
    peak_bytes: int = 0

    def __post_init__(self):
        super().__init__()
        self._alive: dict[int, tuple[StorageWeakRef, int]] = {}

    def live_bytes(self) -> int:
        self._alive = {k: v for k, v in self._alive.items() if not v[0].expired()}
        return sum(nbytes for _, nbytes in self._alive.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "opsdl":  # the loss's custom ops: watch what their implementation asks of torch
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if func.overloadpacket in PRODUCTS:
            a, b = (args[0], args[1]) if func.overloadpacket is torch.ops.aten.mm else (args[1], args[2])
            result = tree_flatten(out)[0][0]
            self.products.append(Product(str(func), a.shape[0], b.shape[1], a.shape[1], result.dtype))
        # an output that shares an argument's storage (a view, an in-place op, out=) allocated nothing
        given = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            if t.dtype.is_floating_point:
                self.shapes.append(tuple(t.shape))
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in given and (key not in self._alive or self._alive[key][0].expired()):
                self._alive[key] = (StorageWeakRef(storage), storage.nbytes())
                self.allocated.append((tuple(t.shape), storage.nbytes()))
        self.peak_bytes = max(self.peak_bytes, self.live_bytes())
        return out

    def largest(self) -> tuple[int, ...]:
        return max(self.shapes, key=lambda s: torch.Size(s).numel())
