"""Ops on any ``BlockMask`` that SparseDrop and block-wise gyro dropout share (their masks
differ; what is skipped is the same). Not a variant: the variants call these with their own
masks.

- ``block_masked(x, mask)``: ``x ⊙ m / q`` on an (..., K) array viewed as (M, K).
- ``block_masked_linear(x, w, b, mask)``: ``(x ⊙ m) @ w / q + b`` on the block-sparse GEMMs
  (``cudrop.bsmm``): dsd forward, ``dX = (dY Wᵀ) ⊙ m / q`` (sdd) and
  ``dW = (X ⊙ m)ᵀ dY / q`` (dsd_t) backward, so dropped blocks cost no work.

Backward convention: ``*_backward(grad_out, saved)`` returns one gradient per array input of
the forward, in its order (None for a bias that was None).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend, bsmm, masks
from ._act import LinearSaved, linear, linear_backward
from ._reduce import sum_leading

_FLOATS = ("float16", "bfloat16", "float32", "float64")


def check_block_mask(op, mask):
    if not isinstance(mask, masks.BlockMask):
        raise TypeError(f"{op}: mask must be a cudrop.masks.BlockMask, got "
                        f"{type(mask).__name__}")
    return mask


def _check_float(op, name, a):
    if not (hasattr(a, "ndim") and hasattr(a, "dtype")):
        raise TypeError(f"{op}: {name} must be a NumPy or CuPy array, got {type(a).__name__}")
    if a.dtype.name not in _FLOATS:
        raise TypeError(f"{op}: {name} must be a float16, bfloat16, float32 or float64 array, "
                        f"got dtype {a.dtype}")


# ---- x ⊙ m / q ---------------------------------------------------------------------------------

def apply_block_mask(x2, mask):
    """``x2 * m / q`` for an (M, K) array, 1/q rounded to x2's dtype as a dropout's scale is
    (``masks.apply_block``)."""
    return masks.apply_block(x2, mask, float(x2.dtype.type(1.0 / mask.q)))


class BlockMaskedSaved(NamedTuple):
    """The BlockMask (bits and kept-block lists, never a float mask)."""
    mask: masks.BlockMask


def block_masked(x, mask):
    """``(y, saved)``, ``y = x ⊙ m / q`` with ``x`` (..., K) viewed as (M, K) (every leading
    axis a row) and ``m`` a BlockMask over (M, K)."""
    _check_float("block_masked", "x", x)
    check_block_mask("block_masked", mask)
    y = apply_block_mask(x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x, mask)
    return y.reshape(x.shape), BlockMaskedSaved(mask)


def block_masked_backward(grad_out, saved):
    """``grad_out ⊙ m / q``."""
    _check_float("block_masked_backward", "grad_out", grad_out)
    g2 = grad_out.reshape(-1, grad_out.shape[-1]) if grad_out.ndim != 2 else grad_out
    return apply_block_mask(g2, saved.mask).reshape(grad_out.shape)


# ---- (x ⊙ m) @ w / q + b -----------------------------------------------------------------------

class BlockMaskedLinearSaved(NamedTuple):
    """The mask, 1/q, the (M, K) input and the weight; whether there was a bias; x's shape. On
    the dense path ``x`` and ``w`` are None and ``dense`` is the Linear's saved (the masked copy
    of x, the weight)."""
    mask: masks.BlockMask
    scale: float
    x: object
    w: object
    has_bias: bool
    x_shape: tuple
    dense: LinearSaved | None = None


def check_linear(op, x, w, b):
    """``(x as (M, K), w, b)`` after checking shapes and dtypes (errors name ``op``)."""
    _check_float(op, "x", x)
    for name, a in (("w", w), ("b", b)):
        if a is not None and not (hasattr(a, "ndim") and hasattr(a, "dtype")):
            raise TypeError(f"{op}: {name} must be a NumPy or CuPy array, got "
                            f"{type(a).__name__}")
    if x.ndim < 1:
        raise ValueError(f"{op}: x must have shape (..., K), got a 0-d array")
    if w.ndim != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: w must have shape (K, N) with K = {x.shape[-1]} (the last axis "
                         f"of x), got shape {w.shape}")
    if b is not None and b.shape != (w.shape[1],):
        raise ValueError(f"{op}: b must have shape (N,) = ({w.shape[1]},), got shape {b.shape}")
    for name, a in (("w", w), ("b", b)):
        if a is not None and a.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {a.dtype} but x has {x.dtype}; the dtypes "
                            "must be equal")
    m = int(np.prod(x.shape[:-1], dtype=np.int64))
    return x.reshape(m, x.shape[-1]), w, b


def block_masked_linear(x, w, b, mask):
    """``(y, saved)``, ``y = (x ⊙ m) @ w / q + b``: ``x`` (..., K) (leading axes are rows),
    ``w`` (K, N), ``b`` (N,) or None, ``m`` a BlockMask over (M, K). Dropped K-blocks of each
    row block are neither loaded nor multiplied."""
    backend.get_array_module(x, w, b, getattr(mask, "bits", None))
    x2, w, b = check_linear("block_masked_linear", x, w, b)
    check_block_mask("block_masked_linear", mask)
    if tuple(mask.shape) != tuple(x2.shape):
        raise ValueError(f"block_masked_linear: mask covers shape {tuple(mask.shape)} but x is "
                         f"{tuple(x2.shape)} as (M, K) (leading axes flattened)")
    scale = 1.0 / mask.q
    if bsmm.runs_dense("dsd", x2, w, mask, scale, bias=b):
        # No block-sparse kernel runs the product fast (block-wise gyro's 32-unit blocks on
        # Hopper): dsd would be cuBLASLt on a masked copy of x, and so would dW's dsd_t, masking
        # x again. One masked copy, kept for dW, and the Linear's pair on it instead.
        y, lin = linear(masks.apply_block(x2, mask, scale), w, b)
        saved = BlockMaskedLinearSaved(mask, scale, None, None, b is not None, x.shape, lin)
        return y.reshape(x.shape[:-1] + (w.shape[1],)), saved
    y = bsmm.dsd(x2, w, mask, scale, bias=b)
    saved = BlockMaskedLinearSaved(mask, scale, x2, w, b is not None, x.shape)
    return y.reshape(x.shape[:-1] + (w.shape[1],)), saved


def block_masked_linear_backward(grad_out, saved):
    """``(gx, gw, gb)``; ``gx`` is exact zeros on every dropped block, ``gb`` None without a
    bias."""
    x, w, mask, scale = saved.x, saved.w, saved.mask, saved.scale
    if saved.dense is not None:  # dX = (dY Wᵀ) ⊙ m / q, as the dense sdd computes it
        gxm, gw, gb = linear_backward(grad_out, saved.dense)
        gx = masks.apply_block(gxm.reshape(mask.shape), mask, scale)
        return gx.reshape(saved.x_shape), gw, gb
    g = grad_out.reshape(x.shape[0], w.shape[1])
    gx = bsmm.sdd(g, w.T, mask, scale).reshape(saved.x_shape)
    gw = bsmm.dsd_t(x, g, mask, scale)
    gb = sum_leading(g) if saved.has_bias else None
    return gx, gw, gb
