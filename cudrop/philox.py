"""Philox4x32-10 (Salmon et al., SC'11), vectorised in NumPy, and the coordinate convention
every cudrop mask uses.

A mask is a pure function of ``(seed, layer, step, tag, row, col)``: the key is
``(seed, layer)``, the counter is ``(col // 4, row, step, tag)`` and the call's four words serve
four consecutive columns (word ``col % 4``), so a GPU thread draws once for a vector load of
four elements.

``raw_kernels/philox.cuh`` implements the same function; tests check the two bit for bit and
against the Random123 known-answer vectors. ``keep = word >= threshold(p)``: an integer compare,
so CPU and GPU agree exactly and P(keep) = 1 - threshold / 2**32.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import backend

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85

# Purposes: the counter's last word, so that two uses of one (seed, layer, step) are independent.
TAG_ELEMENT, TAG_BLOCK, TAG_GYRO, TAG_SCHEDULE, TAG_DEPTH, TAG_SLICE, TAG_SAMPLE = range(7)


_CHUNK = 65536  # counters per pass: the working set (~2 MB) stays in L2


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on broadcastable uint32-valued arrays; returns four uint32 arrays.

    The rounds run in place on uint32 state in L2-sized chunks: each 32x32->64-bit product is
    one ``multiply(..., dtype=uint64)`` whose high and low words are read as strided uint32
    views, and the two product buffers alternate between rounds so the low words live on as the
    next round's state without a copy. 6 ufunc passes a round; measured 12 ms for 2**21 words
    (the old uint64 version: 93 ms; NumPy's Generator: 5 ms for as many uint32 draws).
    """
    ins = [np.asarray(x) for x in (c0, c1, c2, c3)]
    shape = np.broadcast_shapes(*(a.shape for a in ins))
    out = _philox_words(ins, shape, k0, k1)
    return tuple(out[:, i].reshape(shape) for i in range(4))


def _philox_words(ins, shape, k0, k1):
    """The four words of every counter in ``shape`` as an (n, 4) array: word ``i`` of counter
    ``j`` at ``[j, i]``, i.e. in column order for the masks' four-columns-per-counter layout."""
    # One-element counters stay scalars; the others are flattened at full size.
    ctr = [np.uint32(int(a.reshape(-1)[0]) & 0xFFFFFFFF) if a.size == 1 else
           (np.broadcast_to(a, shape).reshape(-1) & 0xFFFFFFFF).astype(np.uint32)
           for a in ins]
    n = int(np.prod(shape, dtype=np.int64))
    out = np.empty((n, 4), np.uint32)
    m = min(n, _CHUNK)
    prod = [np.empty(m, np.uint64) for _ in range(4)]
    x0, x2 = np.empty(m, np.uint32), np.empty(m, np.uint32)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        part = [c if c.ndim == 0 else c[s:e] for c in ctr]
        a0, a2 = x0[:e - s], x2[:e - s]
        a0[...], a2[...] = part[0], part[2]
        a1, a3 = part[1], part[3]
        r0, r1 = int(k0) & 0xFFFFFFFF, int(k1) & 0xFFFFFFFF
        for r in range(10):
            if r:
                r0, r1 = (r0 + _W0) & 0xFFFFFFFF, (r1 + _W1) & 0xFFFFFFFF
            p0, p1 = prod[2 * (r & 1)][:e - s], prod[2 * (r & 1) + 1][:e - s]
            np.multiply(a0, _M0, out=p0, dtype=np.uint64)
            np.multiply(a2, _M1, out=p1, dtype=np.uint64)
            v0, v1 = p0.view(np.uint32), p1.view(np.uint32)  # little-endian: [lo, hi] pairs
            np.bitwise_xor(v1[1::2], a1, out=a0)
            np.bitwise_xor(a0, np.uint32(r0), out=a0)
            np.bitwise_xor(v0[1::2], a3, out=a2)
            np.bitwise_xor(a2, np.uint32(r1), out=a2)
            a1, a3 = v1[0::2], v0[0::2]
        out[s:e, 0], out[s:e, 1], out[s:e, 2], out[s:e, 3] = a0, a1, a2, a3
    return out


def philox4x32_scalar(c0, c1, c2, c3, k0, k1):
    """``philox4x32`` for one counter in plain Python ints: ~15x faster than the array version
    for the host-side draws (a slice start, a depth gate) that happen once per layer per step."""
    m32 = 0xFFFFFFFF
    c0, c1, c2, c3, k0, k1 = (int(v) & m32 for v in (c0, c1, c2, c3, k0, k1))
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W0) & m32, (k1 + _W1) & m32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & m32, (p0 >> 32) ^ c3 ^ k1, p0 & m32
    return c0, c1, c2, c3


def check_seed(name, v):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v < 2 ** 32:
        raise ValueError(f"{name} must be an int in [0, 2**32), got {v!r}")
    return int(v)


def check_prob(p, name: str = "p") -> float:
    """``p`` as a float, or ValueError naming ``name`` unless it is a drop probability in
    [0, 1). The one validator every variant uses."""
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ValueError(f"{name} must be a drop probability in [0, 1), got {p!r}")
    return float(p)


