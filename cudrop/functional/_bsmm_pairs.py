"""The block-sparse products of ``cudrop.bsmm`` as functional pairs (``(out, saved)`` and a
backward), so a framework can differentiate through them. The backward GEMMs are block-sparse
too: each skips the same dropped blocks as the forward.

- ``dsd``   ``act(scale (a ⊙ m) @ b + bias)``, m over a (M, K);
- ``dsd_t`` ``scale (a ⊙ m)ᵀ @ b``, m over a (M, K);
- ``sdd``   ``act(scale a @ b + bias) ⊙ m``, m over the (M, N) output.

``act`` is None or 'relu' here (the raw products in ``cudrop.bsmm`` also take 'gelu', whose
gradient would need the pre-activation kept). Backward convention: one gradient per array
input of the forward, in its order (None for a bias that was None).
"""
from __future__ import annotations

from typing import NamedTuple

from .. import backend, bsmm, masks
from ._reduce import sum_leading


class BsmmSaved(NamedTuple):
    """The operands, the mask, the scale, whether there was a bias, the activation, the output
    (for relu's gradient)."""
    a: object
    b: object
    mask: masks.BlockMask
    scale: float
    has_bias: bool
    act: str | None
    out: object


def _act(op, act):
    if act not in (None, "relu"):
        raise ValueError(f"{op}: act must be None or 'relu' for the differentiable form (use "
                         f"cudrop.bsmm.{op} for 'gelu' without gradients), got {act!r}")
    return act


def dsd(a, b, mask, scale=1.0, *, bias=None, act=None):
    """``(act(scale (a ⊙ m) @ b + bias), saved)``: a (M, K), b (K, N), mask over (M, K);
    dropped K-blocks of each row block are skipped."""
    out = bsmm.dsd(a, b, mask, scale, bias=bias, act=_act("dsd", act))
    return out, BsmmSaved(a, b, mask, float(scale), bias is not None, act, out)


def dsd_backward(grad_out, s):
    """``(ga, gb, gbias)``; ``ga`` is zero on dropped blocks."""
    g = _relu_grad(grad_out, s)
    ga = bsmm.sdd(g, s.b.T, s.mask, s.scale)
    gb = bsmm.dsd_t(s.a, g, s.mask, s.scale)
    return ga, gb, (sum_leading(g) if s.has_bias else None)


def dsd_t(a, b, mask, scale=1.0):
    """``(scale (a ⊙ m)ᵀ @ b, saved)``: a (M, K), b (M, N), mask over (M, K) -> (K, N)."""
    out = bsmm.dsd_t(a, b, mask, scale)
    return out, BsmmSaved(a, b, mask, float(scale), False, None, None)


def dsd_t_backward(grad_out, s):
    """``(ga, gb)``: ``ga = scale (b @ gᵀ) ⊙ m``, ``gb = scale (a ⊙ m) @ g``."""
    return (bsmm.sdd(s.b, grad_out.T, s.mask, s.scale),
            bsmm.dsd(s.a, grad_out, s.mask, s.scale))


def sdd(a, b, mask, scale=1.0, *, bias=None, act=None):
    """``(act(scale a @ b + bias) ⊙ m, saved)``: a (M, K), b (K, N), mask over (M, N); only
    kept output blocks are computed."""
    out = bsmm.sdd(a, b, mask, scale, bias=bias, act=_act("sdd", act))
    return out, BsmmSaved(a, b, mask, float(scale), bias is not None, act, out)


def sdd_backward(grad_out, s):
    """``(ga, gb, gbias)``, reading only the kept blocks of ``grad_out``."""
    xp = backend.get_array_module(grad_out)
    g = _relu_grad(grad_out, s)
    ga = bsmm.dsd(g, s.b.T, s.mask, s.scale)
    gb = xp.empty(s.b.shape, s.b.dtype)
    bsmm.dsd_t(g, s.a, s.mask, s.scale, out=gb.T)
    gbias = None
    if s.has_bias:
        keep = s.mask.to_dense()
        gbias = sum_leading(xp.where(keep, g, g.dtype.type(0)))
    return ga, gb, gbias


def _relu_grad(g, s):
    if s.act != "relu":
        return g
    xp = backend.get_array_module(g)
    return xp.where(s.out > 0, g, g.dtype.type(0))
