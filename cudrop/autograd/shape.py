"""Shape and indexing ops: reshape, transpose, getitem, concat, stack."""
from __future__ import annotations

import numbers

from .. import backend
from .function import Function
from .tensor import Tensor


class Reshape(Function):
    def __init__(self, shape):
        self.shape = (shape,) if isinstance(shape, numbers.Integral) else tuple(shape)

    def forward(self, a):
        self.src = a.shape
        return a.reshape(self.shape)

    def backward(self, g):
        return g.reshape(self.src)


class Transpose(Function):
    def __init__(self, axes=None):
        self.axes = None if axes is None else tuple(axes)

    def forward(self, a):
        return a.transpose(self.axes)

    def backward(self, g):
        if self.axes is None:
            return g.transpose()
        inverse = [0] * g.ndim
        for i, ax in enumerate(self.axes):
            inverse[ax % g.ndim] = i
        return g.transpose(inverse)


class GetItem(Function):
    def __init__(self, index):
        self.index = index

    def forward(self, a):
        self.src = a.shape, a.dtype
        return a[self.index]

    def backward(self, g):
        xp = backend.get_array_module(g)
        out = xp.zeros(*self.src)
        if _is_basic(self.index):  # a view: each element at most once, plain assignment
            out[self.index] = g
        else:  # add.at so repeated integer indices accumulate (embedding-style gathers)
            xp.add.at(out, self.index, g)
        return out


def _is_basic(index):
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, (slice, int)) for p in parts)


class Concat(Function):
    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, *xs):
        xp = backend.get_array_module(*xs)
        self.sizes = [x.shape[self.axis] for x in xs]
        return xp.concatenate(xs, axis=self.axis)

    def backward(self, g):
        xp = backend.get_array_module(g)
        cuts = list(_cumsum(self.sizes))[:-1]
        return tuple(xp.split(g, cuts, axis=self.axis))


class Stack(Function):
    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, *xs):
        xp = backend.get_array_module(*xs)
        return xp.stack(xs, axis=self.axis)

    def backward(self, g):
        xp = backend.get_array_module(g)
        return tuple(xp.squeeze(p, axis=self.axis)
                     for p in xp.split(g, g.shape[self.axis], axis=self.axis))


def _cumsum(xs):
    t = 0
    for x in xs:
        t += x
        yield t


def _unwrap_index(idx):
    """Tensors used as indices become their raw arrays (integer gathers need no gradient)."""
    if isinstance(idx, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in idx)
    return idx.data if isinstance(idx, Tensor) else idx


def reshape(a, shape):
    """``a`` with a new ``shape`` (an int or a tuple; one entry may be -1), like
    ``np.reshape``; the gradient is reshaped back."""
    return Reshape(shape)(a)


def transpose(a, axes=None):
    """``a`` with its axes permuted by ``axes``, or reversed when ``axes`` is None, like
    ``np.transpose``."""
    return Transpose(axes)(a)


def getitem(a, index):
    """``a[index]`` with NumPy basic or advanced indexing (Tensors in ``index`` are used as
    their arrays). The gradient is scattered back with ``add.at`` for advanced indices, so
    repeated integer indices accumulate. Same as ``a[index]`` on a Tensor."""
    return GetItem(_unwrap_index(index))(a)


def concat(tensors, axis=0):
    """Join a non-empty sequence of tensors along an existing ``axis``, like
    ``np.concatenate``; each input gets its slice of the gradient."""
    if len(tensors) == 0:
        raise ValueError("concat needs at least one tensor")
    return Concat(axis)(*tensors)


def stack(tensors, axis=0):
    """Join a non-empty sequence of same-shaped tensors along a new ``axis``, like
    ``np.stack``."""
    if len(tensors) == 0:
        raise ValueError("stack needs at least one tensor")
    return Stack(axis)(*tensors)
