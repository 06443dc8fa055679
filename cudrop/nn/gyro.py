"""Gyro dropout and block-wise gyro dropout layers (Lee et al., MLSys 2022).

Both are stochastic layers: each training forward takes one step from the counter
(``next_step``), and the mask of that step is a pure function of ``(seed, layer, step)``
and the schedule parameters (``cudrop.variants.gyro_schedule``), so a run resumed from a state_dict (which saves
the counter) draws the same masks. Eval mode and ``p == 0`` are the identity.

Each layer keeps the mask of its last forward in ``last_mask`` (a ``GyroMask`` or a
``BlockMask``): the block-sparse GEMM of the next layer will read the ``BlockMask`` from there.
On NumPy the mask is drawn on the host and memoised for the next step: under the consecutive
schedule the sub-networks of a step repeat for ``period`` steps, and redrawing them costs a
host Philox pass. The memo is keyed by everything the mask depends on, so it never changes a
result; it is not state (not saved, not needed to resume).

CuPy inputs: decided on the device, eagerly and in CUDA graphs (``cudrop.graph``) alike. Both
layers ask for ``next_step(device=True)``: eagerly that is the same int (passed to the kernels
by value), inside a capture a device step (read by them at every replay).
``GyroDropout``: one kernel derives the step's sub-networks and their keep bits (a (τ, units /
32) table), another each row's group and ``x * keep / q`` in one pass, forward and backward
(``raw_kernels/gyro.cu``): no host draw, no upload of sub-network ids, no memo needed. Its
``last_mask`` is then a ``GyroMask`` decided on the device (``on_device``; ``keep`` and
``subnets`` None, its ``draw`` says how): ``last_mask.host()`` gives the host form (the step's
``subnets`` and ``keep`` on the input's device, bit-equal to what the kernels applied; it costs
a host schedule and a launch, and for a captured mask a read of the device step).
``BlockwiseDropout`` (and ``BlockwiseLinear``) decide each row block's sub-network on the
device and draw the ``BlockMask``'s bits and kept-block lists there
(``gyro_schedule.blockwise_mask``): the replays' GEMMs read the replay's step's blocks.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .. import autograd as ag
from .. import backend
from ..variants import gyro as Fg
from ..variants import gyro_schedule as gyro
from ..autograd.tensor import as_tensor
from ..philox import check_prob
from .layers import Linear
from .stochastic import StochasticLayer


class _GyroBase(StochasticLayer):
    def __init__(self, *, p, num_subnets, co_scheduled, period, total_steps, schedule, seed,
                 layer):
        super().__init__()
        self.init_rng(seed, layer)
        self.p = check_prob(p)
        self.num_subnets, self.co_scheduled = gyro.check_subnets(num_subnets, co_scheduled,
                                                                 schedule)
        self.schedule = schedule
        self.period_given = period is not None
        self.set_total_steps(total_steps, period)
        self.last_mask = None
        self._memo = (None, None)

    def set_total_steps(self, total_steps, period=None):
        """Resolve the period from the run's length (unless it was given explicitly). The
        period is saved in ``state_dict``: the masks depend on it."""
        if period is None and self.period_given:
            return
        self.register_counter("period", gyro.resolve_period(self.num_subnets, self.co_scheduled,
                                                            period, total_steps))

    def _sched(self):
        return dict(num_subnets=self.num_subnets, co_scheduled=self.co_scheduled,
                    period=self.period, schedule=self.schedule, seed=self.seed,
                    layer=self.layer)

    def _memoised(self, key, draw):
        if self._memo[0] != key:
            self._memo = (key, draw())
        return self._memo[1]

    def extra_repr(self):
        return (f"p={self.p}, num_subnets={self.num_subnets}, co_scheduled={self.co_scheduled}, "
                f"period={self.period}, schedule={self.schedule!r}, " + super().extra_repr())


class GyroDropout(_GyroBase):
    """Gyro dropout: ``num_subnets`` (Σ) pre-selected unit masks, ``co_scheduled`` (τ) per step,
    one per contiguous row group of the batch; each set of τ runs ``period`` consecutive steps
    (default ``total_steps * τ // Σ``, so each sub-network runs once over the run; with neither
    given, ``gyro.DEFAULT_PERIOD``). ``schedule='random'`` is the paper's baseline that draws τ
    of the Σ sub-networks anew each step.

    Units are channels for 4-D (N, C, H, W) input and the last axis otherwise (``unit_axis``
    overrides). τ must divide the batch unless ``ragged=True``, which splits a batch that τ
    does not divide (a short last batch) into groups whose sizes differ by one.

    ``last_mask`` is the ``GyroMask`` of the last training forward: on NumPy with ``keep`` and
    ``subnets``; on CuPy decided on the device (eagerly too), its host form from
    ``last_mask.host()``. On CuPy inputs the layer can be captured in a CUDA graph
    (``cudrop.graph``): the replays decide the sub-networks on the device from the replay's
    step, as the eager steps do from theirs.
    """

    def __init__(self, p=0.5, *, num_subnets=gyro.DEFAULT_NUM_SUBNETS,
                 co_scheduled=gyro.DEFAULT_CO_SCHEDULED, period=None, total_steps=None,
                 schedule="consecutive", seed=0, layer=None, unit_axis=None, ragged=False):
        super().__init__(p=p, num_subnets=num_subnets, co_scheduled=co_scheduled, period=period,
                         total_steps=total_steps, schedule=schedule, seed=seed, layer=layer)
        self.unit_axis = unit_axis
        self.ragged = bool(ragged)

    def forward(self, x):
        if not self.is_training or self.p == 0:
            return x
        x = as_tensor(x)
        ax = gyro.unit_axis_of(x.shape, self.unit_axis)
        xp = backend.get_array_module(x.data)
        device = xp is not np
        step = self.next_step(device=device)
        sched = self._sched()
        rows = self.global_rows(x.shape[0]) if self.shard.world_size > 1 else None
        if device:
            # Decided on the device, eagerly (an int step, by value) as in a capture (a device
            # step, read at every replay): the same kernels, so replays equal eager steps, and
            # both equal the host draw bit for bit (tests/test_gyro_device.py). The eager
            # launches also load the kernels before a capture needs them.
            self.last_mask = replace(Fg.draw_mask(x.shape[ax], self.p, step=step, xp=xp,
                                                  on_device=True, **sched), rows=rows)
        else:
            ids = tuple(int(i) for i in gyro.scheduled_subnets(step, **sched))
            key = (ids, x.shape[ax], self.p, self.seed, self.layer)
            keep = self._memoised(key, lambda: gyro.subnet_keep(
                ids, x.shape[ax], self.p, seed=self.seed, layer=self.layer))
            self.last_mask = gyro.GyroMask(keep, ids, self.p, rows)
        return ag.gyro_dropout(x, mask=self.last_mask, unit_axis=ax, ragged=self.ragged)


class BlockwiseDropout(_GyroBase):
    """Block-wise gyro dropout: x of shape (..., K) is viewed as (M, K) (every leading axis a
    row, as a GEMM sees it); rows in blocks of ``block[0]`` (128), units in blocks of
    ``block[1]`` (32). Row block ``r`` at step ``t`` runs co-scheduled slot
    ``(t * nRowBlocks + r) mod τ``, so with fewer row blocks than τ the co-scheduled
    sub-networks span iterations (the paper's Figure 3(b)). The mask is a ``BlockMask``
    (``last_mask``) that a block-skipping GEMM can consume."""

    def __init__(self, p=0.5, *, num_subnets=gyro.DEFAULT_NUM_SUBNETS,
                 co_scheduled=gyro.DEFAULT_CO_SCHEDULED, block=gyro.DEFAULT_BLOCK, period=None,
                 total_steps=None, schedule="consecutive", seed=0, layer=None):
        super().__init__(p=p, num_subnets=num_subnets, co_scheduled=co_scheduled, period=period,
                         total_steps=total_steps, schedule=schedule, seed=seed, layer=layer)
        self.block = gyro.check_block(block)

    def forward(self, x):
        mask = self.next_mask(x)
        return x if mask is None else ag.blockwise_dropout(x, mask=mask)

    def next_mask(self, x, units=None):
        """Take a step and return its ``BlockMask`` over x viewed as (M, K), or None in eval
        mode or at p == 0 (the identity). A following Linear calls this instead of forward, to
        run its GEMMs on the kept blocks only (``nn.dropped_linear``); a preceding one passes
        its input and ``units`` (its output width) to get the mask of its output (M, units)."""
        self.last_mask = None
        if not self.is_training or self.p == 0:
            return None
        data = as_tensor(x).data
        xp = backend.get_array_module(data)
        device = xp is not np
        step = self.next_step(device=device)
        shape = gyro.gemm_shape(data.shape)
        if units is not None:
            shape = (shape[0], units)
        sched = self._sched()
        # this rank's row blocks of the global batch (the slot rule reads global indices)
        off, total = self.global_rows(-(-shape[0] // self.block[0]))
        sched.update(row_block_offset=off, total_row_blocks=total)
        if device:  # decided on the device (two launches), a capture's replays included
            self.last_mask = gyro.blockwise_mask(shape, self.p, step=step, block=self.block,
                                                 xp=xp, **sched)
            return self.last_mask
        ids = gyro.blockwise_row_ids(step, shape[0], block=self.block, **sched)
        key = (tuple(ids.tolist()), shape, self.block, self.p, self.seed, self.layer)
        self.last_mask = self._memoised(key, lambda: gyro.rows_mask(
            shape, self.p, ids, seed=self.seed, layer=self.layer, block=self.block))
        return self.last_mask

    def extra_repr(self):
        return f"block={self.block}, " + super().extra_repr()


class BlockwiseLinear(Linear):
    """A Linear (parameters named and initialised as a plain Linear's) with block-wise gyro
    dropout fused into its GEMMs, computed on the kept blocks only.

    ``mode='input'``: its *input* units are dropped, ``(drop(x)) @ W + b`` (input pruning: the
    dropped K-blocks are skipped by dsd forward, sdd and dsd_t backward). ``mode='output'``: its
    *output* units are dropped after ``act`` (None or 'relu'), ``drop(act(x @ W + b))`` (output
    pruning: sdd forward, dsd/dsd_t backward). The schedule lives in ``drop`` (a
    ``BlockwiseDropout``; ``**blockwise`` are its options), its last mask in ``drop.last_mask``.
    """

    def __init__(self, in_features, out_features, p=0.5, *, mode="input", act=None, bias=True,
                 rng=None, dtype=np.float32, **blockwise):
        super().__init__(in_features, out_features, bias=bias, rng=rng, dtype=dtype)
        if mode not in ("input", "output"):
            raise ValueError(f"mode must be 'input' or 'output', got {mode!r}")
        if act not in (None, "relu") or (act is not None and mode == "input"):
            raise ValueError(f"act must be None, or 'relu' with mode='output', got {act!r} with "
                             f"mode={mode!r}")
        self.mode, self.act = mode, act
        self.drop = BlockwiseDropout(p, **blockwise)

    def forward(self, x):
        if self.mode == "input":
            mask = self.drop.next_mask(x)
            if mask is None:
                return super().forward(x)
            return ag.blockwise_linear(x, self.weight, self.bias, mask=mask)
        mask = self.drop.next_mask(x, self.out_features)
        if mask is None:
            y = super().forward(x)
            return ag.relu(y) if self.act == "relu" else y
        return ag.blockwise_linear_out(x, self.weight, self.bias, mask=mask, act=self.act)

    def extra_repr(self):
        return f"{super().extra_repr()}, mode={self.mode!r}, act={self.act!r}"
