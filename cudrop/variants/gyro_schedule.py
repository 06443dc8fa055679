"""Gyro dropout's schedule (Lee et al., MLSys 2022): which pre-selected sub-networks run at
which step, and their masks -- all pure functions of ``(seed, layer, step)``, so nothing is
stored and a run resumed at step ``t`` draws the masks it would have drawn.

Sub-networks. Sub-network ``s`` in ``[0, Σ)`` is a fixed mask over unit blocks: unit block
``u`` is kept iff the Philox word at ``(row=s, col=u, step=0, tag=TAG_GYRO)`` is
``>= threshold(p)``. Element gyro uses unit blocks of one unit, block-wise gyro blocks of ``Kb``
units. The draw does not depend on the step, which is what "pre-selected" means here: the Σ
masks exist implicitly and any of them is regenerated from its id. (Element and block-wise
sub-network ``s`` read the same words, over units or over unit blocks; a layer uses one kind.)

Consecutive schedule (the paper's). The Σ sub-networks form ``Σ/τ`` sets of τ; set
``j = step // period`` runs sub-networks ``(j mod Σ/τ) * τ + t`` in its slots ``t = 0..τ-1``.
Over ``Σ/τ`` consecutive sets every sub-network runs exactly once, for ``period`` consecutive
steps; after that the cycle repeats. τ must divide Σ (the random schedule does not need it).
``period = total_steps * τ / Σ`` (the paper's ``N τ / Σ``) makes one cycle span the run.
Ids are not permuted per cycle: the masks are i.i.d. draws already, so grouping sub-networks
``jτ..jτ+τ-1`` is as random as any other grouping, and a permutation would cost a host sort of
Σ numbers per set change.

Random schedule (the paper's §5.3 baseline). Each step, slot ``t`` runs sub-network
``floor(u_t * Σ)`` with ``u = philox.uniform(seed, layer, step, TAG_SCHEDULE, τ)``, computed
exactly in integers as ``(word * Σ) >> 32``. Slots may repeat a sub-network.

Placement. Element gyro splits the batch into τ contiguous row groups, group ``t`` runs slot
``t``; τ must divide the batch unless ``ragged`` (then group sizes differ by at most one).
Block-wise gyro works in row blocks of ``Mb`` rows (128): row block ``r`` at step ``t`` runs
slot ``(t * nRowBlocks + r) mod τ``, so when a batch has fewer row blocks than τ the τ
co-scheduled sub-networks span several iterations (the paper's Figure 3(b)). Block-wise needs
no divisibility: edge blocks are partial.

Decided on the device. Element gyro drawn with a *device step* (a 0-d uint32 CuPy array, as a
captured CUDA graph's layers get from ``StochasticLayer.next_step(device=True)``), or on CuPy
with an int step by ``variants.gyro.draw_mask(..., on_device=True)`` (``nn.GyroDropout``'s
eager steps), yields a ``GyroMask`` without ``keep`` and ``subnets`` but with its
``GyroDraw``: the kernels (``raw_kernels/gyro.cu`` over ``gyro.cuh``) compute the sub-networks
of the step and their keep bits (``gyro_keep_table``), then each row's group (row ``r`` of
``B`` is in group ``((r + 1) τ - 1) // B``, the group ``row_bounds`` gives it, ragged or not)
and mask it (``gyro_apply``), with the integer arithmetic above, so the result equals the host
mask's bit for bit. Block-wise gyro on CuPy decides each row block's sub-network on the
device too (``gyro_block_row_ids``, the slot rule above), then draws the mask's blocks with
those ids as ``masks.block_mask`` does on the host.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from .. import backend, masks, philox

SCHEDULES = ("consecutive", "random")
DEFAULT_NUM_SUBNETS = 1024
DEFAULT_CO_SCHEDULED = 8
DEFAULT_BLOCK = (128, 32)
# Without a period and without total_steps the sets change every step (a round-robin over the
# Σ/τ sets). That trains each sub-network as often as the paper's schedule does over Σ/τ
# steps, but not consecutively; pass total_steps (or a period) to get the paper's schedule.
DEFAULT_PERIOD = 1


def _check_int(name, v, low, high=None):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low or (
            high is not None and v > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bound}, got {v!r}")
    return int(v)


def check_schedule(schedule):
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return schedule


def check_subnets(num_subnets, co_scheduled, schedule="consecutive"):
    """``(Σ, τ)`` as ints, or ValueError: both positive, ``τ <= Σ``, and for the consecutive
    schedule ``τ`` divides ``Σ`` (the sets partition the sub-networks)."""
    check_schedule(schedule)
    # the sub-network id is the row coordinate of a Philox counter word: 32 bits
    sigma = _check_int("num_subnets", num_subnets, 1, 2 ** 32)
    tau = _check_int("co_scheduled", co_scheduled, 1)
    if tau > sigma:
        raise ValueError(f"co_scheduled (τ = {tau}) must be <= num_subnets (Σ = {sigma})")
    if schedule == "consecutive" and sigma % tau:
        raise ValueError(f"co_scheduled (τ = {tau}) must divide num_subnets (Σ = {sigma}) "
                         "for the consecutive schedule")
    return sigma, tau


check_block = masks.check_block


def resolve_period(num_subnets, co_scheduled, period=None, total_steps=None):
    """Steps each set of τ sub-networks runs: ``period`` if given, else
    ``max(1, total_steps * τ // Σ)`` (one cycle over the run), else ``DEFAULT_PERIOD``."""
    if period is not None:
        return _check_int("period", period, 1)
    if total_steps is not None:
        total_steps = _check_int("total_steps", total_steps, 1)
        return max(1, total_steps * int(co_scheduled) // int(num_subnets))
    return DEFAULT_PERIOD


def scheduled_subnets(step, *, num_subnets=DEFAULT_NUM_SUBNETS,
                      co_scheduled=DEFAULT_CO_SCHEDULED, period=DEFAULT_PERIOD,
                      schedule="consecutive", seed=0, layer=0):
    """The sub-network id of each of the τ slots at ``step``: int64 array of shape (τ,)."""
    sigma, tau = check_subnets(num_subnets, co_scheduled, schedule)
    step = _check_int("step", step, 0)
    if schedule == "consecutive":
        period = _check_int("period", period, 1)
        j = (step // period) % (sigma // tau)
        return np.arange(j * tau, (j + 1) * tau, dtype=np.int64)
    seed, layer = philox.check_seed("seed", seed), philox.check_seed("layer", layer)
    w = philox.words(seed, layer, step, philox.TAG_SCHEDULE, 0, np.arange(tau, dtype=np.uint64))
    # floor(u * Σ) in exact integers (w * Σ < 2**64 since Σ <= 2**32)
    return ((w.astype(np.uint64) * np.uint64(sigma)) >> np.uint64(32)).astype(np.int64)


def subnet_keep(subnets, n_blocks, p, *, seed, layer, xp=np):
    """(len(subnets), n_blocks) bool: row ``i`` is sub-network ``subnets[i]``'s keep mask over
    ``n_blocks`` unit blocks, on the device of ``xp``. On CuPy it is drawn by the block-mask
    kernel (one launch; bit-equal to the NumPy draw) rather than on the host and copied: the
    host Philox costs ~2 ms for 8 x 4096 units."""
    p = philox.check_prob(p)
    seed, layer = philox.check_seed("seed", seed), philox.check_seed("layer", layer)
    ids = np.asarray(subnets, dtype=np.int64)
    if xp is np:
        return philox.keep_grid(seed, layer, 0, philox.TAG_GYRO, len(ids), n_blocks, p,
                                row_ids=ids)
    m = masks.block_mask((len(ids), n_blocks), (1, 1), p, seed=seed, layer=layer, step=0, xp=xp,
                         row_ids=ids, tag=philox.TAG_GYRO)
    return m.keep_blocks()


def row_block_subnets(step, n_row_blocks, subnets, offset=0, total=None):
    """Sub-network id per row block: row block ``r`` runs slot ``(step * n + r) mod τ``. With a
    data-parallel shard the ``n_row_blocks`` are blocks ``offset ..`` of a global batch of
    ``total`` row blocks, whose ``n`` and ``r`` the rule reads."""
    subnets = np.asarray(subnets, dtype=np.int64)
    tau = len(subnets)
    total = int(n_row_blocks) if total is None else int(total)
    first = (int(step) * total + int(offset)) % tau  # Python ints: no overflow at large steps
    return subnets[(first + np.arange(n_row_blocks)) % tau]


class GyroDraw(NamedTuple):
    """Where a gyro mask decided on the device comes from: the Philox key ``(seed, layer)``,
    the ``step`` (a device step, a 0-d uint32 CuPy array read by the kernels when they run, as
    a captured step draws; or an int, passed to them by value, as ``nn.GyroDropout``'s eager
    steps on CuPy draw), the units it masks (0 where none: block-wise gyro's row-block
    schedule), the schedule, and ``device``, where the arrays it masks live (``'gpu'`` or
    ``'cpu'``; None: the step's), which is where :meth:`GyroMask.host` draws (a name, not an
    array module, so a mask copies and pickles)."""
    seed: int
    layer: int
    step: object
    n_units: int
    num_subnets: int
    co_scheduled: int
    period: int
    schedule: str
    device: str | None = None


@dataclass(frozen=True)
class GyroMask:
    """The unit masks of the τ slots of one step: ``keep[t]`` (bool, on the device) is the mask
    of sub-network ``subnets[t]``, applied to row group ``t`` of the batch.

    A mask decided on the device (drawn with a device step, as a captured CUDA graph's layers
    draw, or with ``on_device=True``, as ``nn.GyroDropout``'s eager steps on CuPy draw) has
    ``keep`` and ``subnets`` None and ``draw``, a :class:`GyroDraw`: the kernels
    (``raw_kernels/gyro.cu``) compute both from it when they run; :meth:`host` turns it into the
    form with ``keep`` and ``subnets`` (reading a device step)."""

    keep: object       # (τ, N) bool, or None when decided on the device
    subnets: tuple     # (τ,) host ints, or None when decided on the device
    p: float
    #: ``(offset, total)``: the batch is rows ``offset ..`` of a global batch of ``total`` rows
    #: whose row groups the slots follow (data parallelism); None: the batch is the whole.
    rows: tuple | None = None
    draw: GyroDraw | None = None

    @property
    def q(self):
        return 1.0 - self.p

    @property
    def on_device(self) -> bool:
        """True when the sub-networks are decided on the device (``keep`` is None)."""
        return self.keep is None

    @property
    def n_units(self):
        return self.draw.n_units if self.keep is None else self.keep.shape[1]

    @property
    def co_scheduled(self):
        return self.draw.co_scheduled if self.keep is None else self.keep.shape[0]

    def host(self) -> "GyroMask":
        """This mask with ``keep`` and ``subnets`` decided on the host: itself when they are,
        else the mask :func:`gyro_mask` draws at the int value of the step, ``keep`` on the
        arrays' device (``draw.device``; the step's where None). The kernels' result equals
        it bit for bit. Reading a device step waits for the device, and the draw costs a host
        schedule and a keep-bit launch: for references, tests and inspection, never inside a
        captured step."""
        if self.keep is not None:
            return self
        d = self.draw
        xp = backend.get_array_module(d.step) if d.device is None else backend.xp_for(d.device)
        m = gyro_mask(d.n_units, self.p, step=int(d.step), seed=d.seed, layer=d.layer,
                      num_subnets=d.num_subnets, co_scheduled=d.co_scheduled, period=d.period,
                      schedule=d.schedule, xp=xp)
        return replace(m, rows=self.rows)

    def row_bounds(self, batch, ragged=False):
        """``[(start, stop)]`` of the τ contiguous row groups of a batch of ``batch`` rows.
        Unless ``ragged``, τ must divide the batch; with ``ragged`` the groups' sizes differ by
        at most one (group ``t`` is rows ``[t B // τ, (t+1) B // τ)``, empty when B < τ). With
        ``rows = (offset, total)`` the groups are those of the global batch of ``total`` rows,
        cut to this batch's rows ``[offset, offset + batch)`` and counted from its first row."""
        tau = self.co_scheduled
        offset, total = (0, batch) if self.rows is None else self.rows
        if offset + batch > total:
            raise ValueError(f"rows {offset}..{offset + batch} of a batch lie outside the "
                             f"global batch of {total} rows")
        if total % tau and not ragged:
            what = "batch size" if self.rows is None else "global batch size (all ranks)"
            raise ValueError(f"co_scheduled (τ = {tau}) must divide the {what} ({total}) for "
                             "gyro dropout's row groups; use a batch size that τ divides, "
                             "drop_last=True, or ragged=True")
        out = []
        for t in range(tau):
            a = min(max(t * total // tau - offset, 0), batch)
            b = min(max((t + 1) * total // tau - offset, 0), batch)
            out.append((a, max(a, b)))
        return out

    def to_dense(self, shape, unit_axis=None, ragged=False):
        """Bool array of ``shape`` (for tests and reference paths; a mask decided on the
        device is read back first, :meth:`host`)."""
        keep = self.host().keep
        xp = backend.get_array_module(keep)
        ax = unit_axis_of(shape, unit_axis)
        if shape[ax] != self.n_units:
            raise ValueError(f"x has {shape[ax]} units on axis {ax}, the mask {self.n_units}")
        out = xp.zeros(shape, dtype=bool)
        row_shape = [1] * (len(shape) - 1)  # one row's shape, units on their axis
        row_shape[ax - 1] = self.n_units
        for t, (a, b) in enumerate(self.row_bounds(shape[0], ragged)):
            out[a:b] = keep[t].reshape(row_shape)
        return out


def unit_axis_of(shape, unit_axis=None):
    """The units axis: ``unit_axis`` if given, else channels (1) for 4-D (N, C, H, W) conv
    activations and the last axis otherwise. Axis 0 is always the batch."""
    nd = len(shape)
    if nd < 2:
        raise ValueError(f"gyro dropout needs x with a batch axis and a units axis (ndim >= 2), "
                         f"got shape {tuple(shape)}")
    if unit_axis is None:
        return 1 if nd == 4 else nd - 1
    ax = _check_int("unit_axis", unit_axis, -nd, nd - 1) % nd
    if ax == 0:
        raise ValueError("unit_axis must not be the batch axis 0")
    return ax


def gemm_shape(shape):
    """(M, K) of an activation of shape (..., K) viewed as a GEMM operand: every leading axis
    is a row (samples, or tokens of a sequence), units on the last axis."""
    if len(shape) < 2:
        raise ValueError(f"block-wise dropout needs x of shape (..., rows, units), got "
                         f"{tuple(shape)}")
    m = 1
    for s in shape[:-1]:
        m *= int(s)
    return m, int(shape[-1])


def gyro_mask(n_units, p, *, step, seed=0, layer=0, num_subnets=DEFAULT_NUM_SUBNETS,
              co_scheduled=DEFAULT_CO_SCHEDULED, period=DEFAULT_PERIOD,
              schedule="consecutive", xp=np) -> GyroMask:
    """The element gyro mask of ``step``: τ unit masks over ``n_units`` units."""
    n_units = _check_int("n_units", n_units, 1)
    ids = scheduled_subnets(step, num_subnets=num_subnets, co_scheduled=co_scheduled,
                            period=period, schedule=schedule, seed=seed, layer=layer)
    keep = subnet_keep(ids, n_units, p, seed=seed, layer=layer, xp=xp)
    return GyroMask(keep, tuple(int(i) for i in ids), float(p))


def blockwise_row_ids(step, n_rows, *, block=DEFAULT_BLOCK, num_subnets=DEFAULT_NUM_SUBNETS,
                      co_scheduled=DEFAULT_CO_SCHEDULED, period=DEFAULT_PERIOD,
                      schedule="consecutive", seed=0, layer=0, row_block_offset=0,
                      total_row_blocks=None):
    """Sub-network id of each row block of an ``n_rows``-row batch at ``step``; with a
    data-parallel shard, of row blocks ``row_block_offset ..`` of a global batch of
    ``total_row_blocks`` (``row_block_subnets``)."""
    mb, _ = check_block(block)
    n_row_blocks = -(-_check_int("n_rows", n_rows, 1) // mb)
    ids = scheduled_subnets(step, num_subnets=num_subnets, co_scheduled=co_scheduled,
                            period=period, schedule=schedule, seed=seed, layer=layer)
    return row_block_subnets(step, n_row_blocks, ids, row_block_offset, total_row_blocks)


def blockwise_mask(shape, p, *, step, seed=0, layer=0, block=DEFAULT_BLOCK,
                   num_subnets=DEFAULT_NUM_SUBNETS, co_scheduled=DEFAULT_CO_SCHEDULED,
                   period=DEFAULT_PERIOD, schedule="consecutive", xp=np, row_block_offset=0,
                   total_row_blocks=None) -> masks.BlockMask:
    """The block-wise gyro mask of ``step`` over an (M, K) operand, as a ``BlockMask`` (bits
    and kept-block lists): row block ``r`` carries the unit-block mask of its sub-network. Edge
    blocks are partial when the shape does not divide. A data-parallel rank passes its
    ``row_block_offset`` in the global batch of ``total_row_blocks``.

    On CuPy the row blocks' sub-networks are decided on the device (two launches: the ids, then
    the block-mask draw), and ``step`` may be a device step (a 0-d uint32 CuPy array, read when
    the kernels run), so a captured CUDA graph's replays draw each step's mask; the result
    equals the host schedule's bit for bit."""
    block = check_block(block)
    if len(shape) != 2:
        raise ValueError(f"shape must be (M, K), got {tuple(shape)}")
    if xp is np:
        ids = blockwise_row_ids(philox.check_host_step(step, "blockwise gyro dropout"), shape[0],
                                block=block, num_subnets=num_subnets,
                                co_scheduled=co_scheduled, period=period, schedule=schedule,
                                seed=seed, layer=layer, row_block_offset=row_block_offset,
                                total_row_blocks=total_row_blocks)
    else:
        ids = _device_row_ids(xp, step, -(-_check_int("n_rows", shape[0], 1) // block[0]),
                              num_subnets=num_subnets, co_scheduled=co_scheduled, period=period,
                              schedule=schedule, seed=seed, layer=layer,
                              row_block_offset=row_block_offset, total_row_blocks=total_row_blocks)
    return rows_mask(shape, p, ids, seed=seed, layer=layer, block=block, xp=xp)


def rows_mask(shape, p, row_ids, *, seed=0, layer=0, block=DEFAULT_BLOCK, xp=np):
    """The block-wise gyro ``BlockMask`` over (M, K) whose row block ``r`` runs sub-network
    ``row_ids[r]`` (from :func:`blockwise_row_ids`, or its device twin): each sub-network's
    unit-block mask is row ``row_ids[r]`` of the TAG_GYRO grid at step 0."""
    return masks.block_mask(shape, check_block(block), p, seed=seed, layer=layer, step=0, xp=xp,
                            row_ids=row_ids, tag=philox.TAG_GYRO)


def _device_row_ids(xp, step, n_row_blocks, *, num_subnets, co_scheduled, period, schedule,
                    seed, layer, row_block_offset, total_row_blocks):
    """``blockwise_row_ids`` on the device: a (n_row_blocks,) uint32 CuPy array written by
    ``gyro_block_row_ids`` (raw_kernels/gyro.cu), every argument checked as the host path
    checks it."""
    from ..raw_kernels import kernel
    sigma, tau = check_subnets(num_subnets, co_scheduled, schedule)
    step = philox.check_step(step, xp)
    # the random schedule reads no period
    period = _check_int("period", period, 1) if schedule == "consecutive" else 1
    seed, layer = philox.check_seed("seed", seed), philox.check_seed("layer", layer)
    offset = _check_int("row_block_offset", row_block_offset, 0)
    total = n_row_blocks if total_row_blocks is None else _check_int(
        "total_row_blocks", total_row_blocks, 1)
    ids = xp.empty(n_row_blocks, np.uint32)
    kernel("gyro.cu", "gyro_block_row_ids")(
        (-(-n_row_blocks // 128),), (128,),
        (ids, np.int64(n_row_blocks), np.uint64(offset % tau), np.uint64(total % tau))
        + kernel_schedule_args(GyroDraw(seed, layer, step, 0, sigma, tau, period, schedule)))
    return ids


def kernel_schedule_args(draw):
    """The schedule of a :class:`GyroDraw` as gyro.cu's kernels take it, in their order: seed,
    layer, the step (by value and as the device pointer, ``philox.step_args``), Σ, τ, the
    period and the random flag. Steps are below 2**32, so a longer period runs the first set
    for the whole run, as 2**32 does: it is passed capped."""
    step_value, step_ptr = philox.step_args(draw.step)
    return (np.uint32(draw.seed), np.uint32(draw.layer), step_value, step_ptr,
            np.uint64(draw.num_subnets), np.uint64(draw.co_scheduled),
            np.uint64(min(draw.period, 2 ** 32)), np.int32(draw.schedule == "random"))
