"""2-D max / average pooling and global average pooling on raw NCHW arrays.

Like convolution, the windows are visited by one strided slice per kernel offset (a Python loop
over kh * kw only), so the same code runs on NumPy and CuPy.

Backward convention: each ``*_backward(gy, saved)`` returns the one gradient of its one array
input ``x``, a single array.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import backend
from ._conv import as_pair, check_4d, out_size, pad_cn, unpad_nc, window

__all__ = ["max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
           "global_avg_pool2d", "global_avg_pool2d_backward"]

Array = Any  # a NumPy or CuPy array


class MaxPool2dSaved(NamedTuple):
    """What :func:`max_pool2d_backward` needs: each window's argmax offset and the geometry."""
    arg: Array  # (C, N, Ho, Wo) window offset i * kw + j of the maximum
    x_shape: tuple[int, int, int, int]
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


class AvgPool2dSaved(NamedTuple):
    """What :func:`avg_pool2d_backward` needs: the input's shape and the geometry."""
    x_shape: tuple[int, int, int, int]
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


class GlobalAvgPool2dSaved(NamedTuple):
    """What :func:`global_avg_pool2d_backward` needs: the input's shape."""
    x_shape: tuple[int, int, int, int]


def _geometry(op, x, kernel_size, stride, padding):
    check_4d(x, "x", "(N, C, H, W)", op)
    kh, kw = as_pair(kernel_size, "kernel_size", op)
    sh, sw = as_pair(kernel_size if stride is None else stride, "stride", op)
    ph, pw = as_pair(padding, "padding", op)
    if kh <= 0 or kw <= 0:
        raise ValueError(f"{op}: kernel_size must be positive, got {kernel_size!r}")
    if sh <= 0 or sw <= 0:
        raise ValueError(f"{op}: stride must be positive, got {stride!r}")
    if ph < 0 or pw < 0:
        raise ValueError(f"{op}: padding must be non-negative, got {padding!r}")
    # As in PyTorch: a larger padding would allow windows that see padding only.
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"{op}: padding must be at most half of kernel_size, got padding "
                         f"{padding!r} for kernel_size {kernel_size!r}")
    h, w = x.shape[2:]
    if kh > h + 2 * ph or kw > w + 2 * pw:
        raise ValueError(f"{op}: kernel_size {kh}x{kw} is larger than the padded input "
                         f"{h + 2 * ph}x{w + 2 * pw} (x shape {x.shape}, padding {ph},{pw})")
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    return (kh, kw), (sh, sw), (ph, pw), (ho, wo)


