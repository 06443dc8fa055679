"""SliceOut over Tensors: thin Functions over the ``cudrop.functional.sliceout`` pairs.

``ranges`` (the kept units, from ``cudrop.functional.sliceout.draw_slice``) and ``scale`` are
plain arguments, not inputs: the slice is a pure function of (seed, layer, step), drawn on the
host by the caller. Optional biases are left out of the inputs when None, so ``backward``
returns exactly one gradient per input.
"""
from __future__ import annotations

from ..variants import sliceout as F
from .function import Function

__all__ = ["sliceout", "sliceout_linear", "sliceout_linear_out", "sliceout_conv2d",
           "sliceout_attention"]


class _SliceOut(Function):
    def __init__(self, ranges, axis, scale):
        self.args = ranges, axis, scale

    def forward(self, x):
        y, self.saved = F.sliceout(x, *self.args)
        return y

    def backward(self, gy):
        return F.sliceout_backward(gy, self.saved)


class _Affine(Function):
    """A (x, w[, b]) op whose pair returns (gx, gw, gb) with gb None without a bias."""

    def __init__(self, fwd, bwd, *args, **kwargs):
        self.fwd, self.bwd, self.args, self.kwargs = fwd, bwd, args, kwargs

    def forward(self, x, w, b=None):
        y, self.saved = self.fwd(x, w, b, *self.args, **self.kwargs)
        return y

    def backward(self, gy):
        gx, gw, gb = self.bwd(gy, self.saved)
        return (gx, gw) if gb is None else (gx, gw, gb)


class _Attention(Function):
    def __init__(self, has_bq, has_bp, num_heads, ranges, scale, causal):
        self.has = has_bq, has_bp
        self.args = num_heads, ranges, scale, causal

    def forward(self, *arrays):
        it = iter(arrays)
        x, w_qkv = next(it), next(it)
        b_qkv = next(it) if self.has[0] else None
        w_proj = next(it)
        b_proj = next(it) if self.has[1] else None
        y, self.saved = F.sliceout_attention(x, w_qkv, b_qkv, w_proj, b_proj, *self.args)
        return y

    def backward(self, gy):
        grads = F.sliceout_attention_backward(gy, self.saved)
        return tuple(g for g in grads if g is not None)


def _call(f, *inputs):
    return f(*(t for t in inputs if t is not None))


def sliceout(x, ranges, axis=-1, scale=None):
    """``x ⊙ m / q`` with the slice mask of ``ranges`` along ``axis`` (default ``n / keep``
    scale). Always applies the mask: layers decide train vs eval."""
    return _SliceOut(ranges, axis, scale)(x)


def sliceout_linear(x, w, b, ranges, scale=None):
    """Input-unit SliceOut Linear: ``(x ⊙ m / q) @ w + b``, computed as ``x[..., S] @ w[S]``.
    ``x`` (..., K), ``w`` (K, N), ``b`` (N,) or None; ``ranges`` over K."""
    return _call(_Affine(F.sliceout_linear, F.sliceout_linear_backward, ranges, scale), x, w, b)


def sliceout_linear_out(x, w, b, ranges, scale=None):
    """Output-unit SliceOut Linear: ``(x @ w + b) ⊙ m / q``; only ``x @ w[:, S]`` is computed.
    ``ranges`` over N."""
    return _call(_Affine(F.sliceout_linear_out, F.sliceout_linear_out_backward, ranges, scale),
                 x, w, b)


def sliceout_conv2d(x, w, b, ranges, scale=None, stride=1, padding=0):
    """Output-channel SliceOut convolution: ``conv2d(x, w, b) ⊙ m / q`` over the O channels of
    ``w`` (O, C, kh, kw); only ``w[S]`` is convolved."""
    f = _Affine(F.sliceout_conv2d, F.sliceout_conv2d_backward, ranges, scale,
                stride=stride, padding=padding)
    return _call(f, x, w, b)


def sliceout_attention(x, w_qkv, b_qkv, w_proj, b_proj, num_heads, ranges, scale=None,
                       causal=False):
    """Head SliceOut self-attention over ``x`` (B, T, D): only the kept heads (``ranges`` over
    ``num_heads``) are projected, attended and projected back; see
    ``cudrop.functional.sliceout.sliceout_attention``."""
    f = _Attention(b_qkv is not None, b_proj is not None, num_heads, ranges, scale, causal)
    return _call(f, x, w_qkv, b_qkv, w_proj, b_proj)
