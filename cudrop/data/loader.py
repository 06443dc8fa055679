"""Batch iterators. Shuffles and windows are pure functions of (seed, epoch) or (seed, step),
so a run resumed from a checkpoint sees the same batches it would have seen.

Sharded (data-parallel) loading: with ``rank`` and ``world_size`` the iterators walk the same
global batches as one process would, and each rank takes its ``batch_size / world_size``
consecutive rows of every global batch, in rank order: the ranks' batches are disjoint, and
concatenated in rank order they are the one-process batch. Every rank holds as many rows
(``cudrop.nn.set_shard`` relies on it): a short last batch is cut to a multiple of
``world_size`` rows (fewer than ``world_size`` samples of the epoch are left out; none with
``drop_last``, and none when the world size divides the data).
"""
from __future__ import annotations

import numpy as np

from .. import backend

__all__ = ["batches", "num_batches", "text_batches", "sequential_text_batches"]


def _check_int(name, v, low):
    if isinstance(v, bool) or int(v) != v or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    return int(v)


def num_batches(n: int, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
    """Batches per epoch of ``n`` samples in global batches of ``batch_size`` (with
    ``world_size`` ranks, a short last batch counts only if it has a row for every rank)."""
    batch_size = _check_int("batch_size", batch_size, 1)
    world_size = _check_int("world_size", world_size, 1)
    full, rest = divmod(int(n), batch_size)
    return full + (0 if drop_last or rest < world_size else 1)


def check_shard(batch_size, rank, world_size):
    """``(rank, world_size)`` checked against each other and ``batch_size`` (the global batch,
    which the world size must divide)."""
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank {rank} is not below world_size {world_size}")
    if batch_size % world_size:
        raise ValueError(f"the global batch size {batch_size} is not a multiple of world_size "
                         f"{world_size}: every rank must hold as many rows")
    return rank, world_size


def _rank_rows(idx, rank, world_size):
    share = len(idx) // world_size
    return idx[rank * share:(rank + 1) * share]


def _take(a, idx, device):
    if backend.is_gpu_array(a):
        idx = backend.cupy.asarray(idx)
    return backend.to_device(a[idx], device)


def batches(x, y=None, batch_size: int = 64, *, shuffle: bool = True, seed: int = 0,
            epoch: int = 0, device: str = "cpu", drop_last: bool = False, start: int = 0,
            rank: int = 0, world_size: int = 1):
    """Yield ``(xb, yb)`` raw arrays on ``device`` ('cpu', 'gpu', 'auto'); ``yb`` is None
    without ``y``. Each epoch visits every sample once (the last batch may be short unless
    ``drop_last``); the order is a permutation drawn from ``(seed, epoch)``. ``start`` skips
    the epoch's first batches without gathering them (a run resumed mid-epoch).

    ``rank`` / ``world_size``: yield rank ``rank``'s ``batch_size / world_size`` rows of each
    global batch of ``batch_size`` (see the module docstring).

    Batches are gathered where ``x`` lives and then copied: for small data, move ``x`` and
    ``y`` to the GPU once (backend.to_device) so the gather runs there.
    """
    n = len(x)
    if y is not None and len(y) != n:
        raise ValueError(f"x has {n} samples but y has {len(y)}")
    batch_size = _check_int("batch_size", batch_size, 1)
    rank, world_size = check_shard(batch_size, rank, world_size)
    device = backend.resolve_device(device)
    order = (np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle
             else np.arange(n))
    stop = num_batches(n, batch_size, drop_last, world_size) * batch_size
    start = _check_int("start", start, 0)

    def gen():
        for i in range(start * batch_size, stop, batch_size):
            idx = order[i:i + batch_size]
            if world_size > 1:
                idx = _rank_rows(idx, rank, world_size)
            yield _take(x, idx, device), (None if y is None else _take(y, idx, device))
    return gen()


def _window_batch(tokens, starts, block_size, device):
    xp = backend.get_array_module(tokens)
    idx = xp.asarray(starts)[:, None] + xp.arange(block_size)[None, :]
    return backend.to_device(tokens[idx], device), backend.to_device(tokens[idx + 1], device)


def text_batches(tokens, block_size: int, batch_size: int, steps: int, *, seed: int = 0,
                 start_step: int = 0, device: str = "cpu", rank: int = 0, world_size: int = 1):
    """Yield ``steps`` batches ``(x, y)`` of ``batch_size`` random windows of ``tokens``, each
    ``(batch_size, block_size)`` with ``y[:, t] = x[:, t + 1]`` in the text (next-token
    targets). The windows of step ``s`` depend only on ``(seed, s)``; steps run from
    ``start_step`` (pass the step count to resume, or ``epoch * steps`` for epochs).
    ``rank`` / ``world_size``: rank ``rank``'s ``batch_size / world_size`` windows of each
    global batch."""
    block_size = _check_int("block_size", block_size, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    rank, world_size = check_shard(batch_size, rank, world_size)
    steps = _check_int("steps", steps, 0)
    start_step = _check_int("start_step", start_step, 0)
    if len(tokens) < block_size + 1:
        raise ValueError(f"tokens has {len(tokens)} entries, need at least block_size + 1 = "
                         f"{block_size + 1}")
    device = backend.resolve_device(device)
    high = len(tokens) - block_size  # exclusive bound on starts, so start + block_size is valid

    def gen():
        for s in range(start_step, start_step + steps):
            starts = np.random.default_rng([int(seed), s]).integers(0, high, size=batch_size)
            if world_size > 1:
                starts = _rank_rows(starts, rank, world_size)
            yield _window_batch(tokens, starts, block_size, device)
    return gen()


def sequential_text_batches(tokens, block_size: int, batch_size: int, device: str = "cpu"):
    """Yield non-overlapping windows in order, covering ``tokens`` once (for evaluation); the
    last batch may be short, a tail shorter than ``block_size + 1`` is dropped."""
    block_size = _check_int("block_size", block_size, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    device = backend.resolve_device(device)
    starts = np.arange(0, len(tokens) - block_size, block_size)

    def gen():
        for i in range(0, len(starts), batch_size):
            yield _window_batch(tokens, starts[i:i + batch_size], block_size, device)
    return gen()
