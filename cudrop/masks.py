"""Element and block masks: drawn as pure functions of (seed, layer, step), packed into bits,
with the kept-block lists the block-sparse GEMMs walk.

Layouts (the contract with the kernels of ``raw_kernels/``):

- bits: ``uint64`` words, little-endian along the column axis: bit ``j`` of word ``w`` in row
  ``r`` is cell ``(r, 64 w + j)``; bits past the last column are 0.
- lists (block masks only), ELL form so that no prefix sum and no host sync is needed:
  ``row_index[r, :row_count[r]]`` are the kept column blocks of row block ``r`` in ascending
  order (padding -1); ``col_index[c, :col_count[c]]`` the kept row blocks of column block
  ``c`` (the transposed lists, for dW).

On CuPy arrays a block mask is drawn, packed and listed by one kernel launch; on NumPy by the
reference code here, which the GPU is tested against bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numbers

import numpy as np

from . import backend, philox

_BLOCK_THREADS = 256  # masks.cu's scan assumes 256 threads


def pack_bits(keep):
    """(rows, cols) bool -> (rows, ceil(cols / 64)) uint64, little-endian along cols."""
    xp = backend.get_array_module(keep)
    rows, cols = keep.shape
    words = -(-cols // 64)
    if xp is np:  # 8x faster than the shift-and-sum below (2**21 bits: 1 ms vs 8 ms)
        padded = np.zeros((rows, words * 64), dtype=bool)
        padded[:, :cols] = keep
        return np.packbits(padded, axis=1, bitorder="little").view("<u8").astype(np.uint64)
    padded = xp.zeros((rows, words * 64), dtype=np.uint64)
    padded[:, :cols] = keep
    shifts = xp.arange(64, dtype=np.uint64)
    return (padded.reshape(rows, words, 64) << shifts).sum(axis=2, dtype=np.uint64)


def unpack_bits(bits, cols):
    """Inverse of ``pack_bits``: (rows, words) uint64 -> (rows, cols) bool."""
    xp = backend.get_array_module(bits)
    if xp is np:
        b = np.ascontiguousarray(bits, dtype="<u8").view(np.uint8)
        return np.unpackbits(b, axis=1, count=cols, bitorder="little").astype(bool)
    shifts = xp.arange(64, dtype=np.uint64)
    b = (bits[:, :, None] >> shifts) & np.uint64(1)
    return b.reshape(bits.shape[0], -1)[:, :cols].astype(bool)


def ell_lists(keep):
    """Kept column indices of each row of a bool grid, ascending, as (count, index) with
    index padded by -1. Pure array ops (a cumsum and a scatter): no host sync on CuPy."""
    xp = backend.get_array_module(keep)
    rows, cols = keep.shape
    pos = xp.cumsum(keep, axis=1, dtype=np.int32) - 1
    target = xp.where(keep, pos, cols)  # dropped cells go to a spill column
    index = xp.full((rows, cols + 1), -1, dtype=np.int32)
    r = xp.broadcast_to(xp.arange(rows)[:, None], (rows, cols))
    c = xp.broadcast_to(xp.arange(cols, dtype=np.int32)[None, :], (rows, cols))
    index[r, target] = c
    index = index[:, :cols]
    return keep.sum(axis=1, dtype=np.int32), xp.ascontiguousarray(index)


@dataclass(frozen=True)
class ElementMask:
    """Per-element keep bits for an array of ``n`` elements viewed flat (one mask row)."""

    n: int
    p: float
    bits: object  # (1, ceil(n / 64)) uint64

    @property
    def q(self):
        return 1.0 - self.p

    def to_dense(self):
        return unpack_bits(self.bits, self.n)[0]


def element_mask(n, p, *, seed, layer, step, offset=0, xp=np) -> ElementMask:
    """The element mask cudrop's dropout uses for ``n`` elements (NumPy reference; on the GPU
    the fused dropout kernel draws the same bits while it scales). ``offset``: the flat index of
    the first element in a larger array (a data-parallel rank's rows of the global batch), so
    the mask is elements ``[offset, offset + n)`` of that array's mask."""
    t = philox.threshold(p)
    w = philox.grid_words(philox.check_seed("seed", seed), philox.check_seed("layer", layer),
                          philox.check_step(step), philox.TAG_ELEMENT, 1, n,
                          col_offset=check_offset(offset, n))[0]
    return ElementMask(n, float(p), xp.asarray(pack_bits((w >= np.uint32(t))[None, :])))


#: Flat element indices of a mask's counters: four columns per 32-bit counter word.
MAX_ELEMENTS = 2 ** 34


def check_offset(offset, n=0, limit=MAX_ELEMENTS, name="offset"):
    """``offset`` as an int with ``0 <= offset`` and ``offset + n <= limit`` (the coordinate
    must fit its Philox counter word), or ValueError naming it."""
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ValueError(f"{name} must be an int >= 0, got {offset!r}")
    if int(offset) + int(n) > limit:
        raise ValueError(f"{name} {offset} + {n} elements exceed the {limit} a mask can address")
    return int(offset)


@dataclass(frozen=True)
class BlockMask:
    """A mask over an (M, K) array that keeps or drops whole (Mb, Kb) blocks; edge blocks are
    partial when the shape does not divide. ``p`` is the drop probability that scaling uses
    (1 / q on kept blocks)."""

    shape: tuple
    block: tuple
    p: float
    bits: object       # (nM, ceil(nK / 64)) uint64
    row_count: object  # (nM,) int32
    row_index: object  # (nM, nK) int32
    col_count: object  # (nK,) int32
    col_index: object  # (nK, nM) int32

    @property
    def grid(self):
        return grid_shape(self.shape, self.block)

    @property
    def q(self):
        return 1.0 - self.p

    @property
    def xp(self):
        return backend.get_array_module(self.bits)

    def keep_blocks(self):
        """(nM, nK) bool: which blocks are kept."""
        return unpack_bits(self.bits, self.grid[1])

    def to_dense(self):
        """(M, K) bool, for tests and reference paths."""
        (m, k), (mb, kb) = self.shape, self.block
        kb_ = self.keep_blocks()
        return self.xp.repeat(self.xp.repeat(kb_, mb, axis=0), kb, axis=1)[:m, :k]

    @classmethod
    def from_blocks(cls, keep, shape, block, p) -> "BlockMask":
        """A mask from an explicit (nM, nK) bool grid (gyro schedules, user masks)."""
        shape, block = _check_shape_block(shape, block)
        if tuple(keep.shape) != grid_shape(shape, block):
            raise ValueError(f"keep grid has shape {tuple(keep.shape)}, expected "
                             f"{grid_shape(shape, block)} for shape {shape} and block {block}")
        keep = keep.astype(bool, copy=False)
        rc, ri = ell_lists(keep)
        cc, ci = ell_lists(keep.T)
        return cls(shape, block, float(p), pack_bits(keep), rc, ri, cc, ci)


def grid_shape(shape, block):
    """Blocks per axis of ``shape`` cut into ``block``s: ``ceil(s / b)`` for each pair, e.g.
    ``(nM, nK)`` for an (M, K) array and (Mb, Kb) blocks (edge blocks may be partial)."""
    return tuple(-(-s // b) for s, b in zip(shape, block))


def check_block(block):
    """``(Mb, Kb)`` as positive ints, or ValueError naming the block."""
    if (not isinstance(block, (tuple, list)) or len(block) != 2 or
            not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and b > 0
                    for b in block)):
        raise ValueError(f"block must be two positive ints (rows Mb, cols Kb), got {block!r}")
    return int(block[0]), int(block[1])


def _check_shape_block(shape, block):
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (M, K) with positive sizes, got {shape}")
    return shape, check_block(block)


def block_mask(shape, block, p, *, seed, layer, step, xp=np, row_ids=None,
               tag=philox.TAG_BLOCK, row_offset=0) -> BlockMask:
    """I.i.d. Bernoulli(1 - p) keep per block of an (M, K) array, as a pure function of
    (seed, layer, step). ``row_ids`` (length nM) replaces the row-block coordinate of the draw:
    gyro dropout gives the sub-network id there, so rows with one sub-network share a mask.
    ``row_offset`` (without ``row_ids``) shifts the row-block coordinate: the mask is row blocks
    ``[row_offset, row_offset + nM)`` of a taller array's (a data-parallel rank's part of the
    global batch).
    ``step`` an int, or with ``xp=cupy`` a device step (a 0-d uint32 CuPy array, read by the
    kernel when it runs; ``philox.check_step``)."""
    shape, block = _check_shape_block(shape, block)
    t = philox.threshold(p)
    seed, layer = philox.check_seed("seed", seed), philox.check_seed("layer", layer)
    step = philox.check_step(step, xp)
    nm, nk = grid_shape(shape, block)
    if row_ids is not None and len(row_ids) != nm:
        raise ValueError(f"row_ids has {len(row_ids)} entries, expected one per row block ({nm})")
    row_offset = check_offset(row_offset, nm, 2 ** 32, "row_offset")
    if xp is np:
        if row_ids is None and row_offset:
            row_ids = np.arange(row_offset, row_offset + nm, dtype=np.uint64)
        keep = philox.keep_grid(seed, layer, step, tag, nm, nk, p, row_ids)
        return BlockMask.from_blocks(keep, shape, block, p)
    return _block_mask_gpu(xp, shape, block, float(p), t, seed, layer, step, tag, row_ids,
                           row_offset)


def _block_mask_gpu(cp, shape, block, p, t, seed, layer, step, tag, row_ids, row_offset=0):
    from .raw_kernels import kernel
    nm, nk = grid_shape(shape, block)
    words = -(-nk // 64)
    bits = cp.empty((nm, words), np.uint64)
    rc, ri = cp.empty(nm, np.int32), cp.empty((nm, nk), np.int32)
    cc, ci = cp.empty(nk, np.int32), cp.empty((nk, nm), np.int32)
    ids = 0 if row_ids is None else cp.asarray(row_ids, dtype=np.uint32)
    step_value, step_ptr = philox.step_args(step)
    kernel("masks.cu", "block_mask")(
        (nm + nk,), (_BLOCK_THREADS,),
        (bits, rc, ri, cc, ci, ids, np.int32(nm), np.int32(nk), np.int64(2 * words),
         np.uint32(seed), np.uint32(layer), step_value, step_ptr, np.uint32(tag),
         np.uint32(t), np.uint32(row_offset)))
    return BlockMask(shape, block, p, bits, rc, ri, cc, ci)


def apply_block(x, mask, scale, *, out=None):
    """``x ⊙ m · scale`` for an (M, K) array and a BlockMask over it, into ``out`` (an (M, K)
    array of x's dtype) when given. Dropped blocks are exact zeros (an inf or NaN there does not
    leak, as with a GEMM that skips the block); a kept cell is ``x · scale`` in float32 (float64
    for float64) rounded once to x's dtype, on NumPy and CuPy alike. On CuPy one pass
    (``block_apply`` in masks.cu, 16 bytes a thread); on NumPy (and for a CuPy side of 2**31 or
    more) array ops that expand the block grid along the units only, to (nM, K) bools broadcast
    over each row block's rows."""
    xp = backend.get_array_module(x, mask.bits)
    if x.ndim != 2 or tuple(x.shape) != tuple(mask.shape):
        raise ValueError(f"x has shape {tuple(x.shape)} (as (M, K)) but the block mask is over "
                         f"{tuple(mask.shape)}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"out must be a {x.shape} {x.dtype} array, got {out.shape} {out.dtype}")
    if xp is not np and max(x.shape) < 2 ** 31:  # block_apply's 32-bit coordinates
        return _apply_block_gpu(x, mask, scale, out)
    (m, k), (mb, kb) = mask.shape, mask.block
    wide = np.float64 if x.dtype == np.float64 else np.float32
    drop = ~xp.repeat(mask.keep_blocks(), kb, axis=1)[:, :k]
    y = xp.multiply(x.astype(wide, copy=False), wide(scale))
    full = m // mb  # whole row blocks; the last one is partial when mb does not divide m
    if full:
        xp.copyto(y[:full * mb].reshape(full, mb, k), 0, where=drop[:full, None, :])
    if full * mb < m:
        xp.copyto(y[full * mb:], 0, where=drop[full][None, :])
    if out is None:
        return y.astype(x.dtype, copy=False)
    out[...] = y
    return out


def _apply_block_gpu(x, mask, scale, out):
    from .raw_kernels import aligned, launch
    x = aligned(x, 16)  # the kernel's 16-byte accesses
    y = out
    if y is None or not y.flags.c_contiguous or y.data.ptr % 16:
        y = backend.cupy.empty_like(x)
    (mb, kb), k, v = mask.block, x.shape[1], 16 // x.itemsize  # v elements a thread
    launch("masks.cu", "block_apply", x.dtype, (-(-x.size // (256 * v)),), (256,),
           (x, y, np.int64(x.size), np.int64(k), mask.bits, np.int64(mask.bits.shape[1]),
            np.int32(mb), np.int32(kb), np.float64(scale), np.int32(k % v == 0)))
    if out is not None and y is not out:
        out[...] = y
        return out
    return y
