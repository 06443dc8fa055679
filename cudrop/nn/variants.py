"""The dropout variants by name: what the model builders' ``dropout=`` and ``cudrop train
--dropout`` choose from.

A variant enters a model in two ways:

- ``make_dropout(kind, p)``: a standalone module (after an activation, on a residual branch);
- ``dropped_linear(kind, in, out, p)``: a Linear whose *input* units are dropped. SliceOut,
  SparseDrop and block-wise gyro dropout fuse the drop into the layer's GEMMs here, which is
  where they skip work (block-wise: input pruning, the block-sparse GEMMs of SparseDrop on the
  gyro mask); the other kinds are ``make_dropout`` followed by a plain Linear.
"""
from __future__ import annotations

import numpy as np

from ..philox import check_prob
from .dropout import Dropout, Identity
from .gyro import BlockwiseDropout, BlockwiseLinear, GyroDropout, _GyroBase
from .layers import Linear
from .module import Module
from .sliceout import SliceOut, SliceOutLinear
from .sparsedrop import SparseDrop, SparseDropLinear

#: The names ``make_dropout``, ``dropped_linear``, the model builders' ``dropout=`` and
#: ``cudrop train --dropout`` accept; 'none' (or None) means no dropout.
DROPOUT_KINDS = ("none", "dropout", "sliceout", "gyro", "blockwise", "sparsedrop")


def _check(kind, p):
    kind = "none" if kind is None else kind
    if kind not in DROPOUT_KINDS:
        raise ValueError(f"dropout must be one of {list(DROPOUT_KINDS)}, got {kind!r}")
    return kind, check_prob(p)


def make_dropout(kind, p) -> Module:
    """The standalone module for ``kind`` at drop probability ``p`` (Identity for 'none' or
    p == 0). Gyro layers split a batch that τ does not divide (a short last batch) unevenly
    rather than fail."""
    kind, p = _check(kind, p)
    if kind == "none" or p == 0:
        return Identity()
    return {"dropout": lambda: Dropout(p),
            "sliceout": lambda: SliceOut(p),
            "gyro": lambda: GyroDropout(p, ragged=True),
            "blockwise": lambda: BlockwiseDropout(p),
            "sparsedrop": lambda: SparseDrop(p)}[kind]()


# The Linear that fuses each kind's drop of its input into its GEMMs (where work is skipped);
# kinds not listed drop with their standalone module, then run a plain Linear.
_FUSED_LINEAR = {
    "sliceout": lambda i, o, p, kw: SliceOutLinear(i, o, p, mode="input", **kw),
    "sparsedrop": lambda i, o, p, kw: SparseDropLinear(i, o, p, **kw),
    "blockwise": lambda i, o, p, kw: BlockwiseLinear(i, o, p, mode="input", **kw),
}


def dropped_linear(kind, in_features, out_features, p, bias=True, rng=None,
                   dtype=np.float32) -> Module:
    """A Linear whose input units ``kind`` drops at rate ``p``; a plain Linear for 'none' or
    p == 0."""
    kind, p = _check(kind, p)
    kw = dict(bias=bias, rng=rng, dtype=dtype)
    if kind == "none" or p == 0:
        return Linear(in_features, out_features, **kw)
    if kind in _FUSED_LINEAR:
        return _FUSED_LINEAR[kind](in_features, out_features, p, kw)
    return DroppedLinear(in_features, out_features, make_dropout(kind, p), **kw)


class DroppedLinear(Linear):
    """``Linear(drop(x))``: a Linear whose input passes a parameter-free dropout module first.
    Its parameters are named as a plain Linear's, so checkpoints move between variants."""

    def __init__(self, in_features, out_features, drop: Module, bias=True, rng=None,
                 dtype=np.float32):
        super().__init__(in_features, out_features, bias=bias, rng=rng, dtype=dtype)
        self.drop = drop

    def forward(self, x):
        return super().forward(self.drop(x))


def set_total_steps(model: Module, total_steps: int) -> Module:
    """Tell gyro layers the run's length, so that each of their Σ sub-networks runs once, for
    ``total_steps * τ / Σ`` consecutive steps (layers built with an explicit period keep it)."""
    for m in model.modules():
        if isinstance(m, _GyroBase):
            m.set_total_steps(total_steps)
    return model
