"""Dropout layers and the ``dropout=`` factory the model builders use.

The structured variants (SliceOut, gyro, block-wise, SparseDrop, depth) register here as they
land; builders only ever call ``make_dropout``.
"""
from __future__ import annotations

from .. import autograd as ag
from ..functional.dropout import check_p as _check_p
from .module import Module
from .stochastic import StochasticLayer


class Dropout(StochasticLayer):
    """Inverted element-wise dropout (Srivastava et al. 2014); the identity in eval mode. The
    mask of each training forward is a pure function of (seed, layer_id, step)."""

    def __init__(self, p=0.5, seed=0, layer_id=None):
        super().__init__(seed, layer_id)
        self.p = _check_p(p)

    def forward(self, x):
        if not self.is_training or self.p == 0:
            return x
        return ag.dropout(x, self.p, training=True, seed=self.seed, layer=self.layer_id,
                          step=self.next_step())

    def extra_repr(self):
        return f"p={self.p}, " + super().extra_repr()


class Identity(Module):
    def forward(self, x):
        return x


DROPOUT_KINDS = {"none": None, "dropout": Dropout}


def make_dropout(kind, p):
    """The dropout module for ``kind`` (a name in DROPOUT_KINDS, or None) at rate ``p``."""
    kind = "none" if kind is None else kind
    if kind not in DROPOUT_KINDS:
        raise ValueError(f"dropout must be one of {sorted(DROPOUT_KINDS)}, got {kind!r}")
    _check_p(p)
    cls = DROPOUT_KINDS[kind]
    return Identity() if cls is None or p == 0 else cls(p)
