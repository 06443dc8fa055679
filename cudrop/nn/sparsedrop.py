"""SparseDrop layers (Lo, "Efficient Sparse Training with Structured Dropout"): i.i.d. dropout of
whole (Mb, Kb) blocks of a Linear's input, whose dropped blocks cost no GEMM work."""
from __future__ import annotations

import numpy as np

from .. import autograd as ag, backend, masks
from ..autograd.tensor import as_tensor
from ..philox import check_prob
from ..variants import sparsedrop as V
from .layers import Linear
from .stochastic import StochasticLayer

__all__ = ["SparseDrop", "SparseDropLinear"]


class _SparseDropMask:
    """The draw both layers share: one BlockMask over x viewed as (M, K) per training step."""

    def _init_mask(self, p, block, seed, layer):
        self.init_rng(seed, layer)
        self.p, self.block = check_prob(p), masks.check_block(block)
        self.last_mask = None

    def _draw(self, data):
        shape = (int(np.prod(data.shape[:-1], dtype=np.int64)), data.shape[-1])
        # this rank's row blocks of the global batch's grid (exactly the global batch's mask
        # when the block height divides the local rows)
        row_offset, _ = self.global_rows(-(-shape[0] // self.block[0]))
        self.last_mask = V.draw_mask(shape, self.p, block=self.block, seed=self.seed,
                                     layer=self.layer, step=self.next_step(device=True),
                                     xp=backend.get_array_module(data), row_offset=row_offset)
        return self.last_mask


class SparseDropLinear(_SparseDropMask, Linear, StochasticLayer):
    """``y = (x ⊙ m) W / (1 - p) + b``, ``m`` keeping or dropping whole ``block = (Mb, Kb)``
    blocks of the input (leading axes flattened to rows), i.i.d. with keep probability
    ``1 - p``, drawn from (seed, layer, step). Dropped blocks are skipped in all three GEMMs.

    Parameters ``weight`` (in, out) and ``bias`` (out,), initialised and named as ``Linear``'s.
    Each training forward takes one step and keeps its mask in ``last_mask`` (None after an eval
    forward or at p == 0); in eval mode it is the plain dense Linear.
    """

    def __init__(self, in_features, out_features, p, *, block=V.DEFAULT_BLOCK, bias=True, seed=0,
                 layer=None, rng=None, dtype=np.float32):
        Linear.__init__(self, in_features, out_features, bias=bias, rng=rng, dtype=dtype)
        self._init_mask(p, block, seed, layer)

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseDropLinear expects inputs with {self.in_features} features "
                             f"in the last axis, got shape {x.shape}")
        self.last_mask = None
        if not self.is_training or self.p == 0:
            return Linear.forward(self, x)
        mask = self._draw(as_tensor(x).data)
        return ag.sparsedrop_linear(x, self.weight, self.bias, mask=mask)

    def extra_repr(self):
        return (f"{Linear.extra_repr(self)}, p={self.p}, block={self.block}, "
                f"{StochasticLayer.extra_repr(self)}")


class SparseDrop(_SparseDropMask, StochasticLayer):
    """SparseDrop's mask on its own: i.i.d. Bernoulli(1 - p) per (Mb, Kb) block of x viewed as
    (M, K) (leading axes flattened), kept blocks scaled by 1/q; the identity in eval. Where the
    next op is a Linear, ``SparseDropLinear`` is the form that skips the dropped work."""

    def __init__(self, p, *, block=V.DEFAULT_BLOCK, seed=0, layer=None):
        StochasticLayer.__init__(self)
        self._init_mask(p, block, seed, layer)

    def forward(self, x):
        if not self.is_training or self.p == 0:
            return x
        return ag.sparsedrop(x, mask=self._draw(as_tensor(x).data))

    def extra_repr(self):
        return f"p={self.p}, block={self.block}, " + super().extra_repr()
