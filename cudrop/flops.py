"""Counting the floating-point work of matrix products, to show that dropped work is skipped.

``with cudrop.flops.count() as c: step()`` then ``c.total``: 2 x the multiply-adds of every
matrix product the block ran -- dense GEMMs (Linear, attention, a convolution's im2col GEMMs),
and block-sparse products over their *kept* blocks only. Elementwise work is not counted: the
products are what the structured variants skip (SliceOut's smaller GEMMs, SparseDrop's and
block-wise dropout's kept blocks, depth dropout's and stochastic depth's skipped branches), so
a step's count falls with the drop probability exactly when the variant skips its work.
``c.by_op`` splits the total by product ('matmul', 'gemm', 'dsd', 'dsd_t', 'sdd'). A
block-sparse product that the GPU dispatcher runs densely (cuBLASLt on a masked copy, where no
block-sparse kernel runs it fast: ``bsmm.dispatch``) counts the dense work it does, under
'gemm'.

Counting costs one context lookup per product when no counter is active. While one is, a
block-sparse product on the GPU reads its mask's kept blocks back to the host, which waits for
the device and cannot happen inside a CUDA-graph capture: count eager steps.
"""
from __future__ import annotations

import collections
import contextvars

import numpy as np

__all__ = ["count", "add", "add_product", "active"]

_COUNTER: contextvars.ContextVar = contextvars.ContextVar("cudrop_flops", default=None)


class count:
    """A context in which every matrix product adds its FLOPs to ``total`` (and ``by_op``).
    Nests: an inner counter counts its block, and the outer one counts it too."""

    def __init__(self):
        self.total = 0
        self.by_op: collections.Counter = collections.Counter()
        self._outer = None
        self._token = None

    def __enter__(self):
        self._outer = _COUNTER.get()
        self._token = _COUNTER.set(self)
        return self

    def __exit__(self, *exc):
        _COUNTER.reset(self._token)
        if self._outer is not None:
            self._outer.total += self.total
            self._outer.by_op.update(self.by_op)
        return False


def active() -> bool:
    """True inside :class:`count`."""
    return _COUNTER.get() is not None


def add(op: str, flops: int) -> None:
    """Add ``flops`` (an int) for product ``op`` to the active counter, if any."""
    c = _COUNTER.get()
    if c is not None:
        c.total += int(flops)
        c.by_op[op] += int(flops)


def add_product(op: str, a_shape, b_shape) -> None:
    """Add a (batched) product of ``a_shape`` (..., M, K) by ``b_shape`` (..., K, N)."""
    c = _COUNTER.get()
    if c is not None:
        lead = 1
        for d in np.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2])):
            lead *= int(d)
        add(op, 2 * lead * int(a_shape[-2]) * int(a_shape[-1]) * int(b_shape[-1]))
