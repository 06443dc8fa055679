"""Block-wise gyro dropout (Lee et al., MLSys 2022) on raw arrays: gyro's sub-network masks at
block granularity (rows in blocks of ``Mb`` = 128, units in blocks of ``Kb`` = 32), so the GEMMs
skip the dropped blocks.

- ``draw_mask``: the ``BlockMask`` of a step (row block ``r`` carries the unit-block mask of the
  sub-network its slot runs; ``gyro_schedule``), a pure function of (seed, layer, step).
- ``blockwise_dropout``: the mask alone, ``x ⊙ m / q``.
- ``blockwise_linear``: input pruning, ``(x ⊙ m) @ w / q + b``: the dropped K-blocks of the
  input are skipped in all three GEMMs (dsd forward, sdd and dsd_t backward).
- ``blockwise_linear_out``: output pruning, ``act(x @ w + b) ⊙ m / q``: dropped output blocks
  are never computed (sdd forward), and backward runs on the kept blocks only.

Backward convention: ``*_backward(grad_out, saved)`` returns one gradient per array input of
the forward, in its order (None for a bias that was None).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend, bsmm, masks, philox, random
from ..functional._act import LinearSaved, linear_backward
from ..functional._block_linear import (apply_block_mask, block_masked, block_masked_backward,
                                        block_masked_linear, block_masked_linear_backward,
                                        check_block_mask, check_linear)
from . import gyro_schedule as gyro

__all__ = ["draw_mask", "blockwise_dropout", "blockwise_dropout_backward", "blockwise_linear",
           "blockwise_linear_backward", "blockwise_linear_out", "blockwise_linear_out_backward"]

_ACTS = (None, "relu")


def draw_mask(shape, p, *, seed=None, layer=0, step=None, block=gyro.DEFAULT_BLOCK,
              num_subnets=gyro.DEFAULT_NUM_SUBNETS, co_scheduled=gyro.DEFAULT_CO_SCHEDULED,
              period=gyro.DEFAULT_PERIOD, schedule="consecutive", xp=np):
    """The block-wise gyro mask of ``step`` over an (M, K) operand (a ``BlockMask``). Edge
    blocks are partial when the shape does not divide. ``seed=None``: the global generator
    (``cudrop.random``). On CuPy (``xp=cupy``) the mask is decided on the device, and ``step``
    may be a device step (a 0-d uint32 CuPy array, read by the kernels when they run)."""
    seed, step = random.resolve(seed, step, xp)
    return gyro.blockwise_mask(shape, philox.check_prob(p), step=step, seed=seed, layer=layer,
                               block=block, num_subnets=num_subnets, co_scheduled=co_scheduled,
                               period=period, schedule=schedule, xp=xp)


def _mask_for(op, shape, xp, p, mask, draw):
    if mask is not None:
        return check_block_mask(op, mask)
    if p is None:
        raise TypeError(f"{op}: p is required when no mask is given")
    return draw_mask(shape, p, xp=xp, **draw)


def _rows(x):
    return int(np.prod(x.shape[:-1], dtype=np.int64))


def blockwise_dropout(x, p=None, *, mask=None, seed=None, layer=0, step=None,
                      block=gyro.DEFAULT_BLOCK, num_subnets=gyro.DEFAULT_NUM_SUBNETS,
                      co_scheduled=gyro.DEFAULT_CO_SCHEDULED, period=gyro.DEFAULT_PERIOD,
                      schedule="consecutive"):
    """``(y, saved)``, ``y = x ⊙ m / q`` with ``x`` (..., K) viewed as (M, K) (every leading axis
    a row, as a GEMM sees it) and ``m`` the given ``mask`` or the one :func:`draw_mask` draws.
    Skips no work by itself: before a Linear use :func:`blockwise_linear`."""
    if x.ndim < 2:
        raise ValueError(f"blockwise_dropout needs x of shape (..., rows, units), got {x.shape}")
    mask = _mask_for("blockwise_dropout", (_rows(x), x.shape[-1]), backend.get_array_module(x),
                     p, mask, dict(seed=seed, layer=layer, step=step, block=block,
                                   num_subnets=num_subnets, co_scheduled=co_scheduled,
                                   period=period, schedule=schedule))
    return block_masked(x, mask)


blockwise_dropout_backward = block_masked_backward


def blockwise_linear(x, w, b=None, p=None, *, mask=None, seed=None, layer=0, step=None,
                     block=gyro.DEFAULT_BLOCK, num_subnets=gyro.DEFAULT_NUM_SUBNETS,
                     co_scheduled=gyro.DEFAULT_CO_SCHEDULED, period=gyro.DEFAULT_PERIOD,
                     schedule="consecutive"):
    """Input pruning: ``(y, saved)``, ``y = (x ⊙ m) @ w / q + b`` for ``x`` (..., K), ``w``
    (K, N), ``b`` (N,) or None, ``m`` the block-wise mask over x as (M, K): the dropped blocks
    are neither loaded nor multiplied, forward or backward."""
    xp = backend.get_array_module(x, w, b)
    mask = _mask_for("blockwise_linear", (_rows(x), x.shape[-1]), xp, p, mask,
                     dict(seed=seed, layer=layer, step=step, block=block,
                          num_subnets=num_subnets, co_scheduled=co_scheduled, period=period,
                          schedule=schedule))
    return block_masked_linear(x, w, b, mask)


blockwise_linear_backward = block_masked_linear_backward


class BlockwiseLinearOutSaved(NamedTuple):
    """The (M, K) input, the weight, the masked output, the mask, the activation, whether there
    was a bias and x's shape."""
    x: object
    w: object
    y: object
    mask: masks.BlockMask
    act: str | None
    has_bias: bool
    x_shape: tuple