def _as_nc(y_cn):
    """(C, N, Ho, Wo) work array to a contiguous (N, C, Ho, Wo) result."""
    return backend.get_array_module(y_cn).ascontiguousarray(y_cn.transpose(1, 0, 2, 3))


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max over ``kernel_size`` windows of ``x`` (N, C, H, W); ``stride`` defaults to
    ``kernel_size``; padding counts as -inf. Returns ``(y, saved)``.

    Ties: the gradient goes to the first maximum of each window in row-major window order
    (not split between tied maxima). A NaN in a window is the window's maximum.
    """
    op = "max_pool2d"
    (kh, kw), (sh, sw), (ph, pw), (ho, wo) = _geometry(op, x, kernel_size, stride, padding)
    xp = backend.get_array_module(x)
    if backend.is_floating(x.dtype):
        fill = -np.inf
    elif x.dtype.kind in "iu":
        fill = np.iinfo(x.dtype).min
    else:
        raise TypeError(f"{op}: x must be a floating or integer array, got {x.dtype}")
    xpad = pad_cn(x, ph, pw, fill)
    y = window(xpad, 0, 0, ho, wo, sh, sw).copy()
    # Window offset of the maximum, as k = i * kw + j; int8 covers kernels up to 11x11.
    arg = xp.zeros(y.shape, dtype=np.int8 if kh * kw <= 127 else np.int32)
    for i in range(kh):
        for j in range(kw):
            if i == 0 and j == 0:
                continue
            v = window(xpad, i, j, ho, wo, sh, sw)
            # Strict '>' keeps the first maximum; 'v != v' lets a NaN win and then stay.
            better = v > y
            if backend.is_floating(x.dtype):
                better |= v != v
            xp.copyto(y, v, where=better)
            xp.copyto(arg, arg.dtype.type(i * kw + j), where=better)
    saved = MaxPool2dSaved(arg, x.shape, (kh, kw), (sh, sw), (ph, pw))
    return _as_nc(y), saved


def max_pool2d_backward(gy, saved: MaxPool2dSaved):
    """Gradient of ``max_pool2d`` with respect to its input."""
    arg, x_shape = saved.arg, saved.x_shape
    (kh, kw), (sh, sw), (ph, pw) = saved.kernel_size, saved.stride, saved.padding
    xp = backend.get_array_module(gy, arg)
    n, c, h, w = x_shape
    ho, wo = arg.shape[2:]
    if gy.shape != (n, c, ho, wo):
        raise ValueError(f"max_pool2d_backward: gy must have the output's shape "
                         f"{(n, c, ho, wo)}, got {gy.shape}")
    g = gy.transpose(1, 0, 2, 3)
    zero = xp.zeros((), dtype=gy.dtype)
    gxpad = xp.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=gy.dtype)
    for i in range(kh):
        for j in range(kw):
            v = window(gxpad, i, j, ho, wo, sh, sw)
            v += xp.where(arg == i * kw + j, g, zero)
    return unpad_nc(gxpad, ph, pw)


def avg_pool2d(x, kernel_size, stride=None, padding=0):
    """Mean over ``kernel_size`` windows of ``x`` (N, C, H, W); ``stride`` defaults to
    ``kernel_size``. Zero padding counts in the mean (every window divides by kh * kw, like
    PyTorch's ``count_include_pad=True``). Returns ``(y, saved)``."""
    op = "avg_pool2d"
    (kh, kw), (sh, sw), (ph, pw), (ho, wo) = _geometry(op, x, kernel_size, stride, padding)
    if not backend.is_floating(x.dtype):
        raise TypeError(f"{op}: x must be a floating array, got {x.dtype}")
    xpad = pad_cn(x, ph, pw)
    y = window(xpad, 0, 0, ho, wo, sh, sw).copy()
    for i in range(kh):
        for j in range(kw):
            if i or j:
                y += window(xpad, i, j, ho, wo, sh, sw)
    y *= x.dtype.type(1.0 / (kh * kw))
    saved = AvgPool2dSaved(x.shape, (kh, kw), (sh, sw), (ph, pw))
    return _as_nc(y), saved


def avg_pool2d_backward(gy, saved: AvgPool2dSaved):
    """Gradient of ``avg_pool2d`` with respect to its input."""
    x_shape = saved.x_shape
    (kh, kw), (sh, sw), (ph, pw) = saved.kernel_size, saved.stride, saved.padding
    xp = backend.get_array_module(gy)
    n, c, h, w = x_shape
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    if gy.shape != (n, c, ho, wo):
        raise ValueError(f"avg_pool2d_backward: gy must have the output's shape "
                         f"{(n, c, ho, wo)}, got {gy.shape}")
    g = gy.transpose(1, 0, 2, 3) * gy.dtype.type(1.0 / (kh * kw))
    gxpad = xp.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=gy.dtype)
    for i in range(kh):
        for j in range(kw):
            v = window(gxpad, i, j, ho, wo, sh, sw)
            v += g
    return unpad_nc(gxpad, ph, pw)


def global_avg_pool2d(x):
    """Mean over the spatial axes: (N, C, H, W) -> (N, C). Returns ``(y, saved)``."""
    check_4d(x, "x", "(N, C, H, W)", "global_avg_pool2d")
    if not backend.is_floating(x.dtype):
        raise TypeError(f"global_avg_pool2d: x must be a floating array, got {x.dtype}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"global_avg_pool2d: x must have a non-empty spatial extent, "
                         f"got shape {x.shape}")
    if x.dtype.itemsize < 4:  # 16-bit floats: sum in float32, round once
        return (x.mean(axis=(2, 3), dtype=np.float32).astype(x.dtype),
                GlobalAvgPool2dSaved(x.shape))
    return x.mean(axis=(2, 3)), GlobalAvgPool2dSaved(x.shape)


def global_avg_pool2d_backward(gy, saved: GlobalAvgPool2dSaved):
    """Gradient of ``global_avg_pool2d`` with respect to its input."""
    x_shape = saved.x_shape
    xp = backend.get_array_module(gy)
    if gy.shape != x_shape[:2]:
        raise ValueError(f"global_avg_pool2d_backward: gy must have the output's shape "
                         f"{x_shape[:2]}, got {gy.shape}")
    scale = gy.dtype.type(1.0 / (x_shape[2] * x_shape[3]))
    return xp.broadcast_to((gy * scale)[:, :, None, None], x_shape).copy()
