"""2-D convolution on raw NCHW arrays: im2col + one GEMM, col2im for the input gradient.

The column tensor is built with one strided-slice copy per kernel offset (kh * kw copies, no
Python loop over the batch or over output positions), which is portable between NumPy and CuPy
and fast on both. Its layout is ``(C, kh, kw, N, Ho, Wo)``: every copy writes a contiguous
``(N, Ho, Wo)`` block, and the whole tensor reshapes without a copy to the ``(C*kh*kw, N*Ho*Wo)``
matrix of the single GEMM, so the GPU spends its time in cuBLAS.
"""
from __future__ import annotations

import operator

from .. import backend
from .matmul import matmul

__all__ = ["conv2d", "conv2d_backward"]


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
    pass ``saved`` to ``conv2d_backward``.
    """
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
    saved = (cols, w, b is not None, x.shape, (sh, sw), (ph, pw))
    return y, saved


def conv2d_backward(gy, saved):
    """Gradients ``(gx, gw, gb)`` of ``conv2d`` for the output gradient ``gy`` (N, O, Ho, Wo);
    ``gb`` is None when ``conv2d`` had no bias."""
    cols, w, has_b, x_shape, (sh, sw), (ph, pw) = saved
    xp = backend.get_array_module(gy, w)
    n, c, h, wd = x_shape
    o, _, kh, kw = w.shape
    ho, wo = out_size(h, kh, sh, ph), out_size(wd, kw, sw, pw)
    if gy.shape != (n, o, ho, wo):
        raise ValueError(f"conv2d_backward: gy must have the output's shape {(n, o, ho, wo)}, "
                         f"got {gy.shape}")
    gy2 = gy.transpose(1, 0, 2, 3).reshape(o, n * ho * wo)
    gb = gy2.sum(axis=1) if has_b else None
    gw = matmul(gy2, cols.T).reshape(w.shape)
    gcols = matmul(w.reshape(o, c * kh * kw).T, gy2).reshape(c, kh, kw, n, ho, wo)
    gxpad = xp.zeros((c, n, h + 2 * ph, wd + 2 * pw), dtype=gy.dtype)
    for i in range(kh):
        for j in range(kw):
            window(gxpad, i, j, ho, wo, sh, sw)[...] += gcols[:, i, j]
    return unpad_nc(gxpad, ph, pw), gw, gb
