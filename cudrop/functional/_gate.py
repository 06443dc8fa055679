"""The two ends of a residual body that a captured step runs or skips per replay (depth dropout
and stochastic depth in a CUDA graph: ``cudrop.graph.gate``), on raw arrays.

``scale`` is a 0-d device array the replay fills: the body's scale when the body runs, 0 when
it is skipped. A skipped body leaves its output and its input gradient as stale buffers, so
both ends *select* on ``scale`` instead of multiplying (0 x a stale inf would be NaN):

- ``gate_out(t, f, scale) = t + f * scale`` where ``scale != 0``, else ``t`` (the stale ``f``
  is replaced by 0 before the multiply); its backward
  gives ``t`` the gradient and ``f`` the gradient times ``scale``;
- ``gate_in(x, scale) = x`` marks where the body starts; its backward passes the body's input
  gradient where ``scale != 0`` and zeros where it was skipped.

The kept case rounds as eager mode's ``f * s + t`` (``f + t`` at ``s = 1``, where ``f * 1`` is
exact), so captured steps stay bit-identical to eager ones.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import backend, raw_kernels
from . import _act

Array = Any  # a NumPy or CuPy array


class GateSaved(NamedTuple):
    """The replay's scale (0-d device array)."""
    scale: Array


def _scale(scale, dtype):
    return scale.astype(dtype, copy=False)


def gate_in(x, scale):
    """``x`` itself, where a gated body starts. Returns ``(x, saved)``."""
    return x, GateSaved(scale)


def gate_in_backward(grad_out, saved):
    """The body's input gradient where the body ran, zeros where it was skipped (on the GPU one
    pass, ``act.cu``'s ``gate_in_bwd``)."""
    if _act._elementwise_gpu(grad_out):
        s = raw_kernels.aligned(_scale(saved.scale, grad_out.dtype), 16)
        return _act._map("gate_in_bwd", grad_out, extra=(s,))
    xp = backend.get_array_module(grad_out)
    return xp.where(saved.scale != 0, grad_out, 0).astype(grad_out.dtype, copy=False)


class GateOutSaved(NamedTuple):
    """The replay's scale (0-d device array) and, with ``act='relu'``, the output."""
    scale: Array
    y: Array | None


def gate_out(t, f, scale, act=None):
    """``t + f * scale`` where ``scale != 0``, else ``t`` (``f`` unread), followed by a ReLU
    with ``act='relu'`` (one kernel on the GPU: ``act.cu``'s ``gate_relu_fwd``). Returns
    ``(y, saved)``."""
    xp = backend.get_array_module(t, f)
    if t.shape != f.shape or t.dtype != f.dtype:
        raise ValueError(f"gate_out: the shortcut {t.shape} {t.dtype} and the body's output "
                         f"{f.shape} {f.dtype} must match")
    if act not in (None, "relu"):
        raise ValueError(f"gate_out: act must be None or 'relu', got {act!r}")
    if act and _act._elementwise_gpu(t):
        y = _act._map("gate_relu_fwd", t, f, (raw_kernels.aligned(_scale(scale, f.dtype), 16),))
        return y, GateOutSaved(scale, y)
    # select before multiplying: a stale inf never meets the 0 (no NaN, no NumPy warning), and
    # t + 0 * 0 is t (up to the sign of a zero)
    y = xp.where(scale != 0, f, 0).astype(f.dtype, copy=False) * _scale(scale, f.dtype) + t
    if act:
        y = xp.maximum(y, y.dtype.type(0))
    return y, GateOutSaved(scale, y if act else None)


def gate_out_backward(grad_out, saved):
    """``(g, g * scale)`` with ``g`` the gradient through the ReLU when there was one."""
    if saved.y is not None and _act._elementwise_gpu(grad_out) \
            and grad_out.dtype == saved.y.dtype:
        cp = backend.cupy
        y, g = raw_kernels.aligned(saved.y, 16), raw_kernels.aligned(grad_out, 16)
        gt, gf = cp.empty(y.shape, y.dtype), cp.empty(y.shape, y.dtype)
        if y.size:
            s = raw_kernels.aligned(_scale(saved.scale, y.dtype), 16)
            raw_kernels.launch("act.cu", "gate_relu_bwd", y.dtype,
                               (min(-(-y.size // 256), 8192),), (256,),
                               (y, g, s, gt, gf, np.int64(y.size)))
        return gt.reshape(grad_out.shape), gf.reshape(grad_out.shape)
    g = grad_out
    if saved.y is not None:
        g = _act.relu_backward(grad_out, _act.ReluSaved(saved.y))
    return g, g * _scale(saved.scale, g.dtype)
