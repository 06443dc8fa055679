"""The block-sparse linear ops as autograd ops: SparseDrop linear (input pruning) and the
output-pruned linear (thin wrappers over cudrop.functional.sparsedrop and .pruned_linear)."""
from __future__ import annotations

from ..variants import blockwise as P, sparsedrop as F
from . import mode
from .function import Function
from .linalg import matmul
from .math import add
from .shape import reshape
from .tensor import as_tensor

__all__ = ["sparsedrop_linear", "pruned_linear"]


class SparseDropLinear(Function):
    def __init__(self, p, block, seed, layer, step, mask):
        self.kw = dict(p=p, block=block, seed=seed, layer=layer, step=step, mask=mask)

    def forward(self, x, w, b=None):
        y, self.saved = F.sparsedrop_linear(x, w, b, **self.kw)
        return y

    def backward(self, gy):
        gx, gw, gb = F.sparsedrop_linear_backward(gy, self.saved)
        # Called with two inputs when there is no bias: one gradient per input.
        return (gx, gw) if gb is None else (gx, gw, gb)


def sparsedrop_linear(x, w, b=None, *, p=None, block=None, seed=0, layer=0, step=0, mask=None,
                      training=None):
    """SparseDrop linear ``(x ⊙ m) @ w / (1 - p) + b`` with ``m`` keeping or dropping whole
    ``block = (Mb, Kb)`` blocks of ``x`` (leading axes flattened to rows), drawn from
    (seed, layer, step) unless ``mask`` (a BlockMask) is given; ``p`` and ``block`` default to
    the mask's (without a mask ``p`` is required, ``block`` defaults to (128, 128)). Dropped
    blocks cost no work in forward or backward.

    When not training (``training`` None follows ``cudrop.autograd.mode.is_training()``), or at
    ``p == 0`` with no explicit mask, it is the plain dense ``x @ w + b``.
    """
    p, block = F.resolve_p_block(p, block, mask)
    if training is None:
        training = mode.is_training()
    if training and (p > 0 or mask is not None):
        f = SparseDropLinear(float(p), block, seed, layer, step, mask)
        return f(x, w) if b is None else f(x, w, b)
    x, w = as_tensor(x), as_tensor(w)
    lead = x.shape[:-1]
    x2 = x if len(lead) == 1 else reshape(x, (-1, x.shape[-1]))  # one GEMM, not a batched one
    y = matmul(x2, w)
    if b is not None:
        y = add(y, b)
    return y if len(lead) == 1 else reshape(y, lead + (w.shape[-1],))


class PrunedLinear(Function):
    def __init__(self, mask, act):
        self.mask, self.act = mask, act

    def forward(self, x, w, b=None):
        y, self.saved = P.pruned_linear(x, w, b, self.mask, self.act)
        return y

    def backward(self, gy):
        gx, gw, gb = P.pruned_linear_backward(gy, self.saved)
        return (gx, gw) if gb is None else (gx, gw, gb)


def pruned_linear(x, w, b, mask, act=None):
    """``act(x @ w + b) ⊙ m / q`` with ``m`` a BlockMask over the (M, N) output (leading axes of
    x are rows) and ``act`` None or 'relu': dropped output blocks are never computed, and the
    backward GEMMs skip them too."""
    f = PrunedLinear(mask, act)
    return f(x, w) if b is None else f(x, w, b)
