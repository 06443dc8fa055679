"""Row gather and scatter-add with gradients: how per-sample stochastic depth runs a residual
branch on the kept samples only."""
from __future__ import annotations

from ..functional import _rows as F
from .function import Function

__all__ = ["gather_rows", "scatter_add_rows"]


class _GatherRows(Function):
    def __init__(self, idx):
        self.idx = idx

    def forward(self, x):
        y, self.saved = F.gather_rows(x, self.idx)
        return y

    def backward(self, g):
        return F.gather_rows_backward(g, self.saved)[0]  # (gx, None for idx)


class _ScatterAddRows(Function):
    def __init__(self, idx, scale):
        self.idx, self.scale = idx, scale

    def forward(self, base, rows):
        y, self.saved = F.scatter_add_rows(base, rows, self.idx, self.scale)
        return y

    def backward(self, g):
        return F.scatter_add_rows_backward(g, self.saved)[:2]  # (gbase, grows, None for idx)


def gather_rows(x, idx):
    """Differentiable ``x[idx]`` along axis 0 for distinct indices ``idx`` (a raw array)."""
    return _GatherRows(idx)(x)


def scatter_add_rows(base, rows, idx, scale=1.0):
    """Differentiable ``base`` with ``scale * rows`` added at rows ``idx`` (distinct)."""
    return _ScatterAddRows(idx, scale)(base, rows)
