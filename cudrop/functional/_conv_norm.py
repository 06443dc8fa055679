"""A convolution followed by batch norm (and its fused ReLU) as one op: ``conv_batch_norm``.

Its value is ``batch_norm(conv2d(x, w, stride=..., padding=...), ...)`` always. On CuPy, in
training, for a 1x1, stride-1, unpadded convolution with at most 64 input and output channels
in float32, float16 or bfloat16, with gamma and beta and float32 running statistics (depth
dropout's trainable shortcut on every residual unit, a projection), it runs fused kernels
(raw_kernels/conv_norm.cu) that never store the convolution's output: three kernels forward
(statistics, their merge, the normalised output) and three backward (the sums, their merge,
then the input gradient and the weight gradient's per-CTA partials, summed by
``sum_leading``), against the two ops' 3 + 5 kernels that write and reread ``y`` and its
gradient. Everywhere else it is the two ops (``saved`` then holds both ops' saved state).

The fused path computes ``y`` in float32 and normalises it unrounded, where the two ops round
``y`` to the input dtype first: in float16 and bfloat16 the results differ by that rounding
(both within the dtype's tolerance of the float64 math).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import backend
from ..raw_kernels import device_facts, launch
from ._conv import Conv2dSaved, as_pair, conv2d, conv2d_backward
from ._norm import (BatchNormSaved, _as_acc, _check_eps, _check_momentum, _check_param,
                    batch_norm, batch_norm_backward)
from ._reduce import sum_leading

__all__ = ["conv_batch_norm", "conv_batch_norm_backward"]

Array = Any  # a NumPy or CuPy array

_MAX_CHANNELS = 64  # conv_norm.cu's cd_cbn<float>::MAXC
_TILE = 32  # its TP: pixels of one sample a tile
_FUSED_DTYPES = ("float32", "float16", "bfloat16")
_F32 = np.dtype(np.float32)


class ConvBatchNormSaved(NamedTuple):
    """What :func:`conv_batch_norm_backward` needs. Fused: x, w, the batch statistics (3, O)
    (mean, biased variance, inverse std; float32) and gamma / beta as float32 (``conv`` and
    ``norm`` None); otherwise the two ops' saved states."""
    conv: Conv2dSaved | None = None
    norm: BatchNormSaved | None = None
    x: Array | None = None
    w: Array | None = None
    stats: Array | None = None
    gamma: Array | None = None  # the parameter (its dtype for the gradient)
    gamma_c: Array | None = None
    beta: Array | None = None
    beta_c: Array | None = None
    act: str | None = None


def conv_batch_norm(x, w, gamma, beta, running_mean, running_var, training, momentum=0.1,
                    eps=1e-5, *, stride=1, padding=0, act=None):
    """``batch_norm(conv2d(x, w, None, stride, padding), gamma, beta, running_mean, running_var,
    training, momentum, eps, act=act)`` as one op (no convolution bias: batch norm's mean
    removes it). Arguments as those two functions'. Returns ``(z, saved)`` (a
    :class:`ConvBatchNormSaved`) for :func:`conv_batch_norm_backward`; see the module docstring
    for where it runs fused kernels.
    """
    if _fused(x, w, gamma, beta, running_mean, running_var, training, stride, padding, act):
        for name, a in (("gamma", gamma), ("beta", beta)):
            _check_param(name, a, w.shape[0])
        _check_eps(eps)
        _check_momentum(momentum)
        return _fused_forward(x, w, gamma, beta, running_mean, running_var, momentum, eps, act)
    y, conv = conv2d(x, w, None, stride, padding)
    z, norm = batch_norm(y, gamma, beta, running_mean, running_var, training, momentum, eps,
                         act=act)
    return z, ConvBatchNormSaved(conv=conv, norm=norm)


def conv_batch_norm_backward(grad_out, saved: ConvBatchNormSaved):
    """Gradients ``(gx, gw, ggamma, gbeta)`` of :func:`conv_batch_norm` (``ggamma`` / ``gbeta``
    None where gamma / beta were)."""
    if saved.conv is not None:
        gy, ggamma, gbeta = batch_norm_backward(grad_out, saved.norm)
        gx, gw, _ = conv2d_backward(gy, saved.conv)
        return gx, gw, ggamma, gbeta
    return _fused_backward(grad_out, saved)


def _fused(x, w, gamma, beta, running_mean, running_var, training, stride, padding, act):
    """Whether the fused kernels take this call (the module docstring's conditions)."""
    xp = backend.get_array_module(x, w, gamma, beta, running_mean, running_var)
    if xp is np or not training or gamma is None or beta is None:
        return False
    if getattr(x, "ndim", 0) != 4 or getattr(w, "ndim", 0) != 4 or w.shape[2:] != (1, 1):
        return False
    if as_pair(stride, "stride", "conv_batch_norm") != (1, 1) or \
            as_pair(padding, "padding", "conv_batch_norm") != (0, 0):
        return False
    n, c, h, wd = x.shape
    o = w.shape[0]
    if x.dtype != w.dtype or x.dtype.name not in _FUSED_DTYPES or w.shape[1] != c:
        return False
    if not (0 < c <= _MAX_CHANNELS and 0 < o <= _MAX_CHANNELS) or gamma.shape != (o,) \
            or beta.shape != (o,):
        return False
    if not 1 < n * h * wd < 2**31 or x.size >= 2**62:
        return False
    for run in (running_mean, running_var):  # updated in the kernel, as batch_norm's are
        if run is not None and (run.dtype != _F32 or not run.flags.c_contiguous
                                or run.shape != (o,)):
            return False
    return act in (None, "relu")


