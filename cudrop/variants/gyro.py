"""Gyro dropout (Lee et al., MLSys 2022) on raw arrays: the mask draw and the pair
``gyro_dropout(x, p, ...) -> (y, saved)`` / ``gyro_dropout_backward(grad_out, saved)``.

The mask (``GyroMask``: τ unit masks) is a pure function of (seed, layer, step) and the
schedule (``gyro_schedule``). The op views x as (τ, B/τ, ...) and broadcasts the
(τ, 1, ..., N, ...) masks: two elementwise passes (scale, then zero the dropped cells, exactly 0
so an inf or NaN in a dropped cell does not leak), never a mask of x's size.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend, philox, random
from ..functional._block_linear import _scale_and_zero
from . import gyro_schedule as gyro

__all__ = ["draw_mask", "gyro_dropout", "gyro_dropout_backward"]


def _check_x(x, what="x"):
    if not backend.is_floating(x.dtype):
        raise TypeError(f"{what} must be a floating array, got dtype {x.dtype}")


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
    if mask.rows is None and x.shape[0] % tau == 0:
        grouped = (tau, x.shape[0] // tau) + tuple(x.shape[1:])
        _scale_and_zero(xp, x.reshape(grouped), y.reshape(grouped),
                        drop.reshape([tau, 1] + row_shape), scale)
    else:  # ragged groups (sizes differ by one) or a rank's part: one slice per group
        for t, (a, b) in enumerate(bounds):
            if b > a:
                _scale_and_zero(xp, x[a:b], y[a:b], drop[t].reshape(row_shape), scale)
    return y


class GyroDropoutSaved(NamedTuple):
    """The τ unit masks, the units axis, whether groups are ragged, and x's shape."""
    mask: gyro.GyroMask
    axis: int
    ragged: bool
    shape: tuple


def draw_mask(n_units, p, *, seed=None, layer=0, step=None, num_subnets=gyro.DEFAULT_NUM_SUBNETS,
              co_scheduled=gyro.DEFAULT_CO_SCHEDULED, period=gyro.DEFAULT_PERIOD,
              schedule="consecutive", xp=np):
    """The gyro mask of ``step`` over ``n_units`` units: the τ scheduled sub-networks' unit
    masks (a ``GyroMask``), a pure function of (seed, layer, step) and the schedule.
    ``seed=None``: the global generator (``cudrop.random``)."""
    seed, step = random.resolve(seed, step)
    step = philox.check_host_step(step, "gyro_dropout")
    return gyro.gyro_mask(n_units, p, step=step, seed=seed, layer=layer, num_subnets=num_subnets,
                          co_scheduled=co_scheduled, period=period, schedule=schedule, xp=xp)


def gyro_dropout(x, p=None, *, mask=None, seed=None, layer=0, step=None,
                 num_subnets=gyro.DEFAULT_NUM_SUBNETS, co_scheduled=gyro.DEFAULT_CO_SCHEDULED,
                 period=gyro.DEFAULT_PERIOD, schedule="consecutive", unit_axis=None,
                 ragged=False):
    """Gyro dropout (Lee et al. 2022): ``y = x * M[group(row)] / q``, the batch (axis 0) split
    into τ = ``co_scheduled`` contiguous row groups, row group ``t`` masked along ``unit_axis``
    by the unit mask of the sub-network in slot ``t`` (Σ = ``num_subnets`` pre-selected ones, a
    set of τ running ``period`` consecutive steps; see ``cudrop.variants.gyro_schedule``).

    ``mask`` (a ``GyroMask``) or else one drawn by :func:`draw_mask` at (seed, layer, step).
    ``unit_axis`` defaults to channels for 4-D (N, C, H, W) input and the last axis otherwise.
    τ must divide the batch unless ``ragged`` (then the groups' sizes differ by at most one).
    Nothing is skipped: gyro dropout is an accuracy method. Returns ``(y, saved)``.
    """
    _check_x(x)
    ax = gyro.unit_axis_of(x.shape, unit_axis)
    if mask is None:
        if p is None:
            raise TypeError("gyro_dropout: p is required when no mask is given")
        gyro.check_subnets(num_subnets, co_scheduled, schedule)
        mask = draw_mask(x.shape[ax], p, step=step, seed=seed, layer=layer,
                         num_subnets=num_subnets, co_scheduled=co_scheduled, period=period,
                         schedule=schedule, xp=backend.get_array_module(x))
    elif not isinstance(mask, gyro.GyroMask):
        raise TypeError(f"gyro_dropout: mask must be a GyroMask, got {type(mask).__name__}")
    y = _apply_gyro(x, mask, ax, ragged)
    return y, GyroDropoutSaved(mask, ax, ragged, x.shape)


def gyro_dropout_backward(grad_out, saved):
    """``grad_out * M[group(row)] / q``."""
    _check_x(grad_out, "grad_out")
    _check_grad_shape(grad_out, saved.shape)
    return _apply_gyro(grad_out, saved.mask, saved.axis, saved.ragged)


def _check_grad_shape(g, shape):
    if tuple(g.shape) != tuple(shape):
        raise ValueError(f"grad_out has shape {tuple(g.shape)}, expected {tuple(shape)}")
