"""Activations and the dense Linear as functional pairs on raw arrays.

Backward convention: ``*_backward(grad_out, saved)`` returns one gradient per array input of
the forward, in its order (None for a bias that was None).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import backend, raw_kernels
from . import _gemm
from ._matmul import matmul
from ._norm import narrow, widen
from ._reduce import sum_leading


class ActSaved(NamedTuple):
    """The input of the activation."""
    x: object


class ReluSaved(NamedTuple):
    """The output of the ReLU: positive exactly where the input was (and shared with the next
    layer's saved input, so the ReLU keeps no array of its own alive)."""
    y: object


def relu(x):
    """``(max(x, 0), saved)``; on the GPU one 16-byte-vectorised kernel (``act.cu``)."""
    if _elementwise_gpu(x):
        y = _map("relu_fwd", x)
    else:
        y = backend.get_array_module(x).maximum(x, x.dtype.type(0))
    return y, ReluSaved(y)


def relu_backward(grad_out, saved):
    """``grad_out`` where the input was positive, 0 elsewhere."""
    xp = backend.get_array_module(grad_out)
    if not _elementwise_gpu(grad_out):
        return xp.where(saved.y > 0, grad_out, grad_out.dtype.type(0))
    return _map("relu_bwd", saved.y, grad_out)


def add(a, b):
    """``a + b``; two CuPy arrays of one shape and a kernel dtype take one 16-byte-vectorised
    kernel (CuPy's bfloat16 add moved 2 bytes a thread: 41 µs for GPT's 8M-element residual
    adds on the H200, PyTorch 12 µs). Otherwise NumPy/CuPy broadcasting as ``a + b``."""
    if (a.shape == b.shape and a.dtype == b.dtype and _elementwise_gpu(a)
            and backend.is_gpu_array(b) and a.dtype.itemsize == 2):
        return _map("add2", a, b)
    return a + b


def add_relu(a, b):
    """``(max(a + b, 0), saved)`` for ``a`` and ``b`` of one shape and dtype: a residual unit's
    sum and ReLU as one op. On the GPU one kernel (``act.cu``) writes the output without an
    ``a + b`` array; elsewhere it is :func:`relu` of ``a + b``. ``saved`` is the output, as
    :func:`relu`'s."""
    backend.get_array_module(a, b)  # one device
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"add_relu: a {a.shape} {a.dtype} and b {b.shape} {b.dtype} must have "
                         "one shape and dtype")
    if not _elementwise_gpu(a):
        return relu(a + b)
    y = _map("add_relu_fwd", a, b)
    return y, ReluSaved(y)


def add_relu_backward(grad_out, saved):
    """``(ga, gb)``: both are ``grad_out`` where the output was positive, 0 elsewhere (one
    array, returned for both)."""
    g = relu_backward(grad_out, saved)
    return g, g


def _erf(xp, x):
    if xp.__name__ == "numpy":
        from scipy.special import erf
        return erf(x)
    from cupyx.scipy.special import erf
    return erf(x)


def gelu(x):
    """``(x Φ(x), saved)`` with Φ the standard normal CDF (the exact GELU, not tanh's)."""
    xp = backend.get_array_module(x)
    y = 0.5 * x * (1 + _erf(xp, x / math.sqrt(2)))
    return y.astype(x.dtype, copy=False), ActSaved(x)


def gelu_backward(grad_out, saved):
    """``grad_out (Φ(x) + x φ(x))``."""
    xp = backend.get_array_module(grad_out)
    x = saved.x
    d = 0.5 * (1 + _erf(xp, x / math.sqrt(2))) + x * xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return (grad_out * d).astype(grad_out.dtype, copy=False)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _elementwise_gpu(x):
    """The fused kernels' path: a CuPy array of a dtype they are instantiated for."""
    return backend.is_gpu_array(x) and raw_kernels.cuda_type(x.dtype) is not None


