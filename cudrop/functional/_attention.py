"""Multi-head self-attention as a functional pair, and the causal mask attention layers share.

``attention(qkv, num_heads, causal)`` takes the fused q|k|v projection (B, T, 3D) — columns
ordered (q|k|v, head, head_dim), as ``nn.MultiHeadAttention``'s ``qkv`` Linear makes it — and
returns softmax(q kᵀ / sqrt(hd)) v with the heads concatenated, (B, T, D); its backward returns
the gradient of ``qkv`` in the same layout, so neither pass transposes heads.

- CuPy, float16/bfloat16, head dim 16, 32 or 64: ``raw_kernels/attention.cu`` (the
  flash-attention algorithm on mma.sync): no (B, H, T, T) array in either pass; backward keeps
  only the output and a float32 log-sum-exp per row. One kernel forward, three backward.
- Otherwise (NumPy, float32/float64, other head dims): batched products through
  ``functional.matmul`` (capturable cuBLASLt on the GPU) and the softmax pair, keeping the
  probabilities for backward. The scale multiplies q (B, H, T, hd), not the scores (B, H, T, T):
  T / hd times fewer elements, exact where hd is a power of 4.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np

from .. import backend, flops
from .._memo import memoize
from .. import raw_kernels
from ..raw_kernels import launch
from ._matmul import matmul
from ._softmax import SoftmaxSaved, softmax, softmax_backward

Array = Any  # a NumPy or CuPy array

_KERNEL_HEAD_DIMS = (16, 32, 64)  # attention.cu's CD_HD: registers and shared tiles fit
_ROWS = 64  # rows a CTA of attention.cu owns


class AttentionSaved(NamedTuple):
    """What :func:`attention_backward` needs: the input and, on the kernel path, the output
    and the rows' log-sum-exp, or on the array path the probabilities."""
    qkv: Array  # (B, T, 3D), C-contiguous
    num_heads: int
    causal: bool
    out: Array | None  # kernel path: the output (B, T, D)
    lse: Array | None  # kernel path: (B, H, T) float32, base 2, of the scaled scores
    probs: Array | None  # array path: (B, H, T, T) softmax probabilities


@memoize
def _causal_bias(xp, dev, t, dtype):
    if dtype.kind == "V":  # ml_dtypes' bfloat16, which NumPy's finfo refuses
        import ml_dtypes
        lowest = ml_dtypes.finfo(dtype).min
    else:
        lowest = np.finfo(dtype).min
    return xp.asarray(np.triu(np.full((t, t), lowest / 2, dtype=dtype), k=1))


def causal_bias(xp, t, dtype):
    """The (t, t) additive causal mask: 0 on and below the diagonal, a large finite negative
    above it (the diagonal is always kept, and fp16 softmax stays free of inf - inf). Built and
    uploaded once per (device, t, dtype), in a cache ``cudrop.clear_caches()`` empties: an
    upload per step would wait on the stream."""
    dev = -1 if xp is np else xp.cuda.runtime.getDevice()
    return _causal_bias(xp, dev, t, np.dtype(dtype))


@memoize
def _scale(xp, dev, hd, dtype):
    return xp.asarray(np.asarray(1.0 / math.sqrt(hd), dtype=dtype))


def _scaled(a, hd):
    """``a / sqrt(hd)`` in ``a``'s dtype (CuPy promotes bfloat16 times a Python float to
    float32); the 0-d factor is uploaded once per (device, hd, dtype), not per call."""
    xp = backend.get_array_module(a)
    dev = -1 if xp is np else xp.cuda.runtime.getDevice()
    return a * _scale(xp, dev, hd, a.dtype)


def _check(qkv, num_heads):
    if not hasattr(qkv, "ndim") or qkv.ndim != 3 or qkv.shape[-1] % 3:
        raise ValueError(f"attention: qkv must be (batch, time, 3 * dim), got "
                         f"{getattr(qkv, 'shape', type(qkv).__name__)}")
    if qkv.dtype.kind not in "fV":
        raise TypeError(f"attention: qkv must be a float array, got {qkv.dtype}")
    if (isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral)
            or num_heads < 1):
        raise ValueError(f"attention: num_heads must be a positive int, got {num_heads!r}")
    d = qkv.shape[-1] // 3
    if d % num_heads:
        raise ValueError(f"attention: dim ({d}) must be divisible by num_heads ({num_heads})")
    return d // int(num_heads)


def _kernel_path(qkv, hd) -> bool:
    return (backend.is_gpu_array(qkv) and qkv.dtype.itemsize == 2 and qkv.size > 0
            and hd in _KERNEL_HEAD_DIMS)


