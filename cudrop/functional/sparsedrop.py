"""SparseDrop linear (Lo, "Efficient Sparse Training with Structured Dropout") on raw arrays.

``Y = (X ⊙ m) W / q + b`` with ``m`` i.i.d. Bernoulli(q) per ``(Mb, Kb)`` block of ``X``, and

    dX = (dY Wᵀ) ⊙ m / q        (sdd: only kept blocks of dX are computed)
    dW = (X ⊙ m)ᵀ dY / q        (dsd_t: only kept row blocks of X feed each K-block of dW)
    db = Σ_rows dY

The three products are three functions with one signature, ``(operands, mask, scale)``:
:func:`dsd`, :func:`sdd` and :func:`dsd_t`. The block-sparse GEMM kernels replace exactly these
three; the mask drawing, validation and the functional pair stay as they are.

Until those kernels exist, each product gathers the kept blocks and runs one GEMM per row block
(per K-block for ``dsd_t``), so the multiply-adds are the kept elements of ``m`` times N: the
work falls with p. This interim path reads the kept-block lists on the host: one device-to-host
copy of one ELL table per product (a stream sync on CuPy) and one host-to-device copy of the
gather indices. The kernels walk the lists on the device and need neither. It is a reference
for correctness and for the work done, not a speed path: the gathers move about M·K·N / Mb
elements per product (a copy of W's kept rows per row block), which on a GPU costs more than the
GEMM time saved.
"""
from __future__ import annotations

import numpy as np

from .. import backend, masks, philox
from .matmul import matmul

__all__ = ["sparsedrop_linear", "sparsedrop_linear_backward", "dsd", "sdd", "dsd_t"]

_FLOATS = ("float16", "bfloat16", "float32", "float64")


# ---- the three products (the kernels' seam) --------------------------------------------------

def dsd(x, w, mask, scale):
    """``(x ⊙ m) @ w * scale``: x (M, K), w (K, N) -> (M, N). Row blocks with every block
    dropped are exact zeros and cost no GEMM."""
    xp = backend.get_array_module(x, w, mask.bits)
    (m, k), (mb, kb) = mask.shape, mask.block
    sel, full = _selectors(xp, mask.row_index, kb, k)
    if full:
        return _scaled(matmul(x, w), scale)
    y = xp.empty((m, w.shape[1]), x.dtype)
    for r, s in enumerate(sel):
        rows = slice(r * mb, min((r + 1) * mb, m))
        if s is None:
            y[rows] = 0
        else:
            y[rows] = matmul(_take(xp, x[rows], s, 1), _take(xp, w, s, 0))
    return _scaled(y, scale)


def sdd(dy, w, mask, scale):
    """``(dy @ wᵀ) ⊙ m * scale``: dy (M, N), w (K, N) -> (M, K). Only the kept blocks are
    computed; dropped blocks are exact zeros."""
    xp = backend.get_array_module(dy, w, mask.bits)
    (m, k), (mb, kb) = mask.shape, mask.block
    sel, full = _selectors(xp, mask.row_index, kb, k)
    if full:
        return _scaled(matmul(dy, w.T), scale)
    dx = xp.zeros((m, k), dy.dtype)
    for r, s in enumerate(sel):
        if s is not None:
            rows = slice(r * mb, min((r + 1) * mb, m))
            dx[rows, s] = matmul(dy[rows], _take(xp, w, s, 0).T)
    return _scaled(dx, scale)


def dsd_t(x, dy, mask, scale):
    """``(x ⊙ m)ᵀ @ dy * scale``: x (M, K), dy (M, N) -> (K, N). Each K-block of dW sums over
    the row blocks kept in that K-block only (the transposed lists); a K-block with no kept row
    block is exact zeros and costs no GEMM."""
    xp = backend.get_array_module(x, dy, mask.bits)
    (m, k), (mb, kb) = mask.shape, mask.block
    sel, full = _selectors(xp, mask.col_index, mb, m)
    if full:
        return _scaled(matmul(x.T, dy), scale)
    dw = xp.empty((k, dy.shape[1]), dy.dtype)
    for c, s in enumerate(sel):
        cols = slice(c * kb, min((c + 1) * kb, k))
        if s is None:
            dw[cols] = 0
        else:
            dw[cols] = matmul(_take(xp, x[:, cols], s, 0).T, _take(xp, dy, s, 0))
    return _scaled(dw, scale)


# ---- the functional pair ---------------------------------------------------------------------

def sparsedrop_linear(x, w, b=None, *, p=None, block=None, seed=0, layer=0, step=0, mask=None):
    """SparseDrop linear: ``y = (x ⊙ m) @ w / (1 - p) + b``.

    ``x`` (..., K) (leading dimensions are flattened to M rows for the mask), ``w`` (K, N),
    ``b`` (N,) or None, all of one floating dtype and on one device. ``m`` keeps or drops whole
    ``block = (Mb, Kb)`` blocks of the flattened (M, K) input, i.i.d. with keep probability
    ``1 - p``, drawn from (seed, layer, step) unless ``mask`` (a :class:`cudrop.masks.BlockMask`
    over (M, K)) is given. With a mask, ``p`` and ``block`` default to the mask's (and must match
    it if given); without one, ``p`` is required and ``block`` defaults to (128, 128).

    Returns ``(y, saved)`` with ``y`` of shape (..., N); ``saved`` holds the BlockMask (packed
    bits and kept-block lists, never a float mask) and the operands for
    :func:`sparsedrop_linear_backward`.
    """
    xp = backend.get_array_module(x, w, b, getattr(mask, "bits", None))
    p, block = resolve_p_block(p, block, mask)
    x2, w, b = _check_operands(x, w, b)
    shape = x2.shape
    if mask is None:
        mask = masks.block_mask(shape, block, p, seed=seed, layer=layer, step=step, xp=xp)
    else:
        _check_mask(mask, shape, block, p)
    scale = 1.0 / (1.0 - p)
    y = dsd(x2, w, mask, scale)
    if b is not None:
        y += b
    saved = {"mask": mask, "scale": scale, "x": x2, "w": w, "bias": b is not None,
             "x_shape": x.shape}
    return y.reshape(x.shape[:-1] + (w.shape[1],)), saved


