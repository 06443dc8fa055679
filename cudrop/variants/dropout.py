"""Inverted element dropout on raw arrays, with counter-based masks.

The mask is a pure function of (seed, layer, step) and the element's flat index (``masks.py``),
so the CPU and the GPU draw the same bits and backward needs only the packed bits (n / 8 bytes),
not a float or bool mask. On CuPy arrays forward is one fused kernel pass (draw, scale, pack) and
backward one pass over the bits.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend, masks, philox, random
from ..raw_kernels import cuda_type, launch, vector_aligned

_THREADS = 256


class DropoutSaved(NamedTuple):
    """What :func:`dropout_backward` needs: the packed keep bits (None at p = 0) and 1/q."""
    mask: masks.ElementMask | None
    scale: float


def _check_x(x):
    if cuda_type(x.dtype) is None:
        raise TypeError(f"x must be a float16, bfloat16, float32 or float64 array, got dtype "
                        f"{x.dtype}")


def dropout(x, p, *, seed=None, layer=0, step=None, offset=0):
    """Inverted element dropout: ``y = x * m / (1 - p)``, ``m`` i.i.d. Bernoulli(1 - p) per
    element, a pure function of (seed, layer, step) and the element's flat index.

    ``x`` any shape, float16/bfloat16/float32/float64; ``p`` the drop probability in [0, 1).
    ``step`` an int, or on CuPy a device step (a 0-d uint32 CuPy array, read by the kernel when
    it runs: a captured CUDA graph draws a new mask per replay once the host writes the step).
    Nothing is skipped (the baseline variant); on CuPy it is one fused pass that draws, scales
    and packs the mask into bits, and backward reads only those bits. ``offset`` (a multiple of
    4): the flat index of x's first element in a larger array whose mask x takes its part of
    (a data-parallel rank's rows of the global batch, ``cudrop.distributed``).

    Returns ``(y, saved)``; ``saved`` holds the ``ElementMask`` (packed bits) for
    :func:`dropout_backward`. ``p == 0`` returns ``x`` itself. Non-contiguous inputs are copied.
    """
    p = philox.check_prob(p)
    _check_x(x)
    xp = backend.get_array_module(x)
    seed, step = random.resolve(seed, step, xp)
    layer = philox.check_seed("layer", layer)
    offset = masks.check_offset(offset, x.size)
    if offset % 4:
        raise ValueError(f"dropout: offset must be a multiple of 4 (four elements share a "
                         f"Philox counter), got {offset}")
    if p == 0:
        return x, DropoutSaved(None, 1.0)
    scale = 1.0 / (1.0 - p)
    if xp is np:
        mask = masks.element_mask(x.size, p, seed=seed, layer=layer, step=step, offset=offset)
        keep = mask.to_dense().reshape(x.shape)
        y = np.where(keep, x * x.dtype.type(scale), x.dtype.type(0))
    else:
        y, mask = _dropout_gpu(xp, x, p, scale, seed, layer, step, offset)
    return y, DropoutSaved(mask, scale)


def dropout_backward(grad_out, saved):
    """``grad_out * m / (1 - p)`` from the saved bits."""
    mask = saved.mask
    if mask is None:
        return grad_out
    xp = backend.get_array_module(grad_out)
    if xp is np:
        keep = mask.to_dense().reshape(grad_out.shape)
        return np.where(keep, grad_out * grad_out.dtype.type(saved.scale),
                        grad_out.dtype.type(0))
    g = vector_aligned(grad_out)
    gx = xp.empty_like(g)
    n = g.size
    if n:
        launch("dropout.cu", "dropout_bwd", g.dtype, (-(-n // (4 * _THREADS)),), (_THREADS,),
               (g, mask.bits, gx, np.int64(n), np.float64(saved.scale)))
    return gx


def _dropout_gpu(cp, x, p, scale, seed, layer, step, offset=0):
    x = vector_aligned(x)
    n = x.size
    y = cp.empty_like(x)
    words = -(-n // 64)
    bits = cp.empty((1, max(words, 1)), np.uint64)
    if n:
        threads = 16 * words  # one per 4 elements, and enough to write every bit word
        step_value, step_ptr = philox.step_args(step)
        launch("dropout.cu", "dropout_fwd", x.dtype, (-(-threads // _THREADS),), (_THREADS,),
            (x, y, bits, np.int64(n), np.int64(2 * words), np.uint32(seed), np.uint32(layer),
             step_value, step_ptr, np.uint32(philox.threshold(p)), np.float64(scale),
             np.int64(offset // 4)))
    return y, masks.ElementMask(n, p, bits)