def check_step(step, xp=np):
    """A step counter: an int in [0, 2**32), the width of its Philox counter word, returned as
    an int; or, on the GPU path, a *device step*: a 0-d uint32 CuPy array that the kernels read
    at run time, returned as is (reading it here would be a host sync, and a captured CUDA graph
    replays with whatever the host wrote there since). ``xp`` is the path: ``numpy`` (the
    default; a device step is then a TypeError), ``cupy``, or None where the op has not chosen
    its path yet (``random.resolve``). Never reads a device step's value."""
    if isinstance(step, np.ndarray) or backend.is_gpu_array(step):
        return _check_device_step(step, xp)
    return check_seed("step", step)


def check_host_step(step, op: str) -> int:
    """``check_step`` for a draw decided on the host (the slice start of SliceOut's ops that
    slice on the host): the step must be an int there, since a device step would have to be
    read back (a host sync)."""
    if isinstance(step, np.ndarray) or backend.is_gpu_array(step):
        raise TypeError(f"{op}: step must be an int: this draw is decided on the host, where a "
                        f"device step ({_type_name(step)}) cannot be read without a sync; "
                        "device steps work with dropout, block masks, sparsedrop, gyro_dropout, "
                        "blockwise gyro dropout and sliceout_linear(_out)")
    return check_seed("step", step)


def _type_name(v):
    return f"{type(v).__module__}.{type(v).__name__}"


def _check_device_step(step, xp):
    # only dtype and shape are looked at: both are host metadata, no device read
    if xp is np or not backend.is_gpu_array(step):
        where = " for an op on NumPy arrays: pass an int" if xp is np else ""
        raise TypeError(f"step as a device array needs CuPy inputs and a 0-d uint32 CuPy array; "
                        f"got a {_type_name(step)}{where}")
    if step.dtype != np.uint32 or step.shape != ():
        raise TypeError(f"step as a device array must be a 0-d uint32 CuPy array, got dtype "
                        f"{step.dtype} and shape {step.shape}")
    return step


def step_args(step):
    """The kernels' two step parameters ``(step, step_ptr)`` for a checked step. An int goes by
    value with a null pointer (CuPy passes None as a null pointer); a device step goes as its
    pointer, which the kernel reads at run time (the by-value word is then unused). One runtime
    pointer test in the kernel costs one uniform branch and, for a device step, one broadcast
    load per thread: cheaper than compiling and dispatching a second variant of each kernel."""
    if backend.is_gpu_array(step):
        return np.uint32(0), step
    return np.uint32(step), None


def threshold(p: float) -> int:
    """The uint32 threshold t with keep iff word >= t, for drop probability p in [0, 1)."""
    return min(int(np.floor(check_prob(p) * 2.0 ** 32)), 2 ** 32 - 1)


def words(seed, layer, step, tag, rows, cols):
    """The uint32 random word at every (row, col) of the given index arrays (broadcast)."""
    if isinstance(rows, (int, np.integer)) and isinstance(cols, (int, np.integer)):
        return np.uint32(philox4x32_scalar(int(cols) >> 2, rows, step, tag, seed, layer)[int(cols) & 3])
    rows = np.asarray(rows, dtype=np.uint64)
    cols = np.asarray(cols, dtype=np.uint64)
    c0 = cols >> np.uint64(2)
    which = (cols & np.uint64(3)).astype(np.intp)
    out = philox4x32(c0, rows, np.uint64(step), np.uint64(tag), seed, layer)
    return np.choose(which, out) if which.ndim else out[int(which)]


def grid_words(seed, layer, step, tag, n_rows, n_cols, row_ids=None, col_offset=0):
    """Words over an (n_rows, n_cols) grid; ``row_ids`` replaces the row coordinate (gyro uses
    the sub-network id there), ``col_offset`` shifts the column coordinate (the grid is columns
    ``[col_offset, col_offset + n_cols)`` of a wider one: a data-parallel rank's part of the
    global batch). One Philox call per four columns, its four words laid side by side (``words``
    on the same grid computes the same values four times slower)."""
    r = np.arange(n_rows, dtype=np.uint32) if row_ids is None else np.asarray(row_ids, np.uint32)
    col_offset = int(col_offset)
    lead, first = col_offset & 3, col_offset >> 2
    c4 = -(-(int(n_cols) + lead) // 4)
    ins = [np.arange(first, first + c4, dtype=np.uint64).astype(np.uint32)[None, :], r[:, None],
           np.asarray(step), np.asarray(tag)]
    w = _philox_words(ins, (len(r), c4), seed, layer)
    return w.reshape(len(r), 4 * c4)[:, lead:lead + n_cols]


def keep_grid(seed, layer, step, tag, n_rows, n_cols, p, row_ids=None):
    """Boolean keep-grid: P(keep) = 1 - p per cell, i.i.d. over cells."""
    return grid_words(seed, layer, step, tag, n_rows, n_cols, row_ids) >= np.uint32(threshold(p))


def uniform(seed, layer, step, tag, n, offset=0):
    """``n`` floats in [0, 1) for host-side decisions (slice starts, depth gates, schedules):
    draws ``offset .. offset + n - 1`` of the sequence."""
    if n + offset <= 16:  # host decisions are mostly one draw: plain ints beat array set-up
        w = [v for c in range(-(-(n + offset) // 4))
             for v in philox4x32_scalar(c, 0, step, tag, seed, layer)]
        return np.array(w[offset:offset + n], dtype=np.float64) / 2.0 ** 32
    return grid_words(seed, layer, step, tag, 1, n, col_offset=offset)[0].astype(np.float64) \
        / 2.0 ** 32
