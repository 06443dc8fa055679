"""2-D convolution on raw NCHW arrays: im2col + one GEMM, col2im for the input gradient.

The column matrix has shape ``(C*kh*kw, N*Ho*Wo)`` (row ``(c, i, j)``, column ``(n, oh, ow)``):
forward is the single GEMM ``W(O, C*kh*kw) @ cols`` and the weight gradient ``gy(O, N*Ho*Wo) @
colsᵀ`` reads it as stored (cuBLAS takes the transpose as a flag), so the GPU spends its time in
cuBLAS. The price is one transpose between ``(O, N, Ho, Wo)`` and NCHW on each side.

- NumPy (the reference): the columns are built with one strided-slice copy per kernel offset
  from a padded copy, and col2im is one slice-add per offset (kh * kw of each, no Python loop over
  the batch or the output positions).
- CuPy (float16/bfloat16/float32/float64): one RawKernel (raw_kernels/conv.cu) builds the columns
  reading the unpadded input with bounds checks, one gathers them back for the input gradient
  (each input element sums its own contributions: no atomics, deterministic), and one swaps the
  leading axes (adding the bias on the way out). Forward is 3 launches, backward 4 (+1 for a
  bias). Writing the GEMM straight into NCHW needs a strided-batched GEMM with a broadcast
  weight, which CuPy's ``matmul`` does not offer (its broadcast matmul builds pointer arrays: 3
  extra launches); the weight gradient would still need ``gy`` as ``(O, N*Ho*Wo)``. Measured on
  an H200 (benchmarks/conv_norm.py, ResNet-56 shapes, batch 128, float32), for a 3x3
  convolution a direct cuBLAS strided-batched call after im2col would save one launch and
  ~40 µs of host time per forward, at device times of 0.111 vs 0.089 ms (16 ch, 32x32: 128
  small GEMMs lose to one large one) to 0.032 vs 0.041 ms (64 ch, 8x8).
- A 1x1, stride-1, unpadded convolution (depth dropout's shortcut, a projection) skips im2col:
  it is ``y(N, O, H*W) = W(O, C) @ x(N, C, H*W)``, one strided-batched GEMM with the weight
  read at batch stride 0, written straight in NCHW; ``gx = Wᵀ @ gy`` likewise, and
  ``gw = sum_n gy_n @ x_nᵀ`` one strided-batched GEMM into (N, O, C) (transposed views, no
  copies) and a sum over n of that small array (``sum_leading``, in float32 at least: each
  sample's 16-bit partial product is rounded once before it). The im2col path needs a
  transposing copy of x (im2col), one of y back to NCHW (swap01) and one of gy (swap01) around
  its single GEMMs. On NumPy always; on CuPy where cuBLASLt is available
  (``_gemm.available()``: nvmath-python, whose broadcast operand costs nothing), else through
  the im2col kernels as before. On the H200 this and the fused BN + ReLU cut depth dropout's
  27 shortcuts (1x1 conv + BN + ReLU) from 3.8 to 1.86 ms of kernels a ResNet-56 step
  (profile_step.py); the two paths are not yet timed apart (benchmarks/conv_norm.py does,
  ``_conv2d_cols`` forcing im2col).
  A bias is added in a second pass: cuBLASLt's bias epilogue adds along the output's rows
  (here H*W positions), not per channel; cudrop's shortcut convolutions have no bias.
- ``_conv2d_arrays`` / ``_conv2d_backward_arrays`` run the array-op path on either device, so
  tests and benchmarks can compare the kernels with it.

Backward convention: ``conv2d_backward(gy, saved)`` returns ``(gx, gw, gb)``, one gradient per
array input of ``conv2d`` in its order, ``gb`` None when ``b`` was None.
"""
from __future__ import annotations

import operator
from typing import Any, NamedTuple

import numpy as np

from .. import backend
from ..raw_kernels import cuda_type, launch
from . import _gemm
from ._matmul import matmul
from ._reduce import sum_leading

__all__ = ["conv2d", "conv2d_backward"]

_INT32 = 2**31 - 1
Array = Any  # a NumPy or CuPy array


