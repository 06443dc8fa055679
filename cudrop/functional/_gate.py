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

from .. import backend

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
    """The body's input gradient where the body ran, zeros where it was skipped."""
    xp = backend.get_array_module(grad_out)
    return xp.where(saved.scale != 0, grad_out, 0).astype(grad_out.dtype, copy=False)


def gate_out(t, f, scale):
    """``t + f * scale`` where ``scale != 0``, else ``t`` (``f`` unread). Returns
    ``(y, saved)``."""
    xp = backend.get_array_module(t, f)
    if t.shape != f.shape or t.dtype != f.dtype:
        raise ValueError(f"gate_out: the shortcut {t.shape} {t.dtype} and the body's output "
                         f"{f.shape} {f.dtype} must match")
    # select before multiplying: a stale inf never meets the 0 (no NaN, no NumPy warning), and
    # t + 0 * 0 is t (up to the sign of a zero)
    y = xp.where(scale != 0, f, 0).astype(f.dtype, copy=False) * _scale(scale, f.dtype) + t
    return y, GateSaved(scale)


def gate_out_backward(grad_out, saved):
    """``(grad_out, grad_out * scale)``."""
    return grad_out, grad_out * _scale(saved.scale, grad_out.dtype)
