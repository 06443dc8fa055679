"""Losses on raw arrays: softmax cross entropy and mean squared error.

Backward convention: ``*_backward(grad_out, saved)`` returns one gradient per array input of the
forward, in order: ``(glogits, None)`` (integer targets get none), ``(gpred, gtarget)``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import backend
from .._checks import check_index_range
from ._norm import compute_dtype

_REDUCTIONS = ("mean", "sum", "none")
Array = Any  # a NumPy or CuPy array


class CrossEntropySaved(NamedTuple):
    """What :func:`cross_entropy_backward` needs: log-softmax (compute dtype) and the targets."""
    log_p: Array
    targets: Array
    reduction: str
    dtype: np.dtype  # the logits'


class MseLossSaved(NamedTuple):
    """What :func:`mse_loss_backward` needs: ``pred - target`` (compute dtype) and the dtypes."""
    diff: Array
    reduction: str
    pred_dtype: np.dtype
    target_dtype: np.dtype


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_float(name, a):
    if not backend.is_floating(a.dtype):
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")


def _reduce(xp, loss, reduction, dtype):
    if reduction == "none":
        return loss.astype(dtype, copy=False)
    total = loss.sum()
    if reduction == "mean":
        # an empty batch gives NaN (0/0), as PyTorch does, without a NumPy warning
        total = total / loss.size if loss.size else total * float("nan")
    return xp.asarray(total).astype(dtype, copy=False)


def cross_entropy(logits, targets, reduction="mean"):
    """Softmax cross entropy ``-log softmax(logits)[target]``.

    ``logits`` has shape (..., C); ``targets`` holds integer class indices in [0, C) with shape
    ``logits.shape[:-1]``. A target outside [0, C) raises ``cudrop.IndexRangeError``: at once on
    NumPy, at the next ``cudrop.check_errors()`` on the GPU (the call itself never waits for
    the device; its loss is garbage then). Returns ``(loss, saved)`` (a
    :class:`CrossEntropySaved`) for :func:`cross_entropy_backward`.
    """
    xp = backend.get_array_module(logits, targets)
    _check_reduction(reduction)
    _check_float("logits", logits)
    if logits.ndim < 1:
        raise ValueError("logits must have shape (..., C) with classes on the last axis, got a "
                         "0-d array")
    if not hasattr(targets, "dtype") or targets.dtype.kind not in "iu":
        raise TypeError(f"targets must be an integer array of class indices, got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    c = logits.shape[-1]
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (logits.shape[:-1]),"
                         f" got {tuple(targets.shape)}")
    if targets.size:
        if c == 0:
            raise ValueError("logits has 0 classes on its last axis")
        # No host read on the GPU: a bad target is raised at the next check point, and until
        # then take_along_axis wraps it into the classes (CuPy's indexing), so it reads logits.
        check_index_range("targets", targets, 0, c, op="cross_entropy")
    cdt = compute_dtype(logits.dtype)
    z = logits.astype(cdt, copy=False)
    shifted = z - z.max(axis=-1, keepdims=True) if c else z
    log_sum = xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))
    log_p = shifted - log_sum
    picked = xp.take_along_axis(log_p, targets[..., None].astype(xp.intp, copy=False), axis=-1)
    loss = -picked[..., 0]
    saved = CrossEntropySaved(log_p, targets, reduction, logits.dtype)
    return _reduce(xp, loss, reduction, logits.dtype), saved


def cross_entropy_backward(grad_out, saved: CrossEntropySaved):
    """Gradients ``(glogits, None)``: ``(softmax - onehot(target)) * grad`` for the logits,
    none for the integer targets."""
    xp = backend.get_array_module(grad_out, saved.log_p)
    log_p, targets = saved.log_p, saved.targets
    c = log_p.shape[-1]
    g = grad_out.astype(log_p.dtype, copy=False)
    if saved.reduction == "none":
        g = g[..., None]
    elif saved.reduction == "mean" and targets.size:
        g = g / targets.size
    onehot = targets[..., None] == xp.arange(c, dtype=targets.dtype)
    gx = (xp.exp(log_p) - onehot) * g
    return gx.astype(saved.dtype, copy=False), None


def mse_loss(pred, target, reduction="mean"):
    """Mean squared error ``(pred - target) ** 2``; ``target`` must have ``pred``'s shape.
    Returns ``(loss, saved)`` (an :class:`MseLossSaved`) for :func:`mse_loss_backward`."""
    xp = backend.get_array_module(pred, target)
    _check_reduction(reduction)
    _check_float("pred", pred)
    _check_float("target", target)
    if tuple(target.shape) != tuple(pred.shape):
        raise ValueError(f"target must have the shape of pred {tuple(pred.shape)}, got "
                         f"{tuple(target.shape)}")
    cdt = compute_dtype(pred.dtype)
    diff = pred.astype(cdt, copy=False) - target.astype(cdt, copy=False)
    saved = MseLossSaved(diff, reduction, pred.dtype, target.dtype)
    return _reduce(xp, diff * diff, reduction, pred.dtype), saved


def mse_loss_backward(grad_out, saved: MseLossSaved):
    """Gradients ``(gpred, gtarget)``."""
    diff = saved.diff
    g = grad_out.astype(diff.dtype, copy=False)
    if saved.reduction == "mean" and diff.size:
        g = g / diff.size
    gp = 2.0 * diff * g
    return gp.astype(saved.pred_dtype, copy=False), (-gp).astype(saved.target_dtype, copy=False)