def _map(fn, x, y=None, extra=()):
    """Launch act.cu's element-wise ``fn`` over ``x`` (and ``y``, same size; then the
    arguments ``extra``) into a new array of ``x``'s shape; 16 bytes a thread in a grid-stride
    loop (``cd_map``), so every array is made contiguous and 16-byte aligned."""
    cp = backend.cupy
    shape = x.shape
    args = tuple(raw_kernels.aligned(a, 16) for a in (x, y) if a is not None) + tuple(extra)
    out = cp.empty(shape, x.dtype)
    if out.size:
        threads = -(-out.size * x.itemsize // 16)
        raw_kernels.launch("act.cu", fn, x.dtype, (min(-(-threads // 256), 8192),), (256,),
                           args + (out, np.int64(out.size)))
    return out


def gelu_tanh(x):
    """``(0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), saved)``: GELU with the tanh
    approximation (GPT-2, BERT; PyTorch's ``gelu(x, approximate='tanh')``), computed in float32
    for 16-bit inputs (``x^3`` overflows float16 from ``|x|`` > 40) and returned in ``x``'s
    dtype. On the GPU one kernel (``act.cu``); ``saved`` holds ``x`` only."""
    xp = backend.get_array_module(x)
    if _elementwise_gpu(x):
        return _map("gelu_tanh_fwd", x), ActSaved(x)
    v = widen(x)
    t = xp.tanh(_SQRT_2_OVER_PI * (v + 0.044715 * v * v * v))
    return narrow(0.5 * v * (1 + t), x.dtype), ActSaved(x)


def gelu_tanh_backward(grad_out, saved):
    """``grad_out * d/dx gelu_tanh(x)``, with ``tanh`` recomputed from ``x``."""
    xp = backend.get_array_module(grad_out)
    x = saved.x
    if _elementwise_gpu(grad_out) and grad_out.dtype == x.dtype:
        return _map("gelu_tanh_bwd", x, grad_out).reshape(grad_out.shape)
    v = widen(x)
    t = xp.tanh(_SQRT_2_OVER_PI * (v + 0.044715 * v * v * v))
    # v in one factor at a time: v * v overflows for huge |v|, where 1 - t * t is exactly 0,
    # and 0 * inf would make the gradient NaN.
    u = (1 - t * t) * _SQRT_2_OVER_PI
    dt = u + (u * (3 * 0.044715) * v) * v
    return narrow(widen(grad_out) * (0.5 * (1 + t) + 0.5 * v * dt), grad_out.dtype)


class LinearSaved(NamedTuple):
    """The input as (M, K), the weight, whether there was a bias, the input's shape (x and w
    zero-padded along K, w along N, where :func:`_pad8` says so)."""
    x: object
    w: object
    has_bias: bool
    x_shape: tuple


def linear(x, w, b=None):
    """``(x @ w + b, saved)``: ``x`` (..., K), ``w`` (K, N) (the K x N layout of the papers),
    ``b`` (N,) or None; leading axes of x are rows of one GEMM."""
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"linear: x must be (..., K) and w (K, N); got x {x.shape}, w {w.shape}")
    if b is not None and b.shape != (w.shape[1],):
        raise ValueError(f"linear: b must have shape ({w.shape[1]},), got {b.shape}")
    n = w.shape[1]
    x2 = x.reshape(-1, x.shape[-1])
    if _pad8(x2, 1):
        x2, w = _padded(x2, 1), _padded(w, 0)
    if _pad8(w, 1):
        w = _padded(w, 1)
        b = None if b is None else _padded(b, 0)
    if b is not None and _epilogues(x2):
        y = _gemm.gemm(x2, w, bias=b)  # the bias add in the GEMM's epilogue
    else:
        y = matmul(x2, w)
        if b is not None:
            y += b
    y = _unpadded(y, n, axis=1)
    return y.reshape(x.shape[:-1] + (n,)), LinearSaved(x2, w, b is not None, x.shape)


def linear_backward(grad_out, saved, needs=(True, True, True)):
    """``(gx, gw, gb)``; a gradient whose entry of ``needs`` is False is not computed (None):
    a first layer's input gradient is a whole GEMM nobody reads."""
    k, n = saved.x_shape[-1], grad_out.shape[-1]
    g = grad_out.reshape(-1, n)
    if saved.w.shape[1] != n:  # N was padded: so is the gradient, with zeros
        g = _padded(g, 1)
    need_x, need_w, need_b = needs
    need_b = need_b and saved.has_bias
    w = saved.w if saved.w.shape[0] == k else saved.w[:k]  # K was padded
    gx = matmul(g, w.T).reshape(saved.x_shape) if need_x else None
    gw = gb = None
    if need_w and need_b and _epilogues(g):
        gb = backend.cupy.empty(g.shape[1], g.dtype)
        gw = _gemm.gemm(saved.x.T, g, bias_grad=gb)  # the bias gradient in the GEMM's epilogue
        return gx, _unpadded(_unpadded(gw, k, 0), n, 1), _unpadded(gb, n, 0)
    if need_w:
        gw = _unpadded(_unpadded(matmul(saved.x.T, g), k, 0), n, 1)
    if need_b:
        gb = _unpadded(sum_leading(g), n, 0)
    return gx, gw, gb


def _pad8(a, axis):
    """Whether to zero-pad ``a``'s ``axis`` (a GEMM's K of x, or N of w) to a multiple of 8 (16
    bytes of a 16-bit row): cuBLASLt has only slow kernels for 16-bit rows that are not 16-byte
    aligned. On the H200 (profile_step.py): a ViT patch embedding (K = 4, bf16, 25088 x 1024
    output) ran `magma_sgemmEx` at 1.7 ms a call forward and again for the weight gradient,
    ~10% of the step; the bf16 MLP's 10-class head (N = 10) ran one product on it, 43 µs of a
    0.77 ms step (PyTorch's cuBLAS picked CUTLASS kernels, 13 µs). Small sizes only: the pad is
    a copy of a (and of w or of the output and its gradient)."""
    d = a.shape[axis]
    return d % 8 != 0 and d < 64 and a.dtype.itemsize == 2 and _epilogues(a)


def _padded(a, axis):
    """``a`` with ``axis`` zero-padded to a multiple of 8."""
    shape = list(a.shape)
    d = shape[axis]
    shape[axis] = -(-d // 8) * 8
    out = backend.cupy.zeros(shape, a.dtype)
    out[(slice(None),) * axis + (slice(0, d),)] = a
    return out


def _unpadded(a, d, axis):
    """``a``'s first ``d`` entries along ``axis``, contiguous: itself when it was not padded (a
    view would cost the autograd a copy of every weight gradient: it copies gradients that are
    views)."""
    if a.shape[axis] == d:
        return a
    return a[(slice(None),) * axis + (slice(0, d),)].copy()  # a copy even where the slice is contiguous


def _epilogues(x):
    """Fuse bias and bias gradient into cuBLASLt's GEMM: on the GPU, except float64, where the
    H200 ran the fused bias 1.8x slower than a GEMM and a separate add (benchmarks/gemm.py)."""
    return backend.is_gpu_array(x) and _gemm.available() and x.dtype.itemsize < 8
