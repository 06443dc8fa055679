"""Dropout layers and the ``dropout=`` factory the model builders use.

The structured variants (SliceOut, gyro, block-wise, SparseDrop, depth) register here as they
land; builders only ever call ``make_dropout``.
"""
from __future__ import annotations

from .. import autograd as ag
from .module import Module


def _check_p(p):
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
    return float(p)


class Dropout(Module):
    """Inverted element-wise dropout (Srivastava et al. 2014); the identity in eval mode."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = _check_p(p)

    def forward(self, x):
        return ag.dropout(x, self.p, training=self.is_training)

    def extra_repr(self):
        return f"p={self.p}"


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