def sparsedrop_linear_backward(grad_out, saved):
    """``(gx, gw, gb)`` from the saved mask; ``gb`` is None when there was no bias. ``gx`` is
    zero on every dropped block."""
    x, w, mask, scale = saved["x"], saved["w"], saved["mask"], saved["scale"]
    g = grad_out.reshape(x.shape[0], w.shape[1])
    gx = sdd(g, w, mask, scale).reshape(saved["x_shape"])
    gw = dsd_t(x, g, mask, scale)
    gb = g.sum(axis=0) if saved["bias"] else None
    return gx, gw, gb


# ---- helpers ---------------------------------------------------------------------------------

def resolve_p_block(p, block, mask):
    """``(p, block)`` from the arguments, falling back to a given mask's."""
    if mask is not None and not isinstance(mask, masks.BlockMask):
        raise TypeError(f"sparsedrop_linear: mask must be a cudrop.masks.BlockMask or None, got "
                        f"{type(mask).__name__}")
    if p is None:
        if mask is None:
            raise TypeError("sparsedrop_linear: p is required when no mask is given")
        p = mask.p
    if block is None:
        block = mask.block if mask is not None else (128, 128)
    return philox.check_prob(p), masks.check_block(block)


def _check_operands(x, w, b):
    for name, a in (("x", x), ("w", w), ("b", b)):
        if a is not None and not (hasattr(a, "ndim") and hasattr(a, "dtype")):
            raise TypeError(f"sparsedrop_linear: {name} must be a NumPy or CuPy array, got "
                            f"{type(a).__name__}")
    if x.dtype.name not in _FLOATS:
        raise TypeError(f"sparsedrop_linear: x must be a float16, bfloat16, float32 or float64 "
                        f"array, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError("sparsedrop_linear: x must have shape (..., K), got a 0-d array")
    if w.ndim != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(f"sparsedrop_linear: w must have shape (K, N) with K = {x.shape[-1]} "
                         f"(the last axis of x), got shape {w.shape}")
    if b is not None and b.shape != (w.shape[1],):
        raise ValueError(f"sparsedrop_linear: b must have shape (N,) = ({w.shape[1]},), got "
                         f"shape {b.shape}")
    for name, a in (("w", w), ("b", b)):
        if a is not None and a.dtype != x.dtype:
            raise TypeError(f"sparsedrop_linear: {name} has dtype {a.dtype} but x has "
                            f"{x.dtype}; the dtypes must be equal")
    m = int(np.prod(x.shape[:-1], dtype=np.int64))
    return x.reshape(m, x.shape[-1]), w, b


def _check_mask(mask, shape, block, p):
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"sparsedrop_linear: mask covers shape {tuple(mask.shape)} but x is "
                         f"{tuple(shape)} as (M, K) (leading axes flattened)")
    if tuple(mask.block) != tuple(block):
        raise ValueError(f"sparsedrop_linear: mask has block {tuple(mask.block)} but "
                         f"block={tuple(block)}; pass the mask's block")
    if mask.p != p:
        raise ValueError(f"sparsedrop_linear: mask was made with p={mask.p} but p={p}; the "
                         "scale 1 / (1 - p) must match the mask")


def _scaled(a, scale):
    if scale != 1.0:
        a *= a.dtype.type(scale)
    return a


def _take(xp, a, sel, axis):
    """The kept part of ``a`` along ``axis``: a view for a slice, a gather for an index array."""
    if isinstance(sel, slice):
        return a[sel] if axis == 0 else a[:, sel]
    return xp.take(a, sel, axis=axis)


def _selectors(xp, index, bsize, extent):
    """Per row of an ELL table (``row_index`` or ``col_index``), what is kept along the blocked
    axis of length ``extent``: None when nothing is, a slice when the kept blocks form one run
    (no copy), else an index array. Returns ``(selectors, every_block_kept)``.

    The table comes to the host once (the interim path's one sync); all index arrays go back in
    one upload, as views of one device array.
    """
    host = backend.asnumpy(index)
    kept = host >= 0
    if kept.all():
        return None, True
    offs = np.arange(bsize, dtype=np.int64)
    sel, pieces, at = [], [], 0
    for row, keep in zip(host, kept):
        blocks = row[keep].astype(np.int64)
        if blocks.size == 0:
            sel.append(None)
        elif blocks[-1] - blocks[0] + 1 == blocks.size:
            sel.append(slice(int(blocks[0]) * bsize, min(int(blocks[-1] + 1) * bsize, extent)))
        else:
            idx = (blocks[:, None] * bsize + offs).ravel()
            idx = idx[idx < extent]  # only the last block can be partial
            sel.append((at, at + idx.size))
            pieces.append(idx)
            at += idx.size
    if pieces:
        dev = xp.asarray(np.concatenate(pieces))
        sel = [dev[s[0]:s[1]] if isinstance(s, tuple) else s for s in sel]
    return sel, False