class Conv2dSaved(NamedTuple):
    """What :func:`conv2d_backward` needs: the im2col columns (or x), the weight, the geometry."""
    kind: str  # "cols": data is the (C*kh*kw, N*Ho*Wo) columns; "gemm" (1x1, stride 1): x
    data: Array
    w: Array
    has_bias: bool
    x_shape: tuple[int, int, int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


def as_pair(value, name: str, op: str) -> tuple[int, int]:
    """``value`` as an ``(h, w)`` pair of ints; ``name`` and ``op`` go into the error."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    out = []
    for v in items:
        if isinstance(v, bool):
            raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
        try:
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(f"{op}: {name} must be an int or a pair of ints, "
                            f"got {value!r}") from None
    return out[0], out[1]


def check_4d(a, name: str, layout: str, op: str):
    if not hasattr(a, "ndim") or not hasattr(a, "dtype"):
        raise TypeError(f"{op}: {name} must be a NumPy or CuPy array, got {type(a).__name__}")
    if a.ndim != 4:
        raise ValueError(f"{op}: {name} must be a 4-D array {layout}, got shape {a.shape}")


def out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def pad_cn(x, ph: int, pw: int, fill=0):
    """``x`` (N, C, H, W) as a zero- (or ``fill``-) padded (C, N, H+2ph, W+2pw) array.

    Channels go first so that slices over one channel block are contiguous in the column tensor
    and in col2im; the transpose rides on the copy that padding needs anyway.
    """
    xp = backend.get_array_module(x)
    n, c, h, w = x.shape
    out = xp.empty((c, n, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    if ph or pw:
        out.fill(fill)
    out[:, :, ph:ph + h, pw:pw + w] = x.transpose(1, 0, 2, 3)
    return out


def window(a, i: int, j: int, ho: int, wo: int, sh: int, sw: int):
    """The strided view of the last two axes of ``a`` seen by kernel offset (i, j)."""
    return a[..., i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]


def unpad_nc(g_cn, ph: int, pw: int):
    """Inverse of ``pad_cn`` for gradients: crop and go back to a contiguous NCHW array."""
    xp = backend.get_array_module(g_cn)
    hp, wp = g_cn.shape[2:]
    return xp.ascontiguousarray(g_cn[:, :, ph:hp - ph, pw:wp - pw].transpose(1, 0, 2, 3))


def conv2d(x, w, b=None, stride=1, padding=0):
    """Cross-correlation of ``x`` (N, C, H, W) with ``w`` (O, C, kh, kw), plus ``b`` (O,).

    ``stride`` and ``padding`` (zeros) are an int or an ``(h, w)`` pair. Returns
    ``(y, saved)`` with ``y`` of shape (N, O, Ho, Wo), ``Ho = (H + 2 ph - kh) // sh + 1``;
    pass ``saved`` (a :class:`Conv2dSaved`) to ``conv2d_backward``.
    """
    return _conv2d(x, w, b, stride, padding, path="auto")


def _conv2d_arrays(x, w, b=None, stride=1, padding=0):
    """:func:`conv2d` on the array-op path (the NumPy reference's code, on NumPy or CuPy),
    never the GPU kernels: what tests and benchmarks compare the kernels with."""
    return _conv2d(x, w, b, stride, padding, path="arrays")


def _conv2d_cols(x, w, b=None, stride=1, padding=0):
    """:func:`conv2d` through the im2col kernels on CuPy also where the 1x1 GEMM path would run:
    the path before it, which benchmarks time it against. Backward follows ``saved``."""
    return _conv2d(x, w, b, stride, padding, path="cols")


def _conv2d(x, w, b, stride, padding, path):
    op = "conv2d"
    check_4d(x, "x", "(N, C, H, W)", op)
    check_4d(w, "w", "(O, C, kh, kw)", op)
    xp = backend.get_array_module(x, w, b)
    n, c, h, wd = x.shape
    o, cw, kh, kw = w.shape
    if c != cw:
        raise ValueError(f"{op}: x has {c} channels but w expects {cw} "
                         f"(x shape {x.shape}, w shape {w.shape})")
    if x.dtype != w.dtype:
        raise TypeError(f"{op}: x is {x.dtype} but w is {w.dtype}; cast one to the other")
    if b is not None:
        if not hasattr(b, "ndim"):
            raise TypeError(f"{op}: b must be a NumPy or CuPy array or None, "
                            f"got {type(b).__name__}")
        if b.shape != (o,):
            raise ValueError(f"{op}: b must have shape (O,) = ({o},) to match w, got {b.shape}")
        if b.dtype != x.dtype:
            raise TypeError(f"{op}: b is {b.dtype} but x and w are {x.dtype}")
    sh, sw = as_pair(stride, "stride", op)
    ph, pw = as_pair(padding, "padding", op)
    if sh <= 0 or sw <= 0:
        raise ValueError(f"{op}: stride must be positive, got {stride!r}")
    if ph < 0 or pw < 0:
        raise ValueError(f"{op}: padding must be non-negative, got {padding!r}")
    if kh > h + 2 * ph or kw > wd + 2 * pw:
        raise ValueError(f"{op}: kernel {kh}x{kw} (w shape {w.shape}) is larger than the padded "
                         f"input {h + 2 * ph}x{wd + 2 * pw} (x {h}x{wd}, padding {ph},{pw})")
    ho, wo = out_size(h, kh, sh, ph), out_size(wd, kw, sw, pw)

    gpu = path != "arrays" and _gpu_path(xp, x, w, (n, c, h, wd), (o, ho, wo), (kh, kw))
    if kh == kw == sh == sw == 1 and ph == pw == 0 and (
            xp is np or (gpu and path == "auto" and _gemm.available())):
        y = matmul(w.reshape(o, c), x.reshape(n, c, h * wd))  # (N, O, H*W): no columns at all
        if b is not None:
            y += b[:, None]
        saved = Conv2dSaved("gemm", x, w, b is not None, x.shape, (sh, sw), (ph, pw))
        return y.reshape(n, o, h, wd), saved
    if gpu:
        return _conv2d_gpu(x, w, b, (sh, sw), (ph, pw), (ho, wo))
    xpad = pad_cn(x, ph, pw)
    cols = xp.empty((c, kh, kw, n, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = window(xpad, i, j, ho, wo, sh, sw)
    cols = cols.reshape(c * kh * kw, n * ho * wo)
    w2 = w.reshape(o, c * kh * kw)
    y = matmul(w2, cols)  # (O, N*Ho*Wo)
    if b is not None:
        y += b[:, None]
    y = xp.ascontiguousarray(y.reshape(o, n, ho, wo).transpose(1, 0, 2, 3))
    saved = Conv2dSaved("cols", cols, w, b is not None, x.shape, (sh, sw), (ph, pw))
    return y, saved


def conv2d_backward(gy, saved: Conv2dSaved, needs=(True, True, True)):
    """Gradients ``(gx, gw, gb)`` of ``conv2d`` for the output gradient ``gy`` (N, O, Ho, Wo);
    ``gb`` is None when ``conv2d`` had no bias, ``gx`` when ``needs[0]`` is False (a stem
    convolution's input: its GEMM and col2im are skipped)."""
    return _conv2d_backward(gy, saved, kernels=True, need_x=needs[0])


def _conv2d_backward_arrays(gy, saved: Conv2dSaved):
    """:func:`conv2d_backward` on the array-op path, never the GPU kernels (either forward's
    ``saved`` will do: both keep the same columns)."""
    return _conv2d_backward(gy, saved, kernels=False)


def _conv2d_backward(gy, saved, kernels, need_x=True):
    kind, data, w, has_b, x_shape = saved.kind, saved.data, saved.w, saved.has_bias, saved.x_shape
    (sh, sw), (ph, pw) = saved.stride, saved.padding
    xp = backend.get_array_module(gy, w)
    n, c, h, wd = x_shape
    o, _, kh, kw = w.shape
    ho, wo = out_size(h, kh, sh, ph), out_size(wd, kw, sw, pw)
    if gy.shape != (n, o, ho, wo):
        raise ValueError(f"conv2d_backward: gy must have the output's shape {(n, o, ho, wo)}, "
                         f"got {gy.shape}")
    if kind == "gemm":  # 1x1, stride 1, no padding: data is x
        gy3 = gy.reshape(n, o, ho * wo)
        gb = gy3.sum(axis=(0, 2)) if has_b else None
        gx = matmul(w.reshape(o, c).T, gy3).reshape(x_shape) if need_x else None
        # sum_n gy_n (O, HW) @ x_nᵀ (HW, C): one batched GEMM of transposed views, then the sum
        parts = matmul(gy3, data.reshape(n, c, h * wd).transpose(0, 2, 1))  # (N, O, C)
        gw = sum_leading(parts).reshape(w.shape)
        return gx, gw, gb
    cols = data
    if kernels and _gpu_path(xp, gy, w, x_shape, (o, ho, wo), (kh, kw)):
        return _conv2d_backward_gpu(gy, cols, w, has_b, x_shape, (sh, sw), (ph, pw), (ho, wo),
                                    need_x)
    gy2 = gy.transpose(1, 0, 2, 3).reshape(o, n * ho * wo)
    gb = gy2.sum(axis=1) if has_b else None
    gw = matmul(gy2, cols.T).reshape(w.shape)
    if not need_x:
        return None, gw, gb
    gcols = matmul(w.reshape(o, c * kh * kw).T, gy2).reshape(c, kh, kw, n, ho, wo)
    gxpad = xp.zeros((c, n, h + 2 * ph, wd + 2 * pw), dtype=gy.dtype)
    for i in range(kh):
        for j in range(kw):
            window(gxpad, i, j, ho, wo, sh, sw)[...] += gcols[:, i, j]
    return unpad_nc(gxpad, ph, pw), gw, gb


# ---- GPU path ----------------------------------------------------------------------------------
def _gpu_path(xp, x, w, x_shape, out_shape, k) -> bool:
    """CuPy arrays of a kernel dtype, nothing empty, and every index the kernels keep in 32 bits
    (per-image planes and channel products) within range."""
    if xp is np or x.dtype != w.dtype or cuda_type(x.dtype) is None:
        return False
    n, c, h, wd = x_shape
    o, ho, wo = out_shape
    if min(n, c, h, wd, o, ho, wo) <= 0:
        return False
    return max(n * ho * wo, h * wd, n * c, c * k[0] * k[1], o * n) <= _INT32


def _launch(fn, dtype, grid, block, args):
    launch("conv.cu", fn, dtype, grid, block, args)


def _threads(size: int) -> int:
    """Threads per CTA for a row of ``size`` elements: up to 256, a multiple of 32."""
    return min(256, -(-size // 32) * 32)


def _swap01(cp, a, rows_a, rows_b, p, out_shape, bias=None):
    """``a`` viewed as (A, B, P) -> a new contiguous (B, A, P) array of shape ``out_shape``,
    plus ``bias[a]``."""
    out = cp.empty(out_shape, dtype=a.dtype)
    t = _threads(p)
    _launch("swap01", a.dtype, (-(-p // t), min(rows_a * rows_b, 65535)), (t,),
            (a, out, a if bias is None else bias, np.int32(rows_a), np.int32(rows_b),
             np.int32(p), np.int32(bias is not None)))
    return out


def _geometry_args(x_shape, k, stride, padding, out_hw):
    n, c, h, wd = x_shape
    return tuple(np.int32(v) for v in (n, c, h, wd, *k, *stride, *padding, *out_hw))


def _conv2d_gpu(x, w, b, stride, padding, out_hw):
    cp = backend.cupy
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho, wo = out_hw
    q = n * ho * wo
    x = cp.ascontiguousarray(x)
    cols = cp.empty((c * kh * kw, q), dtype=x.dtype)
    t = _threads(q)
    _launch("im2col", x.dtype, (-(-q // t), min(c, 65535)), (t,),
            (x, cols) + _geometry_args(x.shape, (kh, kw), stride, padding, out_hw))
    y2 = matmul(cp.ascontiguousarray(w).reshape(o, c * kh * kw), cols)  # (O, N*Ho*Wo)
    y = _swap01(cp, y2, o, n, ho * wo, (n, o, ho, wo),
                None if b is None else cp.ascontiguousarray(b))
    saved = Conv2dSaved("cols", cols, w, b is not None, x.shape, stride, padding)
    return y, saved


def _conv2d_backward_gpu(gy, cols, w, has_b, x_shape, stride, padding, out_hw, need_x=True):
    cp = backend.cupy
    n, c, h, wd = x_shape
    o, _, kh, kw = w.shape
    ho, wo = out_hw
    gy2 = _swap01(cp, cp.ascontiguousarray(gy), n, o, ho * wo, (o, n * ho * wo))
    gb = gy2.sum(axis=1) if has_b else None
    gw = matmul(gy2, cols.T).reshape(w.shape)
    if not need_x:
        return None, gw, gb
    gcols = matmul(cp.ascontiguousarray(w).reshape(o, c * kh * kw).T, gy2)
    gx = cp.empty(x_shape, dtype=gy.dtype)
    t = _threads(h * wd)
    _launch("col2im", gy.dtype, (-(-(h * wd) // t), min(n * c, 65535)), (t,),
            (gcols, gx) + _geometry_args(x_shape, (kh, kw), stride, padding, out_hw))
    return gx, gw, gb
