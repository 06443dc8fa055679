"""Plain inverted dropout as an autograd op (thin wrapper over cudrop.functional.dropout)."""
from __future__ import annotations

from ..functional import dropout as F
from . import mode
from .function import Function
from .tensor import as_tensor

__all__ = ["dropout"]


class Dropout(Function):
    def __init__(self, p, rng=None):
        self.p, self.rng = p, rng

    def forward(self, x):
        y, self.saved = F.dropout(x, self.p, self.rng)
        self.rng = None
        return y

    def backward(self, g):
        return F.dropout_backward(g, self.saved)


def dropout(x, p=0.5, training=None, *, rng=None):
    """Inverted dropout with drop probability ``p`` in [0, 1).

    The identity (``x`` itself) when not training or when ``p == 0``; ``training`` None follows
    ``cudrop.autograd.mode.is_training()``. ``rng``: optional NumPy/CuPy Generator.
    """
    p = F.check_p(p)
    if training is None:
        training = mode.is_training()
    if not training or p == 0:
        return as_tensor(x)
    return Dropout(p, rng)(x)