def blockwise_linear_out(x, w, b=None, p=None, *, act=None, mask=None, seed=None, layer=0,
                         step=None, block=gyro.DEFAULT_BLOCK, num_subnets=gyro.DEFAULT_NUM_SUBNETS,
                         co_scheduled=gyro.DEFAULT_CO_SCHEDULED, period=gyro.DEFAULT_PERIOD,
                         schedule="consecutive"):
    """Output pruning: ``(y, saved)``, ``y = act(x @ w + b) ⊙ m / q`` of shape (..., N), ``m``
    the block-wise mask over the (M, N) output, ``act`` None or 'relu'. Dropped output blocks
    are never computed (sdd), and the backward GEMMs skip them too."""
    if act not in _ACTS:
        raise ValueError(f"blockwise_linear_out: act must be None or 'relu', got {act!r}")
    backend.get_array_module(x, w, b, getattr(mask, "bits", None))  # raises on mixed devices
    x2, w, b = check_linear("blockwise_linear_out", x, w, b)
    mask = _mask_for("blockwise_linear_out", (x2.shape[0], w.shape[1]),
                     backend.get_array_module(x), p, mask,
                     dict(seed=seed, layer=layer, step=step, block=block,
                          num_subnets=num_subnets, co_scheduled=co_scheduled, period=period,
                          schedule=schedule))
    # the epilogue computes act(scale · acc + bias): fold 1/q into the bias (relu commutes
    # with a positive scale)
    scale = 1.0 / mask.q
    bias = None if b is None else (b * b.dtype.type(scale)).astype(b.dtype)
    y = bsmm.sdd(x2, w, mask, scale, bias=bias, act=act)
    saved = BlockwiseLinearOutSaved(x2, w, y, mask, act, b is not None, x.shape)
    return y.reshape(x.shape[:-1] + (w.shape[1],)), saved


def blockwise_linear_out_backward(grad_out, saved):
    """``(gx, gw, gb)``; ``gb`` is None without a bias."""
    x, w, y, mask = saved.x, saved.w, saved.y, saved.mask
    xp = backend.get_array_module(grad_out, y)
    scale = 1.0 / mask.q
    g = grad_out.reshape(y.shape)
    if saved.act == "relu":  # y > 0 exactly where kept and active
        g = xp.where(y > 0, g, g.dtype.type(0))
    if bsmm.runs_dense("dsd", g, w.T, mask, scale):
        # No block-sparse kernel runs the products fast (block-wise gyro's 32-unit blocks on
        # Hopper): dsd and dsd_t would each mask a copy of g, and the bias sum a third. One
        # masked copy, and the Linear's backward on it.
        return linear_backward(masks.apply_block(g, mask, scale),
                               LinearSaved(x, w, saved.has_bias, saved.x_shape))
    # The GEMMs read only g's kept blocks and apply 1/q themselves; g needs masking only by the
    # activation and, for the bias sum, by the mask.
    if saved.act == "relu":
        gb = g.sum(axis=0) * g.dtype.type(scale) if saved.has_bias else None
    else:
        gb = apply_block_mask(g, mask).sum(axis=0) if saved.has_bias else None
    gx = bsmm.dsd(g, w.T, mask, scale).reshape(saved.x_shape)
    gw = xp.empty(w.shape, w.dtype)
    bsmm.dsd_t(g, x, mask, scale, out=gw.T)
    return gx, gw, gb
