"""Embedding lookup as an autograd op (thin wrapper over cudrop.functional.embedding)."""
from __future__ import annotations

from ..functional import _embedding as F
from .function import Function
from .tensor import Tensor

__all__ = ["embedding"]


class Embedding(Function):
    def __init__(self, indices):
        self.indices = indices

    def forward(self, weight):
        y, self.saved = F.embedding(self.indices, weight)
        self.indices = None
        return y

    def backward(self, g):
        return F.embedding_backward(g, self.saved)[1]  # (None for indices, gweight)


def embedding(indices, weight):
    """Rows ``weight[indices]`` of the (V, D) table ``weight`` for integer ``indices`` (a raw
    array or a Tensor, any shape); the gradient flows to ``weight`` only."""
    if isinstance(indices, Tensor):
        indices = indices.data
    return Embedding(indices)(weight)
