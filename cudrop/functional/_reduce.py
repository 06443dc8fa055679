"""Sums over the leading axes of an array (the column sums of its (R, C) view), and the dtype
reductions accumulate in.

Backward passes reduce over leading axes everywhere: bias gradients (``g.sum(axis=0)``), layer
norm's gamma/beta gradients, gradients of operands broadcast over a batch. CuPy's axis-0
reductions are slow on these shapes: a GPT step profiled on an H200 spent 3.6 ms of 18.5 in
``cupy_sum``, mostly on (8192, 1024) bf16. :func:`sum_leading` runs ``raw_kernels/reduce.cu``
instead on C-contiguous float16/bfloat16/float32/float64 CuPy arrays: one pass over ``g`` (and
``x``), deterministic (chunks of rows summed by separate blocks, their partials added in a fixed
order by a second small kernel, no atomics), and capturable in a CUDA graph (launches and pool
allocations sized by the shape only, no host read). Everything else (NumPy, strided views,
integer dtypes, empty arrays) runs the array library's ``sum``, the reference the kernel is
tested against.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..raw_kernels import cuda_type, device_facts, launch

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
# reduce.cu's CD_COLSUM_THREADS (threads a block) and CD_COLSUM_UNROLL (rows a thread loads
# before adding them)
_THREADS, _UNROLL = 256, 8


def compute_dtype(dtype):
    """float64 stays float64; float32 stays; anything narrower (float16, bfloat16) -> float32."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize >= 4:
        return dtype
    return np.dtype(np.float32)


def sum_leading(g, lead=1, x=None, *, with_plain=False, dtype=None, out=None):
    """The sums of ``g`` over its first ``lead`` axes, of shape ``g.shape[lead:]`` (``lead`` 1:
    ``g.sum(axis=0)``).

    ``x``: an array of ``g``'s shape; the sums are then of ``g * x``. With ``with_plain`` (needs
    ``x``) returns ``(sum g * x, sum g)`` from one pass over ``g`` (layer norm's gamma and beta
    gradients). Floating sums accumulate in :func:`compute_dtype` of ``g`` (float32 for 16-bit
    input), products included; the GPU kernel reads ``x`` in that dtype (where layer norm keeps
    ``xhat``) and converts an ``x`` of another dtype first (a copy).
    ``dtype``: the results' dtype; default ``out``'s, else ``g``'s. ``out``: an array of the
    result's shape that receives the (single) result and is returned.
    """
    xp = backend.get_array_module(g, x, out)
    if not 0 <= lead <= g.ndim:
        raise ValueError(f"sum_leading: lead must be in [0, {g.ndim}] for g of shape "
                         f"{tuple(g.shape)}, got {lead}")
    if x is not None and x.shape != g.shape:
        raise ValueError(f"sum_leading: x must have g's shape {tuple(g.shape)}, got "
                         f"{tuple(x.shape)}")
    if with_plain and (x is None or out is not None):
        raise ValueError("sum_leading: with_plain needs x, and returns two new arrays (no out)")
    shape = tuple(g.shape[lead:])
    if out is not None and tuple(out.shape) != shape:
        raise ValueError(f"sum_leading: out must have shape {shape}, got {tuple(out.shape)}")
    dtype = np.dtype(dtype) if dtype is not None else (g.dtype if out is None else out.dtype)
    if (xp is not np and g.size and cuda_type(g.dtype) is not None
            and g.flags.c_contiguous):
        sums = _sum_leading_gpu(g, shape, x, with_plain, dtype, out)
    else:
        acc = compute_dtype(g.dtype) if backend.is_floating(g.dtype) else None
        axes = tuple(range(lead))
        s = xp.sum(g if x is None else xp.multiply(g, x, dtype=acc), axis=axes, dtype=acc)
        sums = [s] + ([xp.sum(g, axis=axes, dtype=acc)] if with_plain else [])
        sums = [a.astype(dtype, copy=False) for a in sums]
    if out is not None:
        if sums[0] is not out:
            out[...] = sums[0]
        return out
    return tuple(sums) if with_plain else sums[0]


def _tile_width(c: int) -> int:
    """Columns per block of colsum: the smallest power of two >= c, at most 64 (a warp then
    covers 32 consecutive columns of a row, or whole rows of a narrow array)."""
    return min(64, 1 << (c - 1).bit_length())


def _row_chunks(r: int, c: int, bx: int):
    """``(S, rows)``: colsum splits the ``r`` rows into S chunks of ``rows`` (the last may be
    shorter, none is empty) when its column tiles alone do not fill the GPU: 8 blocks of 256
    threads per SM together, what an SM holds at 32 registers a thread (ptxas -v: 32 on sm_80,
    38-40 on sm_90a, i.e. 6 blocks there, ~1.3 waves). At least one unrolled group of rows per
    thread, so a chunk is never mostly idle threads; at most 4 such groups of partials per
    merging thread. One 256-thread block per tile of 64 columns would put 16 blocks on 132 SMs
    for (8192, 1024); split, that sum took 15 µs in bf16 (CuPy: 186 µs) and (25088, 1024) fp32
    read 3.0 TB/s (H200, benchmarks/colsum.py)."""
    ry = _THREADS // bx
    tiles = -(-c // bx)
    s = min(-(-8 * device_facts()[0] // tiles), -(-r // (ry * _UNROLL)), 4 * ry * _UNROLL,
            65535)
    if s <= 1:
        return 1, r
    rows = -(-r // s)
    return -(-r // rows), rows


def _sum_leading_gpu(g, shape, x, with_plain, dtype, out):
    """reduce.cu's colsum (and colsum_merge for S > 1 row chunks) on contiguous, non-empty g."""
    cp = backend.cupy
    c = int(np.prod(shape, dtype=np.int64))
    r = g.size // c
    acc = _F64 if g.dtype == _F64 else _F32
    if x is not None:
        x = cp.ascontiguousarray(x, dtype=acc)
    kdt = dtype if dtype in (g.dtype, acc) else acc  # what the kernel writes; others: a cast
    direct = out is not None and out.dtype == kdt and out.flags.c_contiguous
    outs = [out if direct else cp.empty(shape, kdt)]
    if with_plain:
        outs.append(cp.empty(shape, kdt))
    bx = _tile_width(c)
    s, rows = _row_chunks(r, c, bx)
    # partials (outputs, S, C) of the row chunks; fresh from the pool each call, so a captured
    # graph owns its own
    part = cp.empty((len(outs), s, c), acc) if s > 1 else outs[0]  # not touched for S = 1
    grid, block = (-(-c // bx), s), (bx, _THREADS // bx)
    out_acc = np.int32(kdt != g.dtype)
    launch("reduce.cu", "colsum", g.dtype, grid, block,
           (g, g if x is None else x, outs[0], outs[-1], part, np.int64(r), np.int64(c),
            np.int64(rows), np.int32(x is not None), np.int32(with_plain), out_acc))
    if s > 1:
        launch("reduce.cu", "colsum_merge", g.dtype, (grid[0], len(outs)), block,
               (part, outs[0], outs[-1], np.int64(s), np.int64(c), out_acc))
    return [a.astype(dtype, copy=False) for a in outs]
