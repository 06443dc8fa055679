"""Loss functions as autograd ops (thin wrappers over cudrop.functional.loss)."""
from __future__ import annotations

from ..functional import _loss as F
from .function import Function
from .math import _pair
from .tensor import Tensor

__all__ = ["cross_entropy", "mse_loss"]


class CrossEntropy(Function):
    def __init__(self, targets, reduction):
        self.targets, self.reduction = targets, reduction

    def forward(self, logits):
        y, self.saved = F.cross_entropy(logits, self.targets, self.reduction)
        self.targets = None
        return y

    def backward(self, g):
        return F.cross_entropy_backward(g, self.saved)[0]  # (glogits, None for targets)


class MSELoss(Function):
    def __init__(self, reduction):
        self.reduction = reduction

    def forward(self, pred, target):
        y, self.saved = F.mse_loss(pred, target, self.reduction)
        return y

    def backward(self, g):
        return F.mse_loss_backward(g, self.saved)


def cross_entropy(logits, targets, reduction="mean"):
    """Softmax cross entropy of ``logits`` (..., C) against integer class ``targets`` of shape
    ``logits.shape[:-1]`` (a raw array or a Tensor; never differentiated).
    ``reduction``: 'mean' | 'sum' | 'none'."""
    if isinstance(targets, Tensor):
        targets = targets.data
    return CrossEntropy(targets, reduction)(logits)


def mse_loss(pred, target, reduction="mean"):
    """Mean squared error; both ``pred`` and ``target`` are differentiable.
    ``reduction``: 'mean' | 'sum' | 'none'."""
    return MSELoss(reduction)(*_pair(pred, target))
