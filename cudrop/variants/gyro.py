"""Gyro dropout (Lee et al., MLSys 2022) on raw arrays: the mask draw and the pair
``gyro_dropout(x, p, ...) -> (y, saved)`` / ``gyro_dropout_backward(grad_out, saved)``.

The mask (``GyroMask``: τ unit masks) is a pure function of (seed, layer, step) and the
schedule (``gyro_schedule``). The op views x as (τ, B/τ, ...) and broadcasts the
(τ, 1, ..., N, ...) masks: two elementwise passes (scale, then zero the dropped cells, exactly 0
so an inf or NaN in a dropped cell does not leak), never a mask of x's size.

Decided on the device. Drawn with a device step (a 0-d uint32 CuPy array), or on CuPy with an
int step and ``on_device=True``, the mask has no ``keep`` or ``subnets`` but a ``GyroDraw``:
one kernel (``raw_kernels/gyro.cu``) derives the step's sub-networks and their keep bits from
it when it runs (a small (τ, units / 32) table, drawn once in the forward), another writes
``x * keep / q`` from the table in one pass, forward and backward alike (ragged groups and a
data-parallel rank's rows included). Its output equals the host-drawn mask's bit for bit (the
same cells kept, each times the same dtype-rounded ``1/q``), so ``nn.GyroDropout`` can be
captured in a CUDA graph, and its eager steps on CuPy take the same path (no host draw, no
upload of sub-network ids, one pass over x).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import backend, philox, random
from ..raw_kernels import aligned, kernel, launch, load
from . import gyro_schedule as gyro

__all__ = ["draw_mask", "load_device_kernels", "gyro_dropout", "gyro_dropout_backward"]

_THREADS = 256


def _scale_and_zero(xp, src, dst, drop, scale):
    """``dst = src * scale`` with ``dst[drop] = 0`` (exact zeros: an inf or NaN in a dropped
    cell does not leak); ``drop`` broadcasts."""
    xp.multiply(src, scale, out=dst)
    xp.copyto(dst, dst.dtype.type(0), where=drop)


def _check_x(x, what="x"):
    if not backend.is_floating(x.dtype):
        raise TypeError(f"{what} must be a floating array, got dtype {x.dtype}")


def _apply_gyro(x, mask, ax, ragged, table=None):
    """``(x * M[group(row)] / q, table)``: ``table`` the keep table of a mask decided on the
    device (drawn here when None; the backward passes the forward's), else None."""
    xp = backend.get_array_module(x, mask.keep)
    bounds = mask.row_bounds(x.shape[0], ragged)  # also the divisibility check of either path
    tau, n = mask.co_scheduled, mask.n_units
    if x.shape[ax] != n:
        raise ValueError(f"x has {x.shape[ax]} units on axis {ax} but the mask has {n}")
    scale = x.dtype.type(1.0 / mask.q)
    if mask.on_device:
        if xp is np:
            raise TypeError("gyro_dropout: the mask is decided on the device (drawn with a "
                            "device step) but x is a NumPy array: pass a CuPy array, or draw "
                            "with an int step")
        if table is None:
            table = _keep_table(xp, mask, x.shape[0])
        return _apply_on_device(x, mask, ax, scale, table), table
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
    return y, None


def _keep_table(xp, mask, rows):
    """The keep bits of the τ sub-networks a mask decided on the device runs, as a (τ, words)
    uint32 array (slot s, unit u: bit u % 32 of word u // 32), written by ``gyro_keep_table``
    when it runs (it reads the device step then)."""
    total = rows if mask.rows is None else mask.rows[1]
    d = mask.draw
    if total * d.co_scheduled >= 2 ** 64:  # the kernels' slot arithmetic (gyro.cuh)
        raise ValueError(f"gyro_dropout: a batch of {total} rows times co_scheduled "
                         f"({d.co_scheduled}) must stay below 2**64 on the device")
    words = -(-d.n_units // 32)
    table = xp.empty((d.co_scheduled, words), np.uint32)
    kernel("gyro.cu", "gyro_keep_table")(
        (-(-table.size // _THREADS),), (_THREADS,),
        (table, np.int64(d.co_scheduled), np.int64(words), np.uint64(d.n_units))
        + gyro.kernel_schedule_args(d) + (np.uint32(philox.threshold(mask.p)),))
    return table


def _apply_on_device(x, mask, ax, scale, table):
    """``x * keep / q`` by ``gyro_apply`` (``raw_kernels/gyro.cu``) from the keep table of a
    mask decided on the device; every element written (the dropped ones +0)."""
    x = aligned(x, 16)  # the kernel's 16-byte accesses (y: fresh from the pool, 256-byte aligned)
    y = backend.get_array_module(x).empty_like(x)
    if x.size == 0:
        return y
    rows = x.shape[0]
    offset, total = (0, rows) if mask.rows is None else mask.rows
    v = 16 // x.itemsize  # elements a thread
    launch("gyro.cu", "gyro_apply", x.dtype, (-(-x.size // (v * _THREADS)),), (_THREADS,),
           (x, y, np.int64(x.size), np.int64(x.size // rows),
            np.int64(math.prod(x.shape[ax + 1:])), np.int64(x.shape[ax]), np.int64(offset),
            np.int64(total), np.uint64(mask.co_scheduled), table, np.int64(table.shape[1]),
            np.float64(scale)))
    return y


def load_device_kernels(dtype) -> None:
    """Compile and load the kernels that apply a gyro mask decided on the device to arrays of
    ``dtype`` (memoised by the one loader, ``raw_kernels``), so that a CUDA-graph capture does
    not compile or load a module while the stream is capturing. ``nn.GyroDropout``'s eager
    steps on CuPy launch both kernels (they take the device path), which loads them; code that
    captures a step no eager step preceded calls this first."""
    kernel("gyro.cu", "gyro_keep_table")
    load("gyro.cu", "gyro_apply", dtype)


class GyroDropoutSaved(NamedTuple):
    """The τ unit masks, the units axis, whether groups are ragged, x's shape, and for a mask
    decided on the device the keep table its forward drew (None otherwise)."""
    mask: gyro.GyroMask
    axis: int
    ragged: bool
    shape: tuple
    table: object = None


def draw_mask(n_units, p, *, seed=None, layer=0, step=None, num_subnets=gyro.DEFAULT_NUM_SUBNETS,
              co_scheduled=gyro.DEFAULT_CO_SCHEDULED, period=gyro.DEFAULT_PERIOD,
              schedule="consecutive", xp=np, on_device=False):
    """The gyro mask of ``step`` over ``n_units`` units: the τ scheduled sub-networks' unit
    masks (a ``GyroMask``), a pure function of (seed, layer, step) and the schedule.
    ``seed=None``: the global generator (``cudrop.random``).

    ``step`` a device step (a 0-d uint32 CuPy array; ``xp`` must then be CuPy), or an int with
    ``on_device=True`` (CuPy only): the sub-networks are left to the kernel, which reads the
    step when it runs (an int goes to it by value); the mask has ``keep=None``,
    ``subnets=None`` and its ``GyroDraw`` (see ``GyroMask``; ``GyroMask.host()`` draws the
    host form when asked). Otherwise the host decides the sub-networks and ``keep`` lies on
    ``xp``'s device. Every argument is checked here either way."""
    seed, step = random.resolve(seed, step, xp)
    if on_device and xp is np:
        raise TypeError("draw_mask: on_device=True needs xp=cupy (the mask is decided by CUDA "
                        "kernels); on NumPy the host draws it")
    if on_device or backend.is_gpu_array(step):
        gyro.check_subnets(num_subnets, co_scheduled, schedule)
        n_units = gyro._check_int("n_units", n_units, 1)
        # the random schedule reads no period (scheduled_subnets ignores it)
        period = gyro._check_int("period", period, 1) if schedule == "consecutive" else 1
        draw = gyro.GyroDraw(seed, philox.check_seed("layer", layer), step, n_units,
                             int(num_subnets), int(co_scheduled), int(period), schedule, "gpu")
        return gyro.GyroMask(None, None, philox.check_prob(p), draw=draw)
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
    ``step`` an int, or on CuPy a device step (a 0-d uint32 CuPy array): the mask is then
    decided on the device by the kernel, which reads the step when it runs (a captured CUDA
    graph applies a new step's sub-networks per replay), with the int step's result bit for bit.
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
    y, table = _apply_gyro(x, mask, ax, ragged)
    return y, GyroDropoutSaved(mask, ax, ragged, x.shape, table)


def gyro_dropout_backward(grad_out, saved):
    """``grad_out * M[group(row)] / q``."""
    _check_x(grad_out, "grad_out")
    _check_grad_shape(grad_out, saved.shape)
    return _apply_gyro(grad_out, saved.mask, saved.axis, saved.ragged, saved.table)[0]


def _check_grad_shape(g, shape):
    if tuple(g.shape) != tuple(shape):
        raise ValueError(f"grad_out has shape {tuple(g.shape)}, expected {tuple(shape)}")
