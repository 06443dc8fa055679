"""Embedding lookup on raw arrays.

Backward convention: ``embedding_backward(grad_out, saved)`` returns ``(None, gweight)``, one
gradient per array input of ``embedding(indices, weight)`` in order (integer indices get none).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import backend
from .._checks import check_index_range
from ._norm import compute_dtype

Array = Any  # a NumPy or CuPy array


class EmbeddingSaved(NamedTuple):
    """What :func:`embedding_backward` needs: the indices and the table's shape and dtype."""
    indices: Array
    weight_shape: tuple[int, int]
    weight_dtype: np.dtype


def embedding(indices, weight):
    """``weight[indices]``: rows of the (V, D) table ``weight`` for integer ``indices`` of any
    shape; the output has shape ``indices.shape + (D,)``. An index outside [0, V) raises
    ``cudrop.IndexRangeError``: at once on NumPy, at the next ``cudrop.check_errors()`` on the
    GPU (the call itself never waits for the device; its rows are garbage then).
    Returns ``(out, saved)`` (an :class:`EmbeddingSaved`) for :func:`embedding_backward`."""
    backend.get_array_module(indices, weight)
    if not hasattr(indices, "dtype") or indices.dtype.kind not in "iu":
        raise TypeError(f"indices must be an integer array, got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be a 2-D (num_embeddings, dim) table, got shape "
                         f"{tuple(weight.shape)}")
    v = weight.shape[0]
    if indices.size:
        if v == 0:  # CuPy would wrap the indices modulo 0 rows
            raise ValueError("weight has 0 rows: there is nothing to look up")
        # No host read on the GPU: a bad index is raised at the next check point, and until
        # then CuPy's take (and add.at in the backward) wraps it into the rows of weight.
        check_index_range("indices", indices, 0, v, op="embedding")
    out = weight[indices]
    saved = EmbeddingSaved(indices, weight.shape, weight.dtype)
    return out, saved


def embedding_backward(grad_out, saved: EmbeddingSaved):
    """Gradients ``(None, gweight)``: none for the integer indices; the table's is ``grad_out``
    rows scatter-added at ``indices`` (repeated indices accumulate)."""
    xp = backend.get_array_module(grad_out, saved.indices)
    shape, dtype = saved.weight_shape, saved.weight_dtype
    # accumulate half-precision rows (bfloat16 included) in float32: many repeats of a token
    # would otherwise round away
    acc = compute_dtype(dtype)
    gw = xp.zeros(shape, acc)
    xp.add.at(gw, saved.indices.reshape(-1),
              grad_out.reshape(-1, shape[1]).astype(acc, copy=False))
    return None, gw.astype(dtype, copy=False)
