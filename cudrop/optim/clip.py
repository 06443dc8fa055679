"""Gradient clipping by global L2 norm."""
from __future__ import annotations

import math

from .. import backend
from .optimizer import check_number

__all__ = ["clip_grad_norm"]


def clip_grad_norm(params, max_norm: float, eps: float = 1e-6) -> float:
    """Scale every gradient by ``max_norm / (total_norm + eps)`` when the global L2 norm over
    all gradients exceeds ``max_norm``; return that norm (before clipping) as a float.

    Each ``p.grad`` is replaced by a scaled copy, never scaled in place, because autograd may
    give several leaves the same gradient array. A non-finite norm is returned and the
    gradients are left alone, so the caller can skip the step.
    """
    max_norm = check_number("max_norm", max_norm, low=0.0, low_open=True)
    if hasattr(params, "data") and hasattr(params, "grad"):
        params = [params]
    params = [p for p in params if p.grad is not None]
    sq = 0.0
    # One device reduction per parameter, summed on the device: a single host sync at the end.
    partial = {}
    for p in params:
        g = p.grad
        xp = backend.get_array_module(g)
        g = g.astype(xp.float32) if g.dtype.itemsize < 4 else g
        flat = g.ravel()
        s = xp.dot(flat, flat)
        key = id(xp)
        partial[key] = s if key not in partial else partial[key] + s
    for s in partial.values():
        sq += float(s)
    total = math.sqrt(sq)
    if math.isfinite(total) and total > max_norm:
        coef = max_norm / (total + eps)
        for p in params:
            p.grad = (p.grad * coef).astype(p.grad.dtype, copy=False)
    return total
