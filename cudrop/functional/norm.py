"""Batch and layer normalisation on raw arrays.

Statistics are computed in float32 at least: float16 sums over a batch lose the mean's low bits
and its variance can underflow, so half inputs are upcast for the reductions and the output is
cast back.
"""
from __future__ import annotations

import numbers

import numpy as np

from .. import backend


def compute_dtype(dtype):
    """float64 stays float64; float32 stays; anything narrower (float16, bfloat16) -> float32."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize >= 4:
        return dtype
    return np.dtype(np.float32)


def _check_float(name, a):
    kind = a.dtype.kind
    # bfloat16 (ml_dtypes) reports kind 'V'; accept it by name
    if kind != "f" and a.dtype.name != "bfloat16":
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")


def _check_param(name, a, c):
    if a is None:
        return
    if tuple(a.shape) != (c,):
        raise ValueError(f"{name} must have shape ({c},) to match the {c} channels of x, "
                         f"got {tuple(a.shape)}")


def _check_eps(eps):
    if not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def batch_norm(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    """Batch normalisation over every axis but the channel axis 1.

    ``x`` has shape (N, C) or (N, C, ...). ``gamma``/``beta`` (shape (C,)) may be None for no
    affine map. In training the batch statistics normalise ``x`` and ``running_mean`` /
    ``running_var`` (when given) are updated in place with the unbiased batch variance, as
    PyTorch does; in eval the running statistics normalise ``x``.
    Returns ``(y, saved)`` for :func:`batch_norm_backward`.
    """
    xp = backend.get_array_module(x, gamma, beta, running_mean, running_var)
    _check_float("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C) or (N, C, ...) with channels on axis 1, "
                         f"got shape {tuple(x.shape)}")
    c = x.shape[1]
    for name, a in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_param(name, a, c)
    _check_eps(eps)
    if not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    axes = (0,) + tuple(range(2, x.ndim))
    n = x.size // c if c else 0
    bshape = (1, c) + (1,) * (x.ndim - 2)
    cdt = compute_dtype(x.dtype)
    xc = x.astype(cdt, copy=False)

    if training:
        if n < 2:
            raise ValueError(f"batch_norm in training needs more than one value per channel; "
                             f"x has shape {tuple(x.shape)}")
        mean = xc.mean(axis=axes)
        centered = xc - mean.reshape(bshape)
        var = (centered * centered).mean(axis=axes)
        inv_std = 1.0 / xp.sqrt(var + eps)
        xhat = centered * inv_std.reshape(bshape)
        for run, stat in ((running_mean, mean), (running_var, var * (n / (n - 1)))):
            if run is not None:
                run *= 1 - momentum
                run += (momentum * stat).astype(run.dtype, copy=False)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm in eval mode needs running_mean and running_var")
        inv_std = 1.0 / xp.sqrt(running_var.astype(cdt, copy=False) + eps)
        xhat = (xc - running_mean.astype(cdt, copy=False).reshape(bshape)) * inv_std.reshape(bshape)

    y = xhat
    if gamma is not None:
        y = y * gamma.astype(cdt, copy=False).reshape(bshape)
    if beta is not None:
        y = y + beta.astype(cdt, copy=False).reshape(bshape)
    y = y.astype(x.dtype, copy=False)
    saved = {"training": bool(training), "xhat": xhat, "inv_std": inv_std, "gamma": gamma,
             "beta_dtype": None if beta is None else beta.dtype, "axes": axes,
             "bshape": bshape, "n": n, "x_dtype": x.dtype}
    return y, saved


def batch_norm_backward(grad_out, saved):
    """Gradients ``(gx, ggamma, gbeta)``; ``ggamma``/``gbeta`` are None where the forward had
    no gamma/beta."""
    xhat, inv_std, gamma = saved["xhat"], saved["inv_std"], saved["gamma"]
    axes, bshape, n = saved["axes"], saved["bshape"], saved["n"]
    g = grad_out.astype(xhat.dtype, copy=False)
    gbeta_c = g.sum(axis=axes)
    ggamma_c = (g * xhat).sum(axis=axes)
    scale = inv_std if gamma is None else inv_std * gamma.astype(xhat.dtype, copy=False)
    if saved["training"]:
        # d xhat / d x through the batch mean and variance:
        # gx = gamma * inv_std / n * (n g - sum(g) - xhat * sum(g xhat))
        gx = (scale / n).reshape(bshape) * (
            n * g - gbeta_c.reshape(bshape) - xhat * ggamma_c.reshape(bshape))
    else:
        gx = g * scale.reshape(bshape)
    gx = gx.astype(saved["x_dtype"], copy=False)
    ggamma = None if gamma is None else ggamma_c.astype(gamma.dtype, copy=False)
    gbeta = None
    if saved["beta_dtype"] is not None:
        gbeta = gbeta_c.astype(saved["beta_dtype"], copy=False)
    return gx, ggamma, gbeta


def layer_norm(x, gamma, beta, eps=1e-5):
    """Layer normalisation over the last axis; ``gamma``/``beta`` of shape ``x.shape[-1:]``
    (either may be None). Returns ``(y, saved)`` for :func:`layer_norm_backward`."""
    xp = backend.get_array_module(x, gamma, beta)
    _check_float("x", x)
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension (the normalised last axis)")
    d = x.shape[-1]
    for name, a in (("gamma", gamma), ("beta", beta)):
        if a is not None and tuple(a.shape) != (d,):
            raise ValueError(f"{name} must have shape ({d},) to match the last axis of x, got "
                             f"{tuple(a.shape)}")
    _check_eps(eps)
    cdt = compute_dtype(x.dtype)
    xc = x.astype(cdt, copy=False)
    centered = xc - xc.mean(axis=-1, keepdims=True)
    inv_std = 1.0 / xp.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)
    xhat = centered * inv_std
    y = xhat
    if gamma is not None:
        y = y * gamma.astype(cdt, copy=False)
    if beta is not None:
        y = y + beta.astype(cdt, copy=False)
    saved = {"xhat": xhat, "inv_std": inv_std, "gamma": gamma,
             "beta_dtype": None if beta is None else beta.dtype, "x_dtype": x.dtype}
    return y.astype(x.dtype, copy=False), saved


def layer_norm_backward(grad_out, saved):
    """Gradients ``(gx, ggamma, gbeta)`` (None for an absent gamma/beta)."""
    xhat, inv_std, gamma = saved["xhat"], saved["inv_std"], saved["gamma"]
    g = grad_out.astype(xhat.dtype, copy=False)
    lead = tuple(range(g.ndim - 1))
    gxhat = g if gamma is None else g * gamma.astype(xhat.dtype, copy=False)
    gx = inv_std * (gxhat - gxhat.mean(axis=-1, keepdims=True)
                    - xhat * (gxhat * xhat).mean(axis=-1, keepdims=True))
    gx = gx.astype(saved["x_dtype"], copy=False)
    ggamma = None if gamma is None else (g * xhat).sum(axis=lead).astype(gamma.dtype, copy=False)
    gbeta = None
    if saved["beta_dtype"] is not None:
        gbeta = g.sum(axis=lead).astype(saved["beta_dtype"], copy=False)
    return gx, ggamma, gbeta
