"""Gyro dropout and block-wise gyro dropout on raw arrays: the functional pairs
``op(x, mask) -> (y, saved)`` / ``op_backward(grad_out, saved)``.

The masks come from ``cudrop.gyro`` (pure functions of seed, layer and step); these ops only
apply them: ``y = x * m / q`` and ``dx = g * m / q``, with dropped cells exactly 0 (not
``0 * x``, so an inf or NaN in a dropped cell does not leak, as with a GEMM that skips the
block). ``saved`` holds the mask itself -- τ unit masks, or a ``BlockMask`` (packed bits and
kept-block lists) -- never a mask of x's size.

Cost. Neither op materialises a mask of x's shape. Gyro views x as (τ, B/τ, ...) and
broadcasts the (τ, 1, ..., N, ...) masks; block-wise expands the (nM, nK) block grid along the
units only, to (nM, K) bools (1/Mb of x), and broadcasts it over the Mb rows of each row block,
with the ragged last row block (M not a multiple of Mb) done as a second slice. Either is two
elementwise passes (scale, then zero the dropped cells); GEMMs that skip dropped blocks come
later and will use the ``BlockMask`` in ``saved`` instead.
"""
from __future__ import annotations

from .. import backend, masks
from . import gyro_schedule as gyro


def _check_x(x, what="x"):
    if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
        raise TypeError(f"{what} must be a floating array, got dtype {x.dtype}")


def _scale_and_zero(xp, src, dst, drop, scale):
    """``dst = src * scale`` with ``dst[drop] = 0``; ``drop`` broadcasts against ``dst``."""
    xp.multiply(src, scale, out=dst)
    xp.copyto(dst, dst.dtype.type(0), where=drop)


def _apply_gyro(x, mask, ax, ragged):
    xp = backend.get_array_module(x, mask.keep)
    bounds = mask.row_bounds(x.shape[0], ragged)
    tau, n = mask.co_scheduled, mask.n_units
    if x.shape[ax] != n:
        raise ValueError(f"x has {x.shape[ax]} units on axis {ax} but the mask has {n}")
    scale = x.dtype.type(1.0 / mask.q)
    y = xp.empty(x.shape, x.dtype)
    row_shape = [1] * (x.ndim - 1)
    row_shape[ax - 1] = n
    drop = ~mask.keep
    if x.shape[0] % tau == 0:
        grouped = (tau, x.shape[0] // tau) + tuple(x.shape[1:])
        _scale_and_zero(xp, x.reshape(grouped), y.reshape(grouped),
                        drop.reshape([tau, 1] + row_shape), scale)
    else:  # ragged groups (sizes differ by one): one slice per group
        for t, (a, b) in enumerate(bounds):
            if b > a:
                _scale_and_zero(xp, x[a:b], y[a:b], drop[t].reshape(row_shape), scale)
    return y


def gyro_dropout(x, mask, *, unit_axis=None, ragged=False):
    """``y = x * M[group(row)] / q``: the batch (axis 0) split into τ contiguous row groups, row
    group ``t`` masked along ``unit_axis`` by ``mask.keep[t]`` (a ``cudrop.gyro.GyroMask``).

    ``unit_axis`` defaults to channels for 4-D (N, C, H, W) input and the last axis otherwise.
    τ must divide the batch unless ``ragged`` (then the groups' sizes differ by at most one).
    Returns ``(y, saved)`` for :func:`gyro_dropout_backward`.
    """
    _check_x(x)
    ax = gyro.unit_axis_of(x.shape, unit_axis)
    y = _apply_gyro(x, mask, ax, ragged)
    return y, {"mask": mask, "axis": ax, "ragged": ragged, "shape": x.shape}


def gyro_dropout_backward(grad_out, saved):
    """``grad_out * M[group(row)] / q``."""
    _check_x(grad_out, "grad_out")
    _check_grad_shape(grad_out, saved["shape"])
    return _apply_gyro(grad_out, saved["mask"], saved["axis"], saved["ragged"])


def _apply_block(x, mask):
    xp = backend.get_array_module(x, mask.bits)
    if x.ndim != 2 or tuple(x.shape) != tuple(mask.shape):
        raise ValueError(f"x has shape {tuple(x.shape)} but the block mask is over "
                         f"{tuple(mask.shape)}")
    (m, k), (mb, kb) = mask.shape, mask.block
    scale = x.dtype.type(1.0 / mask.q)
    # (nM, K): the block grid expanded along the units only
    drop = ~xp.repeat(mask.keep_blocks(), kb, axis=1)[:, :k]
    y = xp.empty(x.shape, x.dtype)
    full = m // mb  # whole row blocks; the last one is partial when mb does not divide m
    if full:
        rows = full * mb
        _scale_and_zero(xp, x[:rows].reshape(full, mb, k), y[:rows].reshape(full, mb, k),
                        drop[:full, None, :], scale)
    if full * mb < m:
        _scale_and_zero(xp, x[full * mb:], y[full * mb:], drop[full][None, :], scale)
    return y


def blockwise_dropout(x, mask):
    """``y = x * m / q`` for an (M, K) array and a ``masks.BlockMask`` over (M, K) (block-wise
    gyro dropout's, from ``cudrop.gyro.blockwise_mask``, or any other). Returns ``(y, saved)``;
    ``saved["mask"]`` is the ``BlockMask``, for :func:`blockwise_dropout_backward` and for a
    following GEMM that skips the dropped blocks."""
    _check_x(x)
    if not isinstance(mask, masks.BlockMask):
        raise TypeError(f"mask must be a cudrop.masks.BlockMask, got {type(mask).__name__}")
    return _apply_block(x, mask), {"mask": mask}


def blockwise_dropout_backward(grad_out, saved):
    """``grad_out * m / q``."""
    _check_x(grad_out, "grad_out")
    return _apply_block(grad_out, saved["mask"])


def _check_grad_shape(g, shape):
    if tuple(g.shape) != tuple(shape):
        raise ValueError(f"grad_out has shape {tuple(g.shape)}, expected {tuple(shape)}")
