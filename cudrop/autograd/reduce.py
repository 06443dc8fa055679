"""Reductions and the (log-)softmax family."""
from __future__ import annotations

import numbers

import numpy as np

from .. import backend
from ..functional import _softmax
from ..functional._norm import narrow, widen
from .function import Function
from .pair import differentiable


def _axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axis = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)  # np.int64 too
    out = []
    for a in axis:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an array of {ndim} dimensions")
        out.append(int(a) % ndim)
    return tuple(sorted(set(out)))


def _expand(g, axes, keepdims):
    """Re-insert reduced axes so ``g`` broadcasts against the input."""
    if keepdims:
        return g
    for a in axes:
        g = backend.get_array_module(g).expand_dims(g, a)
    return g


class Sum(Function):
    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, a):
        self.axes, self.shape = _axes(self.axis, a.ndim), a.shape
        return a.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, g):
        xp = backend.get_array_module(g)
        return xp.broadcast_to(_expand(g, self.axes, self.keepdims), self.shape).copy()


class Mean(Sum):
    def forward(self, a):
        self.axes, self.shape = _axes(self.axis, a.ndim), a.shape
        self.n = 1
        for ax in self.axes:
            self.n *= a.shape[ax]
        # ndarray.mean accumulates float16 in float32; a float16 sum divided by float16(n)
        # overflows to inf/nan once the sum or n passes 65504.
        return a.mean(axis=self.axes, keepdims=self.keepdims)

    def backward(self, g):
        if g.dtype.kind == "f" and g.dtype.itemsize < 4:
            g = (g.astype(np.float32) / self.n).astype(g.dtype)  # n may not fit in float16
        else:
            g = g / self.n
        return super().backward(g)


class Max(Function):
    """Max; the gradient is split equally between tied maxima."""

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, a):
        self.axes = _axes(self.axis, a.ndim)
        y = a.max(axis=self.axes, keepdims=True)
        self.hit = a == y
        return y if self.keepdims else y.reshape([n for i, n in enumerate(y.shape)
                                                  if i not in self.axes])

    def backward(self, g):
        g = _expand(g, self.axes, self.keepdims)
        count = self.hit.sum(axis=self.axes, keepdims=True)
        return (self.hit * (g / count)).astype(g.dtype, copy=False)


class Var(Function):
    """Population variance (ddof=0), as batch norm uses."""

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, a):
        self.axes = _axes(self.axis, a.ndim)
        self.n = 1
        for ax in self.axes:
            self.n *= a.shape[ax]
        self.centered = a - a.mean(axis=self.axes, keepdims=True)
        return (self.centered ** 2).mean(axis=self.axes, keepdims=self.keepdims)

    def backward(self, g):
        g = _expand(g, self.axes, self.keepdims)
        return g * self.centered * (2.0 / self.n)


# ``cudrop.functional``'s softmax pair as a Tensor op (one kernel each way on the GPU): 16-bit
# inputs are exponentiated and summed in float32 (the result and the saved output keep the input
# dtype, as attention stores its probabilities)
_softmax_op = differentiable(_softmax.softmax, _softmax.softmax_backward, 1)


class LogSoftmax(Function):
    """Computed in float32 for 16-bit inputs, like :func:`softmax`."""

    def __init__(self, axis=-1):
        self.axis = axis

    def forward(self, a):
        xp = backend.get_array_module(a)
        x = widen(a)
        s = x - x.max(axis=self.axis, keepdims=True)
        self.y = s - xp.log(xp.exp(s).sum(axis=self.axis, keepdims=True))
        return narrow(self.y, a.dtype)

    def backward(self, g):
        xp = backend.get_array_module(g)
        g32 = widen(g)
        return narrow(g32 - xp.exp(self.y) * g32.sum(axis=self.axis, keepdims=True), g.dtype)


def sum(a, axis=None, keepdims=False):
    """Sum over ``axis`` (an int, a tuple, or None for all axes), like ``np.sum``;
    ``keepdims`` keeps the reduced axes with size 1."""
    return Sum(axis, keepdims)(a)


def mean(a, axis=None, keepdims=False):
    """Mean over ``axis``, arguments as in :func:`sum`. float16 inputs accumulate in float32
    (``ndarray.mean``), so large reductions do not overflow."""
    return Mean(axis, keepdims)(a)


def max(a, axis=None, keepdims=False):
    """Maximum over ``axis``, arguments as in :func:`sum`. The gradient is split equally
    between tied maxima (PyTorch's ``amax`` convention)."""
    return Max(axis, keepdims)(a)


def var(a, axis=None, keepdims=False):
    """Population variance (``ddof=0``, as batch norm uses) over ``axis``, arguments as in
    :func:`sum`; ``np.var``'s default, not ``torch.var``'s (unbiased)."""
    return Var(axis, keepdims)(a)


def softmax(a, axis=-1):
    """``exp(a) / sum(exp(a))`` along ``axis`` (default the last), computed after subtracting
    the maximum so large inputs do not overflow."""
    return _softmax_op(a, axis)


def log_softmax(a, axis=-1):
    """``log(softmax(a))`` along ``axis``, computed directly (``s - log(sum(exp(s)))`` with
    ``s = a - max(a)``): finite where ``softmax`` underflows to 0."""
    return LogSoftmax(axis)(a)
