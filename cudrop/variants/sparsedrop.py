"""SparseDrop linear (Lo, "Efficient Sparse Training with Structured Dropout") on raw arrays.

``Y = (X ⊙ m) W / q + b`` with ``m`` i.i.d. Bernoulli(q) per ``(Mb, Kb)`` block of ``X``, and

    dX = (dY Wᵀ) ⊙ m / q        (sdd: only kept blocks of dX are computed)
    dW = (X ⊙ m)ᵀ dY / q        (dsd_t: only kept row blocks of X feed each K-block of dW)
    db = Σ_rows dY

The three products are the block-sparse GEMMs of :mod:`cudrop.functional.bsmm` (CUDA kernels
on CuPy arrays that walk the mask's kept-block lists on the device, a gathering reference on
NumPy): the multiply-adds are the kept elements of ``m`` times N, so the work falls with p.
"""
from __future__ import annotations

import numpy as np

from .. import backend, masks, philox
from .. import bsmm

__all__ = ["sparsedrop_linear", "sparsedrop_linear_backward", "dsd", "sdd", "dsd_t"]

_FLOATS = ("float16", "bfloat16", "float32", "float64")


# ---- the three products (bsmm's block-sparse GEMMs) ------------------------------------------

def dsd(x, w, mask, scale, bias=None):
    """``(x ⊙ m) @ w * scale + bias``: x (M, K), w (K, N) -> (M, N); dropped K-blocks are
    skipped."""
    return bsmm.dsd(x, w, mask, scale, bias=bias)


def sdd(dy, w, mask, scale):
    """``(dy @ wᵀ) ⊙ m * scale``: dy (M, N), w (K, N) -> (M, K); only kept blocks are
    computed, dropped ones are exact zeros."""
    return bsmm.sdd(dy, w.T, mask, scale)


def dsd_t(x, dy, mask, scale):
    """``(x ⊙ m)ᵀ @ dy * scale``: x (M, K), dy (M, N) -> (K, N); each K-block of dW sums over
    its kept row blocks only (the transposed lists)."""
    return bsmm.dsd_t(x, dy, mask, scale)


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
    y = dsd(x2, w, mask, scale, bias=b)
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


