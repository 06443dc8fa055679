"""Inverted element dropout as an autograd op (thin wrapper over cudrop.functional.dropout)."""
from __future__ import annotations

from ..variants import dropout as F
from ..philox import check_prob
from . import mode
from .function import Function
from .tensor import as_tensor

__all__ = ["dropout"]


class Dropout(Function):
    def __init__(self, p, seed, layer, step):
        self.args = p, dict(seed=seed, layer=layer, step=step)

    def forward(self, x):
        p, kw = self.args
        y, self.saved = F.dropout(x, p, **kw)
        return y

    def backward(self, g):
        return F.dropout_backward(g, self.saved)


def dropout(x, p=0.5, training=None, *, seed=0, layer=0, step=0):
    """Inverted dropout with drop probability ``p`` in [0, 1); the mask is a pure function of
    (seed, layer, step) and is saved as packed bits.

    The identity (``x`` itself) when not training or when ``p == 0``; ``training`` None follows
    ``cudrop.autograd.mode.is_training()``.
    """
    p = check_prob(p)
    if training is None:
        training = mode.is_training()
    if not training or p == 0:
        return as_tensor(x)
    return Dropout(p, seed, layer, step)(x)
