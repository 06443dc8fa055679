"""SparseDrop linear (Lo, "Efficient Sparse Training with Structured Dropout") on raw arrays.

``Y = (X ⊙ m) W / q + b`` with ``m`` i.i.d. Bernoulli(q) per ``(Mb, Kb)`` block of ``X``, and

    dX = (dY Wᵀ) ⊙ m / q        (sdd: only kept blocks of dX are computed)
    dW = (X ⊙ m)ᵀ dY / q        (dsd_t: only kept row blocks of X feed each K-block of dW)
    db = Σ_rows dY

The three products are the block-sparse GEMMs of :mod:`cudrop.bsmm` (CUDA kernels on CuPy
arrays that walk the mask's kept-block lists on the device, a gathering reference on NumPy),
through the block-masked ops SparseDrop shares with block-wise dropout
(``functional/_block_linear.py``): the multiply-adds are the kept elements of ``m`` times N.

This module: the mask draw (``draw_mask``) and the pairs ``sparsedrop`` (the mask alone) and
``sparsedrop_linear`` (the mask fused into a Linear's GEMMs).
"""
from __future__ import annotations

import numpy as np

from .. import backend, masks, philox, random
from ..functional._block_linear import (block_masked, block_masked_backward, block_masked_linear,
                                        block_masked_linear_backward, check_block_mask)

__all__ = ["draw_mask", "sparsedrop", "sparsedrop_backward", "sparsedrop_linear",
           "sparsedrop_linear_backward"]

DEFAULT_BLOCK = (128, 128)


def draw_mask(shape, p, *, block=DEFAULT_BLOCK, seed=None, layer=0, step=None, xp=np,
              row_offset=0):
    """SparseDrop's mask over an (M, K) operand: i.i.d. Bernoulli(1 - p) keep per ``block``
    = (Mb, Kb) block, a pure function of (seed, layer, step); a ``cudrop.masks.BlockMask`` drawn,
    packed and listed in one launch on CuPy (``xp=cupy``). ``seed=None``: the global generator
    (``cudrop.random``). On CuPy ``step`` may be a device step (a 0-d uint32 CuPy array, read by
    the kernel when it runs; ``masks.block_mask``). ``row_offset``: the first row block's index
    in a taller operand (a data-parallel rank's rows of the global batch)."""
    seed, step = random.resolve(seed, step)
    return masks.block_mask(shape, block, philox.check_prob(p), seed=seed, layer=layer,
                            step=step, xp=xp, row_offset=row_offset)


def sparsedrop(x, p=None, *, mask=None, block=None, seed=None, layer=0, step=None):
    """SparseDrop's mask on its own: ``(y, saved)`` with ``y = x ⊙ m / (1 - p)``, ``x`` (..., K)
    viewed as (M, K) rows x units. ``mask`` (a BlockMask over (M, K)) or else one drawn by
    :func:`draw_mask`. Skips no work by itself: before a Linear use :func:`sparsedrop_linear`."""
    p, block = resolve_p_block(p, block, mask)
    if mask is None:
        shape = (int(np.prod(x.shape[:-1], dtype=np.int64)), x.shape[-1])
        mask = draw_mask(shape, p, block=block, seed=seed, layer=layer, step=step,
                         xp=backend.get_array_module(x))
    else:
        _check_mask(mask, block, p)
    return block_masked(x, mask)


sparsedrop_backward = block_masked_backward


# ---- the functional pair ---------------------------------------------------------------------

def sparsedrop_linear(x, w, b=None, p=None, *, mask=None, block=None, seed=None, layer=0,
                      step=None):
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
    if mask is None:
        shape = (int(np.prod(x.shape[:-1], dtype=np.int64)), x.shape[-1])
        mask = draw_mask(shape, p, block=block, seed=seed, layer=layer, step=step, xp=xp)
    else:
        _check_mask(mask, block, p)
    return block_masked_linear(x, w, b, mask)


sparsedrop_linear_backward = block_masked_linear_backward


# ---- helpers ---------------------------------------------------------------------------------

def resolve_p_block(p, block, mask):
    """``(p, block)`` from the arguments, falling back to a given mask's."""
    if mask is not None:
        check_block_mask("sparsedrop", mask)
    if p is None:
        if mask is None:
            raise TypeError("sparsedrop: p is required when no mask is given")
        p = mask.p
    if block is None:
        block = mask.block if mask is not None else DEFAULT_BLOCK
    return philox.check_prob(p), masks.check_block(block)


def _check_mask(mask, block, p):
    """A given mask against the ``block`` and ``p`` passed with it (its shape against x's is
    checked where it is applied, ``functional._block_linear``)."""
    if tuple(mask.block) != tuple(block):
        raise ValueError(f"sparsedrop: mask has block {tuple(mask.block)} but "
                         f"block={tuple(block)}; pass the mask's block")
    if mask.p != p:
        raise ValueError(f"sparsedrop: mask was made with p={mask.p} but p={p}; the "
                         "scale 1 / (1 - p) must match the mask")
