"""A Linear whose *output* is block-dropped, computed only where kept (output pruning, the gyro
paper's block-wise dropout on a layer's output) on raw arrays:

    y = act(x @ w + b) ⊙ m / q        (sdd: dropped output blocks are never computed)

with ``m`` a :class:`cudrop.masks.BlockMask` over the (M, N) output (leading axes of x are rows)
and ``act`` None or 'relu'. Backward runs on the kept blocks only: with ``g = dy ⊙ m / q ⊙
act'``, ``dx = g @ wᵀ`` skips g's dropped blocks along N (dsd) and ``dw = xᵀ @ g`` sums each
column block of dw over its kept row blocks (dsd_t on gᵀ, written through a transposed view).
The next layer can prune its input with the same mask (``sparsedrop_linear(y, w2, mask=m')``
with ``m'`` the mask at p = 0, since y is already scaled).
"""
from __future__ import annotations

from .. import backend, masks
from .. import bsmm
from .gyro import blockwise_dropout_backward

__all__ = ["pruned_linear", "pruned_linear_backward"]

_ACTS = (None, "relu")


def pruned_linear(x, w, b, mask, act=None):
    """``(y, saved)`` with ``y = act(x @ w + b) ⊙ m / q`` of shape (..., N)."""
    if act not in _ACTS:
        raise ValueError(f"pruned_linear: act must be None or 'relu', got {act!r}")
    if not isinstance(mask, masks.BlockMask):
        raise TypeError(f"pruned_linear: mask must be a cudrop.masks.BlockMask, got "
                        f"{type(mask).__name__}")
    backend.get_array_module(x, w, b, mask.bits)  # raises on mixed NumPy/CuPy
    x2 = x.reshape(-1, x.shape[-1])
    # the epilogue computes act(scale · acc + bias): fold 1/q into the bias (relu commutes
    # with a positive scale)
    scale = 1.0 / mask.q
    bias = None if b is None else (b * b.dtype.type(scale)).astype(b.dtype)
    y = bsmm.sdd(x2, w, mask, scale, bias=bias, act=act)
    saved = {"x": x2, "w": w, "y": y, "mask": mask, "act": act, "bias": b is not None,
             "x_shape": x.shape}
    return y.reshape(x.shape[:-1] + (w.shape[1],)), saved


def pruned_linear_backward(grad_out, saved):
    """``(gx, gw, gb)``; ``gb`` is None without a bias."""
    x, w, y, mask = saved["x"], saved["w"], saved["y"], saved["mask"]
    xp = backend.get_array_module(grad_out, y)
    scale = 1.0 / mask.q
    g = grad_out.reshape(y.shape)
    # The GEMMs read only g's kept blocks and apply 1/q themselves; g needs masking only by the
    # activation (y > 0 exactly where kept and active) and, for the bias sum, by the mask.
    if saved["act"] == "relu":
        g = xp.where(y > 0, g, g.dtype.type(0))
        gb = g.sum(axis=0) * g.dtype.type(scale) if saved["bias"] else None
    else:
        gb = blockwise_dropout_backward(g, {"mask": mask}).sum(axis=0) if saved["bias"] else None
    gx = bsmm.dsd(g, w.T, mask, scale).reshape(saved["x_shape"])
    gw = xp.empty(w.shape, w.dtype)
    bsmm.dsd_t(g, x, mask, scale, out=gw.T)
    return gx, gw, gb
