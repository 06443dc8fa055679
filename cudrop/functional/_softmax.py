"""Softmax along an axis as a functional pair, on raw arrays.

On the GPU a softmax over the last axis is one kernel forward and one backward (``raw_kernels/lastaxis.cu``, a warp per row, accumulating in float32 for the 16-bit
types); other axes and NumPy take the composed array ops, which compute the same formulas.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import backend, raw_kernels
from ._norm import narrow, widen

Array = Any  # a NumPy or CuPy array


class SoftmaxSaved(NamedTuple):
    """The output (in the input's dtype, as attention keeps its probabilities) and the axis."""
    y: Array
    axis: int


def _rows_gpu(a, axis):
    """``(rows, n)`` when the kernels apply (a non-empty CuPy array of a kernel dtype, ``axis``
    its last), else None."""
    if not (backend.is_gpu_array(a) and raw_kernels.cuda_type(a.dtype) is not None
            and a.ndim and axis in (-1, a.ndim - 1) and a.size):
        return None
    n = a.shape[-1]
    return a.size // n, n


def _launch(fn, dtype, rows, n, args):
    raw_kernels.launch_rows("lastaxis.cu", fn, dtype, rows,
                            args + (np.int64(rows), np.int32(n)))


def softmax(x, axis=-1):
    """``(exp(x - max) / sum(exp(x - max)), saved)`` along ``axis``; 16-bit inputs are
    exponentiated and summed in float32 and the result returned in ``x``'s dtype."""
    xp = backend.get_array_module(x)
    shape = _rows_gpu(x, axis)
    if shape is not None:
        x = xp.ascontiguousarray(x)
        y = xp.empty_like(x)
        _launch("softmax_fwd", x.dtype, *shape, (x, y))
        return y, SoftmaxSaved(y, axis)
    v = widen(x)
    e = xp.exp(v - v.max(axis=axis, keepdims=True))
    y = narrow(e / e.sum(axis=axis, keepdims=True), x.dtype)
    return y, SoftmaxSaved(y, axis)


def softmax_backward(grad_out, saved: SoftmaxSaved):
    """``y * (g - sum(g * y))`` along the saved axis, in ``grad_out``'s dtype."""
    xp = backend.get_array_module(grad_out)
    y, axis = saved
    g = grad_out
    shape = _rows_gpu(y, axis)
    if shape is not None and g.dtype == y.dtype and g.shape == y.shape:
        g = xp.ascontiguousarray(g)
        gx = xp.empty_like(g)
        _launch("softmax_bwd", g.dtype, *shape, (y, g, gx))
        return gx
    y32, g32 = widen(y), widen(g)
    return narrow(y32 * (g32 - (g32 * y32).sum(axis=axis, keepdims=True)), g.dtype)
