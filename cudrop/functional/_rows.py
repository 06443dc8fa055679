"""Row gather / scatter-add on raw arrays: the pair that lets per-sample stochastic depth run a
residual body on the kept samples only.

``idx`` is a 1-D integer array of *distinct* row indices (the kept samples). Distinctness is
what lets both backward passes assign instead of accumulating (``xp.add.at`` is a slow atomic
scatter on the GPU and not needed here). Give it as a NumPy array — the caller draws it on the
host anyway — and it is checked (strictly increasing, in range) and then moved to the data's
device; an ``idx`` already on the GPU is trusted, since checking it there would synchronise.

Backward convention: ``*_backward(grad_out, saved)`` returns one gradient per array input of the
forward, in order, None for the integer ``idx``: ``(gx, None)`` and ``(gbase, grows, None)``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import backend

Array = Any  # a NumPy or CuPy array


class GatherRowsSaved(NamedTuple):
    """What :func:`gather_rows_backward` needs: the rows (on the data's device), x's shape and
    dtype."""
    idx: Array
    shape: tuple[int, ...]
    dtype: np.dtype


class ScatterAddRowsSaved(NamedTuple):
    """What :func:`scatter_add_rows_backward` needs: the rows (on the data's device) and scale."""
    idx: Array
    scale: float


def _check_idx(idx, n_rows, xp):
    """``idx`` on the data's device, after checking a host ``idx`` completely."""
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise ValueError(f"idx must be a 1-D integer array, got shape {idx.shape} and dtype "
                         f"{idx.dtype}")
    if idx.size > n_rows:
        raise ValueError(f"idx has {idx.size} entries for {n_rows} rows; entries must be distinct")
    if isinstance(idx, np.ndarray):
        if idx.size and (idx[0] < 0 or idx[-1] >= n_rows or (np.diff(idx) <= 0).any()):
            raise ValueError(f"idx must be strictly increasing row indices in [0, {n_rows})")
        return xp.asarray(idx)
    if backend.get_array_module(idx) is not xp:
        raise TypeError("idx is on the GPU but the data is not")
    return idx


def gather_rows(x, idx):
    """``x[idx]`` along axis 0. Returns ``(rows, saved)`` (a :class:`GatherRowsSaved`) for
    :func:`gather_rows_backward`."""
    xp = backend.get_array_module(x)
    idx = _check_idx(idx, x.shape[0], xp)
    return x[idx], GatherRowsSaved(idx, x.shape, x.dtype)


def gather_rows_backward(grad_rows, saved: GatherRowsSaved):
    """Gradients ``(gx, None)``: the adjoint of the gather, ``grad_rows`` scattered into zeros
    of the input's shape; none for ``idx``."""
    xp = backend.get_array_module(grad_rows)
    g = xp.zeros(saved.shape, saved.dtype)
    g[saved.idx] = grad_rows
    return g, None


def scatter_add_rows(base, rows, idx, scale=1.0):
    """``out = base`` with ``out[idx] += scale * rows``; ``base`` is not modified.

    ``rows`` has one row per entry of ``idx`` and the trailing shape of ``base``. Returns
    ``(out, saved)`` (a :class:`ScatterAddRowsSaved`) for :func:`scatter_add_rows_backward`.
    """
    xp = backend.get_array_module(base, rows)
    idx = _check_idx(idx, base.shape[0], xp)
    if rows.shape != (idx.size,) + base.shape[1:]:
        raise ValueError(f"rows must have shape {(idx.size,) + base.shape[1:]} (one row per "
                         f"index, trailing shape of base), got {rows.shape}")
    scale = float(scale)
    out = base.astype(xp.result_type(base, rows), copy=True)
    out[idx] += rows * scale if scale != 1.0 else rows
    return out, ScatterAddRowsSaved(idx, scale)


def scatter_add_rows_backward(grad_out, saved: ScatterAddRowsSaved):
    """Gradients ``(d base, d rows, None) = (grad_out, scale * grad_out[idx], None)``; none for
    ``idx``."""
    g_rows = grad_out[saved.idx]
    if saved.scale != 1.0:
        g_rows *= saved.scale  # a fancy-indexed read is a fresh array: safe in place
    return grad_out, g_rows, None
