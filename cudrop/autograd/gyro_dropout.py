"""Gyro and block-wise gyro dropout as autograd ops: thin wrappers over
``cudrop.functional.gyro``, with the masks drawn by the schedule of ``cudrop.gyro``.

Named ``gyro_dropout.py``, not ``gyro.py``: ``cudrop/__init__`` star-imports this package, whose
submodule attributes travel with it, so an ``autograd.gyro`` would replace ``cudrop.gyro`` (the
schedule module). Here the function ``gyro_dropout`` shadows the submodule, as ``dropout`` does.
"""
from __future__ import annotations

from .. import backend
from ..variants import gyro_schedule as gyro
from ..variants import gyro as F
from ..philox import check_prob
from . import mode
from .function import Function
from .tensor import as_tensor

__all__ = ["gyro_dropout", "gyro_dropout_masked", "blockwise_dropout",
           "blockwise_dropout_masked"]


class GyroDropout(Function):
    def __init__(self, mask, unit_axis, ragged):
        self.args = mask, dict(unit_axis=unit_axis, ragged=ragged)

    def forward(self, x):
        mask, kw = self.args
        y, self.saved = F.gyro_dropout(x, mask, **kw)
        return y

    def backward(self, g):
        return F.gyro_dropout_backward(g, self.saved)


class BlockwiseDropout(Function):
    """Leading axes are rows (the GEMM view): x of shape (..., K) is masked as (M, K)."""

    def __init__(self, mask):
        self.mask = mask

    def forward(self, x):
        y, self.saved = F.blockwise_dropout(x.reshape(-1, x.shape[-1]), self.mask)
        return y.reshape(x.shape)

    def backward(self, g):
        gx = F.blockwise_dropout_backward(g.reshape(-1, g.shape[-1]), self.saved)
        return gx.reshape(g.shape)


def gyro_dropout_masked(x, mask, *, unit_axis=None, ragged=False):
    """Apply a given ``cudrop.gyro.GyroMask`` (differentiable in ``x``)."""
    return GyroDropout(mask, unit_axis, ragged)(x)


def blockwise_dropout_masked(x, mask):
    """Apply a given ``cudrop.masks.BlockMask`` over x viewed as (M, K) with every leading axis
    a row (differentiable in ``x``)."""
    return BlockwiseDropout(mask)(x)


def _prelude(p, training, num_subnets, co_scheduled, schedule, period, total_steps):
    """Validated ``(p, period)`` and whether the op acts (training and ``p > 0``)."""
    p = check_prob(p)
    gyro.check_subnets(num_subnets, co_scheduled, schedule)
    period = gyro.resolve_period(num_subnets, co_scheduled, period, total_steps)
    if training is None:
        training = mode.is_training()
    return p, period, bool(training) and p > 0


def gyro_dropout(x, p=0.5, training=None, *, num_subnets=gyro.DEFAULT_NUM_SUBNETS,
                 co_scheduled=gyro.DEFAULT_CO_SCHEDULED, period=None, total_steps=None,
                 schedule="consecutive", seed=0, layer=0, step=0, unit_axis=None, ragged=False):
    """Gyro dropout (Lee et al. 2022) at ``step``: Σ = ``num_subnets`` pre-selected unit masks,
    τ = ``co_scheduled`` of them per step, one per contiguous row group of the batch; each set
    runs ``period`` consecutive steps (see ``cudrop.gyro`` for the schedule and
    ``gyro.resolve_period`` for the default). Inverted scaling; the identity (``x`` itself)
    when not training or ``p == 0``; ``training`` None follows ``mode.is_training()``.
    """
    p, period, active = _prelude(p, training, num_subnets, co_scheduled, schedule, period,
                                 total_steps)
    x = as_tensor(x)
    if not active:
        return x
    ax = gyro.unit_axis_of(x.shape, unit_axis)
    mask = gyro.gyro_mask(x.shape[ax], p, step=step, seed=seed, layer=layer,
                          num_subnets=num_subnets, co_scheduled=co_scheduled, period=period,
                          schedule=schedule, xp=backend.get_array_module(x.data))
    return GyroDropout(mask, ax, ragged)(x)


def blockwise_dropout(x, p=0.5, training=None, *, block=gyro.DEFAULT_BLOCK,
                      num_subnets=gyro.DEFAULT_NUM_SUBNETS,
                      co_scheduled=gyro.DEFAULT_CO_SCHEDULED, period=None, total_steps=None,
                      schedule="consecutive", seed=0, layer=0, step=0):
    """Block-wise gyro dropout at ``step``: x of shape (..., K) viewed as (M, K) rows x units,
    rows in blocks of ``block[0]``, units in blocks of ``block[1]``; each row block carries the
    unit-block mask of one scheduled sub-network. The identity when not training or
    ``p == 0``."""
    block = gyro.check_block(block)
    p, period, active = _prelude(p, training, num_subnets, co_scheduled, schedule, period,
                                 total_steps)
    x = as_tensor(x)
    if not active:
        return x
    mask = gyro.blockwise_mask(gyro.gemm_shape(x.shape), p, step=step, seed=seed, layer=layer,
                               block=block, num_subnets=num_subnets, co_scheduled=co_scheduled,
                               period=period, schedule=schedule,
                               xp=backend.get_array_module(x.data))
    return BlockwiseDropout(mask)(x)