def _split(qkv, h):
    b, t, d3 = qkv.shape
    return qkv.reshape(b, t, 3, h, d3 // (3 * h)).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, hd)


def _count_flops(b, h, t, hd, passes):
    for _ in range(passes):  # products of (B*H) (T x hd) by (hd x T) and (T x T) by (T x hd)
        flops.add_product("attention", (b * h, t, hd), (b * h, hd, t))
        flops.add_product("attention", (b * h, t, t), (b * h, t, hd))


def attention(qkv, num_heads, causal=False):
    """Multi-head self-attention ``(softmax(q kᵀ / sqrt(hd) [+ causal mask]) v, saved)`` from
    the fused projection ``qkv`` (B, T, 3D) with columns ordered (q|k|v, head, head_dim);
    the output is (B, T, D), heads concatenated. ``causal`` hides the keys after each query.
    16-bit inputs accumulate in float32."""
    hd = _check(qkv, num_heads)
    h = int(num_heads)
    causal = bool(causal)
    b, t, _ = qkv.shape
    xp = backend.get_array_module(qkv)
    if _kernel_path(qkv, hd):
        _count_flops(b, h, t, hd, 1)  # the product path's matmuls count their own
        qkv = raw_kernels.aligned(qkv, 16)
        out = xp.empty((b, t, h * hd), qkv.dtype)
        lse = xp.empty((b, h, t), np.float32)
        c = np.float32(math.log2(math.e) / math.sqrt(hd))
        launch("attention.cu", "attn_fwd", qkv.dtype, (b * h, -(-t // _ROWS)), (128,),
               (qkv, out, lse, np.int32(t), np.int32(h), np.int32(causal), c),
               (f"-DCD_HD={hd}",))
        return out, AttentionSaved(qkv, h, causal, out, lse, None)
    return _array_attention(qkv, h, causal)


def _array_attention(qkv, h, causal):
    """The batched-product path of :func:`attention` (any device and dtype)."""
    xp = backend.get_array_module(qkv)
    b, t, d3 = qkv.shape
    hd = d3 // (3 * h)
    q, k, v = _split(qkv, h)
    s = matmul(_scaled(q, hd), k.swapaxes(-1, -2))
    if causal:
        s += causal_bias(xp, t, s.dtype)
    p, _ = softmax(s, axis=-1)
    y = matmul(p, v).transpose(0, 2, 1, 3).reshape(b, t, h * hd)
    return y, AttentionSaved(qkv, h, causal, None, None, p)


def attention_backward(grad_out, saved: AttentionSaved):
    """The gradient of ``qkv`` (B, T, 3D), in its layout."""
    qkv, h, causal = saved.qkv, saved.num_heads, saved.causal
    b, t, d3 = qkv.shape
    hd = d3 // (3 * h)
    if grad_out.shape != (b, t, d3 // 3):
        raise ValueError(f"attention_backward: grad_out must have the output's shape "
                         f"{(b, t, d3 // 3)}, got {grad_out.shape}")
    xp = backend.get_array_module(grad_out)
    if saved.lse is not None:
        _count_flops(b, h, t, hd, 2)
        go = raw_kernels.aligned(grad_out.astype(qkv.dtype, copy=False), 16)
        dd = xp.empty((b, h, t), np.float32)
        rows = b * t * h
        threads = rows * (hd // 8)
        opts = (f"-DCD_HD={hd}",)
        launch("attention.cu", "attn_bwd_dot", qkv.dtype, (-(-threads // 256),), (256,),
               (go, saved.out, dd, np.int64(rows), np.int32(t), np.int32(h)), opts)
        gqkv = xp.empty_like(qkv)
        c = np.float32(math.log2(math.e) / math.sqrt(hd))
        args = (qkv, go, saved.lse, dd, gqkv, np.int32(t), np.int32(h), np.int32(causal), c,
                np.float32(1.0 / math.sqrt(hd)))
        grid = (b * h, -(-t // _ROWS))
        launch("attention.cu", "attn_bwd_dkdv", qkv.dtype, grid, (128,), args, opts)
        launch("attention.cu", "attn_bwd_dq", qkv.dtype, grid, (128,), args, opts)
        return gqkv
    q, k, v = _split(qkv, h)
    p = saved.probs
    go = grad_out.astype(qkv.dtype, copy=False).reshape(b, t, h, hd).transpose(0, 2, 1, 3)
    gv = matmul(p.swapaxes(-1, -2), go)
    gs = softmax_backward(matmul(go, v.swapaxes(-1, -2)), SoftmaxSaved(p, -1))
    gq = _scaled(matmul(gs, k), hd)
    gk = matmul(gs.swapaxes(-1, -2), _scaled(q, hd))
    return xp.stack([gq, gk, gv]).transpose(1, 3, 0, 2, 4).reshape(b, t, d3)
