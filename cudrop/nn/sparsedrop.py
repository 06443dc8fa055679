"""SparseDropLinear: a Linear layer with SparseDrop (block dropout) on its input, whose dropped
blocks cost no GEMM work in forward or backward (``cudrop.functional.sparsedrop``)."""
from __future__ import annotations

import numpy as np

from .. import autograd as ag, backend, masks
from ..autograd.tensor import Tensor
from ..philox import check_prob, check_seed
from .layers import Linear
from .stochastic import StochasticLayer

__all__ = ["SparseDropLinear"]


class SparseDropLinear(Linear, StochasticLayer):
    """``y = (x ⊙ m) W / (1 - p) + b``, ``m`` keeping or dropping whole ``block = (Mb, Kb)``
    blocks of the input (leading axes flattened to rows), i.i.d. with keep probability
    ``1 - p``, drawn from (seed, layer_id, step).

    A ``Linear`` (parameters ``weight`` (in, out) and ``bias`` (out,), same initialisation) and a
    ``StochasticLayer``: each training forward calls ``next_step()`` once and keeps its mask in
    ``last_mask`` (a ``cudrop.masks.BlockMask``, None after an eval forward or at ``p == 0``).
    In eval mode it is the plain dense Linear, and the step does not advance.
    """

    def __init__(self, in_features, out_features, p, block=(128, 128), bias=True, seed=0,
                 layer_id=None, rng=None, dtype=np.float32):
        # Linear.__init__ runs StochasticLayer.__init__ with defaults (next in the MRO); the
        # caller's seed and layer id go over them.
        Linear.__init__(self, in_features, out_features, bias=bias, rng=rng, dtype=dtype)
        object.__setattr__(self, "seed", check_seed("seed", seed))
        if layer_id is not None:
            object.__setattr__(self, "layer_id", check_seed("layer_id", layer_id))
        self.p = check_prob(p)
        self.block = masks.check_block(block)
        self.last_mask = None

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseDropLinear expects inputs with {self.in_features} features "
                             f"in the last axis, got shape {x.shape}")
        self.last_mask = None
        if not self.is_training:
            return Linear.forward(self, x)
        step = self.next_step()
        if self.p == 0:
            return Linear.forward(self, x)
        rows = int(np.prod(x.shape[:-1], dtype=np.int64))
        xp = backend.get_array_module(x.data if isinstance(x, Tensor) else x)
        self.last_mask = masks.block_mask((rows, self.in_features), self.block, self.p,
                                          seed=self.seed, layer=self.layer_id, step=step, xp=xp)
        return ag.sparsedrop_linear(x, self.weight, self.bias, p=self.p, block=self.block,
                                    mask=self.last_mask, training=True)

    def extra_repr(self):
        return (f"{Linear.extra_repr(self)}, p={self.p}, block={self.block}, "
                f"{StochasticLayer.extra_repr(self)}")


class SparseDrop(StochasticLayer):
    """SparseDrop's mask on its own: i.i.d. Bernoulli(1 - p) per (Mb, Kb) block of x viewed as
    (M, K) (leading axes flattened), kept blocks scaled by 1/q; the identity in eval. Where the
    next op is a Linear, ``SparseDropLinear`` is the form that skips the dropped work."""

    def __init__(self, p, block=(128, 128), seed=0, layer_id=None):
        super().__init__(seed, layer_id)
        self.p, self.block = check_prob(p), masks.check_block(block)
        self.last_mask = None

    def forward(self, x):
        if not self.is_training or self.p == 0:
            return x
        data = x.data if isinstance(x, Tensor) else x
        shape = (int(np.prod(data.shape[:-1], dtype=np.int64)), data.shape[-1])
        self.last_mask = masks.block_mask(shape, self.block, self.p, seed=self.seed,
                                          layer=self.layer_id, step=self.next_step(),
                                          xp=backend.get_array_module(data))
        return ag.blockwise_dropout_masked(x, self.last_mask)

    def extra_repr(self):
        return f"p={self.p}, block={self.block}, " + super().extra_repr()