def _launch(fn, dtype, grid, args):
    launch("conv_norm.cu", fn, dtype, grid, (256,), args)


def _grids(n, p):
    """(tiles, CTAs of the other passes, CTAs of the weight-gradient pass): as many as fit on
    the SMs at once (4 an SM at their 64 registers a thread, 3 for the weight-gradient pass at
    its launch bound; each CTA walks its tiles one after another, two barriers a tile), the
    weight-gradient pass at least two tiles a CTA (each CTA writes an O x C partial that
    sum_leading adds up)."""
    tiles = n * -(-p // _TILE)
    sms = device_facts()[0]
    return tiles, min(tiles, 4 * sms), min(-(-tiles // 2), 3 * sms)


def _fused_forward(x, w, gamma, beta, running_mean, running_var, momentum, eps, act):
    cp = backend.cupy
    x, w = cp.ascontiguousarray(x), cp.ascontiguousarray(w)
    n, c, h, wd = x.shape
    o, p = w.shape[0], h * wd
    total = n * p
    tiles, s, _ = _grids(n, p)
    gamma_c, beta_c = _as_acc(cp, gamma, _F32), _as_acc(cp, beta, _F32)
    part = cp.empty((2, o, s), dtype=_F32)
    _launch("conv_bn_stats", x.dtype, (s,),
            (x, w, part, np.int32(c), np.int32(o), np.int32(p), np.int64(tiles)))
    stats = cp.empty((3, o), dtype=_F32)
    update = running_mean is not None and running_var is not None
    rm, rv = (running_mean, running_var) if update else (stats, stats)
    _launch("conv_bn_merge", x.dtype, (o,),
            (part, stats, rm, rv, np.int32(o), np.int32(p), np.int64(tiles), np.int32(s),
             np.float64(eps), np.float64(momentum), np.float64(total / (total - 1)),
             np.int32(update)))
    if not update:  # one running statistic alone: updated here, as batch_norm does
        for run, stat in ((running_mean, stats[0]), (running_var, stats[1] * (total / (total - 1)))):
            if run is not None:
                run *= 1 - momentum
                run += momentum * stat
    z = cp.empty((n, o, h, wd), dtype=x.dtype)
    _launch("conv_bn_fwd", x.dtype, (s,),
            (x, w, stats, gamma_c, beta_c, z, np.int32(c), np.int32(o), np.int32(p),
             np.int64(tiles), np.int32(act == "relu")))
    return z, ConvBatchNormSaved(x=x, w=w, stats=stats, gamma=gamma, gamma_c=gamma_c,
                                 beta=beta, beta_c=beta_c, act=act)


def _fused_backward(grad_out, saved):
    cp = backend.cupy
    x, w = saved.x, saved.w
    n, c, h, wd = x.shape
    o, p = w.shape[0], h * wd
    if grad_out.shape != (n, o, h, wd):
        raise ValueError(f"conv_batch_norm_backward: grad_out must have the output's shape "
                         f"{(n, o, h, wd)}, got {tuple(grad_out.shape)}")
    backend.get_array_module(grad_out, x)  # a NumPy gradient for a GPU forward: TypeError
    g = grad_out
    if g.dtype != x.dtype or not g.flags.c_contiguous:
        g = cp.ascontiguousarray(g, dtype=x.dtype)
    tiles, s, s_w = _grids(n, p)
    dims = (np.int32(c), np.int32(o), np.int32(p), np.int64(tiles), np.int32(saved.act == "relu"))
    part = cp.empty((2, o, s), dtype=_F32)
    _launch("conv_bn_bwd_sums", x.dtype, (s,),
            (g, x, w, saved.stats, saved.gamma_c, saved.beta_c, part) + dims)
    sg, sgx = cp.empty(o, dtype=_F32), cp.empty(o, dtype=_F32)
    coef = cp.empty((3, o), dtype=_F32)
    _launch("conv_bn_bwd_coef", x.dtype, (o,),
            (part, saved.stats, saved.gamma_c, sg, sgx, coef, np.int32(o), np.int32(s),
             np.int64(n * p)))
    gx = cp.empty_like(x)
    wpart = cp.empty((s_w, o, c), dtype=_F32)
    _launch("conv_bn_bwd_apply", x.dtype, (s_w,),
            (g, x, w, saved.stats, saved.gamma_c, saved.beta_c, coef, gx, wpart) + dims)
    gw = sum_leading(wpart, dtype=w.dtype).reshape(w.shape)
    return (gx, gw, sgx.astype(saved.gamma.dtype, copy=False),
            sg.astype(saved.beta.dtype, copy=False))
