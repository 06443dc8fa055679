"""SliceOut (Notin, Gomez, Yoo, Gal): one contiguous slice of units is kept per step, the same for
the whole batch, so the products run on slices (views) of the operands and dropped units cost
neither FLOPs nor memory traffic.

Mask semantics
--------------
A layer has ``n`` units (features, channels or heads). ``keep = keep_count(n, p)`` of them are
kept: ``round((1 - p) n)`` with halves rounded up, at least 1. The kept set is a tuple of *ranges*,
one or two half-open ``(lo, hi)`` intervals of unit indices. Scaling is inverted dropout by the
realised keep fraction, ``scale = n / keep`` (not ``1 / (1 - p)``: ``keep`` is rounded, and
``n / keep`` keeps the expected activation exact); nothing is applied at test time.

The slice start is a pure function of ``(seed, layer, step)``: the Philox word at
``(seed, layer, step, TAG_SLICE, row 0, col 0)`` (the word ``philox.uniform(..., TAG_SLICE, 1)[0]``
is made of) picks uniformly among the valid starts, in integer arithmetic so large ``n`` stays
exact. Two modes:

- wrap (``align=None``): start uniform in ``[0, n)``; a slice that runs past the last unit
  continues at unit 0, giving two ranges. Every unit is then kept with probability exactly
  ``keep / n``, so ``n / keep`` scaling is unbiased for every unit. The Linear ops gather the
  pieces into one kept-size operand first, so each product is one GEMM of fixed shape.
- aligned (``align=a``): ``keep`` is also rounded to a multiple of ``a`` (at least ``a``), so
  every range starts and ends on an ``a``-unit boundary and the sliced GEMMs keep
  tensor-core-friendly sizes and addresses (wrap mode's odd widths send cuBLAS to slow kernels:
  measured 2x slower than dense at keep 0.5, fp16 4096^3, H200). When ``a`` divides ``n`` the
  start is uniform over all multiples of ``a`` and the slice wraps block-wise: every unit is kept
  with probability exactly ``keep / n``, as in wrap mode. Otherwise the start is uniform over the
  multiples of ``a`` with ``start + keep <= n`` (one range, no wrap), so units near the end are
  kept less often than ``keep / n`` (biased: prefer an ``a`` that divides ``n``; the scale is
  still ``n / keep``). ``a > n`` raises, and so does a configuration whose only
  valid start is 0 while ``keep < n``: it would drop the same units at every step, which is
  pruning, not dropout.

The mask of one step is a :class:`SliceMask` (``n_units``, ``p``, the kept ``ranges``,
``align``), drawn by :func:`draw_mask`.

Slices decided on the device. With a *device step* (a 0-d uint32 CuPy array, as a captured CUDA
graph's layers get from ``StochasticLayer.next_step(device=True)``) the start cannot be known on
the host without a sync, so :func:`draw_mask` returns a mask with ``ranges=None`` and ``draw`` =
:class:`SliceDraw` ``(seed, layer, step)``: the kernels of ``raw_kernels/slice.cu`` compute the
start from it when they run, with the same integer arithmetic as :func:`slice_start`, gather the
kept units into kept-size buffers and scatter gradients back. ``keep`` and the scale depend only
on ``(n_units, p, align)``, so every shape stays fixed and the GEMMs are the ones the host path
runs, on the same operands: the results are bit-identical to the int step's.
``sliceout_linear``, ``sliceout_linear_out`` and ``sliceout_linear_compact`` take such masks
(so ``SliceOutLinear`` and ``SliceOutChain`` can be captured); ``sliceout``,
``sliceout_conv2d`` and ``sliceout_attention`` raise TypeError for them. Every op is
``op(arrays..., p=None, *, mask=None, seed=None, layer=0, step=None, align=None, <options>)``:
it applies ``mask`` when given (``p`` defaults to the mask's and must match it; the mask's
``n_units`` must be the op's unit count) and otherwise draws one from ``(p, seed, layer, step,
align)``, so ``p`` is then required (``sliceout_linear_compact`` takes its two masks only). The
scale is always the mask's ``n / keep``.

Ops (each a pair ``op(...) -> (out, saved)`` and ``op_backward(grad_out, saved) -> grads`` on raw
NumPy/CuPy arrays; ``saved`` is a NamedTuple holding the SliceMask, never a mask array):

- ``sliceout``: the semantic form, ``x * m / q`` along one axis (features or channels).
- ``sliceout_linear``: *input*-unit SliceOut of a Linear layer, ``(x ⊙ m / q) @ W + b``: the GEMM
  runs on ``X[:, S] @ W[S, :]``. Use it for the layer that *consumes* the dropped units.
- ``sliceout_linear_out``: *output*-unit SliceOut, ``(x @ W + b) ⊙ m / q``: only the kept
  columns ``X @ W[:, S]`` are computed, the rest are exact zeros. Use it for the layer that
  *produces* the dropped units (it equals Linear followed by ``sliceout``).
- ``sliceout_linear_compact``: a Linear between *compact* activations, where one slice is
  shared by the layer that produces the units and the one that consumes them (an MLP's hidden
  layers, ``nn.SliceOutChain``): x holds only the kept input units, the result only the kept
  output units, and the GEMM runs on ``X_S @ W[S_in, S_out]``; nothing is scattered or
  gathered between layers.
- ``sliceout_conv2d``: output-channel SliceOut of a convolution; only ``weight[S]`` is convolved.
- ``sliceout_attention``: head SliceOut of multi-head self-attention; the qkv projection, the
  attention products and the output projection run for the kept heads only.

Gradients of the parameters are full-size arrays (optimisers need them) whose dropped rows,
columns or channels are exact zeros; no product touches them.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from .. import backend, philox, random
from ..functional import _conv
from ..functional._act import LinearSaved, linear, linear_backward
from ..functional._attention import AttentionSaved, attention, attention_backward
from ..functional._matmul import matmul
from ..raw_kernels import launch, load

__all__ = ["SliceMask", "SliceDraw", "draw_mask", "check_align", "keep_count", "auto_align",
           "num_starts", "slice_start", "slice_ranges", "check_ranges", "load_device_kernels",
           "sliceout", "sliceout_backward",
           "SliceOutSaved", "sliceout_linear", "sliceout_linear_backward", "SliceOutLinearSaved",
           "sliceout_linear_out", "sliceout_linear_out_backward", "SliceOutLinearOutSaved",
           "sliceout_linear_compact", "sliceout_linear_compact_backward",
           "SliceOutLinearCompactSaved", "sliceout_conv2d", "sliceout_conv2d_backward",
           "SliceOutConv2dSaved",
           "sliceout_attention", "sliceout_attention_backward", "SliceOutAttentionSaved"]


# ---- the slice: counts, starts, ranges -----------------------------------------------------

def _int(name, v, low):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return int(v)


def check_align(align):
    """``align`` as an int (or None: wrap mode), or ValueError unless a positive int."""
    if align is None:
        return None
    if isinstance(align, bool) or not isinstance(align, numbers.Integral) or align <= 0:
        raise ValueError(f"align must be a positive int or None (wrap-around mode), got {align!r}")
    return int(align)


def keep_count(n_units, p, align=None) -> int:
    """Units kept out of ``n_units`` at drop probability ``p``: ``round((1 - p) n)``, halves
    rounded up, at least 1; with ``align``, rounded to a multiple of it instead (at least
    ``align``, at most the largest multiple that fits; ``p == 0`` keeps all ``n``)."""
    n = _int("n_units", n_units, 1)
    p = philox.check_prob(p)
    align = check_align(align)
    if align is None or p == 0 or align > n:  # align > n: num_starts explains the error
        return n if p == 0 else min(n, max(1, int(math.floor((1.0 - p) * n + 0.5))))
    blocks = int(math.floor((1.0 - p) * n / align + 0.5))
    return min(n // align, max(1, blocks)) * align


def auto_align(n_units) -> int | None:
    """The default ``align`` for ``n_units`` units: the largest of 32, 16, 8 (the fp16
    tensor-core granule) that divides ``n_units`` and leaves at least 8 blocks, so the slice
    wraps at block granularity and every unit is kept with the same probability; wrap mode
    (None) when none does."""
    for a in (32, 16, 8):
        if n_units % a == 0 and n_units >= 8 * a:
            return a
    return None


def num_starts(n_units, keep, align=None) -> int:
    """How many slice starts are valid (see the module docstring); raises ValueError, naming the
    argument, for an ``align`` that cannot give a random slice of ``keep`` out of ``n_units``."""
    n = _int("n_units", n_units, 1)
    keep = _int("keep", keep, 1)
    if keep > n:
        raise ValueError(f"keep ({keep}) must not exceed n_units ({n})")
    align = check_align(align)
    if align is None:
        return n
    if align > n:
        raise ValueError(f"align ({align}) must not exceed the number of units ({n}); use a "
                         "smaller align or align=None (wrap-around)")
    if n % align == 0:  # whole blocks: the slice wraps block-wise, every start is valid
        return n // align
    count = (n - keep) // align + 1
    if count == 1 and keep < n:
        raise ValueError(f"align={align} leaves a single valid slice start for {n} units keeping "
                         f"{keep}: units {keep}..{n - 1} would be dropped at every step; use a "
                         "smaller align, a different p, or align=None (wrap-around)")
    return count


def slice_start(n_units, keep, *, seed, layer, step, align=None) -> int:
    """The first kept unit at ``(seed, layer, step)``: uniform over ``[0, n_units)`` in wrap
    mode, over the valid multiples of ``align`` otherwise. Host-side; no device work."""
    count = num_starts(n_units, keep, align)
    seed = philox.check_seed("seed", seed)
    layer = philox.check_seed("layer", layer)
    step = philox.check_step(step)
    word = int(philox.words(seed, layer, step, philox.TAG_SLICE, 0, 0))
    idx = (word * count) >> 32  # floor(u * count) with u = word / 2**32, exactly
    return idx if align is None else idx * int(align)


def slice_ranges(n_units, keep, start) -> tuple:
    """The kept units as one or two half-open ranges ``((lo, hi), ...)``; a slice running past
    the end wraps to 0. ``keep == n_units`` is always the single range ``((0, n),)``."""
    n = _int("n_units", n_units, 1)
    keep = _int("keep", keep, 1)
    if keep > n:
        raise ValueError(f"keep ({keep}) must not exceed n_units ({n})")
    start = _int("start", start, 0)
    if start >= n:
        raise ValueError(f"start must be in [0, n_units={n}), got {start}")
    if keep == n:
        return ((0, n),)
    if start + keep <= n:
        return ((start, start + keep),)
    return ((start, n), (0, start + keep - n))


def check_ranges(ranges, n_units, name="ranges") -> tuple:
    """Validate kept ranges over ``n_units`` units: a non-empty tuple of disjoint ``(lo, hi)``
    int pairs with ``0 <= lo < hi <= n_units``. Returns them as a tuple of int pairs."""
    try:
        out = tuple((int(lo), int(hi)) for lo, hi in ranges)
        ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                 for r in ranges for v in r)
    except (TypeError, ValueError):
        ok = False
    if not ok or not out:
        raise ValueError(f"{name} must be a non-empty sequence of (lo, hi) int pairs, "
                         f"got {ranges!r}")
    prev = 0
    for lo, hi in sorted(out):
        if not 0 <= lo < hi <= n_units or lo < prev:
            raise ValueError(f"{name} must be disjoint (lo, hi) pairs with 0 <= lo < hi <= "
                             f"{n_units}, got {ranges!r}")
        prev = hi
    return out


def _kept(ranges):
    return sum(hi - lo for lo, hi in ranges)


def _pieces(ranges, unit=1, base=0):
    """``(lo, hi, off)`` per range in element units: ``[lo, hi)`` of the full axis is
    ``[off, off + hi - lo)`` of the compact (kept-only) axis."""
    out, off = [], 0
    for lo, hi in ranges:
        out.append((base + lo * unit, base + hi * unit, off))
        off += (hi - lo) * unit
    return out


# ---- the mask ----------------------------------------------------------------------------------

class SliceDraw(NamedTuple):
    """Where a slice decided on the device comes from: the Philox key ``(seed, layer)`` and the
    device ``step`` (a 0-d uint32 CuPy array, read by the kernels when they run)."""
    seed: int
    layer: int
    step: object


class SliceMask(NamedTuple):
    """The kept slice of one step over ``n_units`` units: ``ranges``, one or two half-open
    ``(lo, hi)`` intervals (two when the slice wraps past the last unit), drawn at drop
    probability ``p`` with ``align`` (None: wrap mode). Host-side ints only: the ops slice views
    with it and never build a mask array. Made by :func:`draw_mask`, or by
    :meth:`from_ranges` for a hand-picked kept set.

    A slice decided on the device (:func:`draw_mask` with a device step) has ``ranges=None``
    and ``draw``, a :class:`SliceDraw`: the kernels compute the start from it (see the module
    docstring); :meth:`host` turns it into the host form by reading the step."""
    n_units: int
    p: float
    ranges: tuple | None
    align: int | None = None
    draw: SliceDraw | None = None

    @property
    def on_device(self) -> bool:
        """True when the start is decided on the device (``ranges`` is None)."""
        return self.ranges is None

    @property
    def keep(self) -> int:
        """How many units are kept: the total width of ``ranges`` (for a slice decided on the
        device, ``keep_count(n_units, p, align)``, the width it will have)."""
        if self.ranges is None:
            return keep_count(self.n_units, self.p, self.align)
        return _kept(self.ranges)

    def host(self) -> "SliceMask":
        """This mask with its ``ranges`` decided on the host: itself when they are, else the
        mask :func:`draw_mask` draws at the int value of the device step (reading it waits for
        the device: for references and tests, never inside a captured step)."""
        if self.ranges is not None:
            return self
        seed, layer, step = self.draw
        return draw_mask(self.n_units, self.p, seed=seed, layer=layer, step=int(step),
                         align=self.align)

    @property
    def scale(self) -> float:
        """The inverted-dropout scale ``n_units / keep`` (the realised keep fraction's inverse,
        see the module docstring)."""
        return self.n_units / self.keep

    def to_dense(self, xp=np, dtype=bool):
        """The materialised 0/1 mask of shape (n_units,) (for references and tests; the ops never
        build it; a slice decided on the device is read back first, :meth:`host`)."""
        ranges = check_ranges(self.host().ranges, self.n_units, "mask.ranges")
        m = np.zeros(self.n_units, dtype=dtype)
        for lo, hi in ranges:
            m[lo:hi] = 1
        return xp.asarray(m)

    @classmethod
    def from_ranges(cls, n_units, ranges, align=None) -> "SliceMask":
        """A mask keeping the given ``ranges`` of ``n_units`` units (validated by
        :func:`check_ranges`); its ``p`` is ``1 - keep / n_units``, the realised drop
        fraction."""
        n = _int("n_units", n_units, 1)
        ranges = check_ranges(ranges, n)
        return cls(n, 1.0 - _kept(ranges) / n, ranges, check_align(align))


def draw_mask(n_units, p, *, seed=None, layer=0, step=None, align=None) -> SliceMask:
    """The :class:`SliceMask` of one step: ``keep_count`` units from the start
    :func:`slice_start` draws at ``(seed, layer, step)``, wrapping past the last unit
    (``slice_ranges``). A pure function of its arguments; host-side, no device work.
    ``seed=None``: the global generator (``cudrop.random``).

    ``step`` a device step (a 0-d uint32 CuPy array): the start is left to the kernels, which
    read the step when they run; the mask has ``ranges=None`` and ``draw=SliceDraw(seed, layer,
    step)`` (see :class:`SliceMask`). Every argument is still checked here."""
    seed, step = random.resolve(seed, step)
    n = _int("n_units", n_units, 1)
    p = philox.check_prob(p)
    align = check_align(align)
    keep = keep_count(n, p, align)
    if backend.is_gpu_array(step):
        layer = philox.check_seed("layer", layer)
        num_starts(n, keep, align)  # the same argument errors as the host draw
        if n >= 2 ** 31:  # the kernels' start arithmetic (slice.cuh) assumes it
            raise ValueError(f"sliceout: a slice decided on the device needs fewer than 2**31 "
                             f"units, got {n}")
        return SliceMask(n, p, None, align, SliceDraw(seed, layer, step))
    step = philox.check_host_step(step, "sliceout")
    start = slice_start(n, keep, seed=seed, layer=layer, step=step, align=align)
    return SliceMask(n, p, slice_ranges(n, keep, start), align)


def _resolve_mask(op, p, mask, draw, n_units, units):
    """The mask an op applies: ``mask`` checked against the op's ``n_units`` (``units`` says
    where that count comes from, for the error: "w has 7 output units (N)"), ``p`` and
    ``align``; or, without one, the mask :func:`draw_mask` draws from ``p`` and ``draw`` =
    (seed, layer, step, align)."""
    seed, layer, step, align = draw
    align = check_align(align)
    if mask is None:
        if p is None:
            raise TypeError(f"{op}: p is required when no mask is given")
        return draw_mask(n_units, p, seed=seed, layer=layer, step=step, align=align)
    if not isinstance(mask, SliceMask):
        raise TypeError(f"{op}: mask must be a SliceMask (from draw_mask), got "
                        f"{type(mask).__name__}")
    if mask.n_units != n_units:
        raise ValueError(f"{op}: mask.n_units is {mask.n_units} but {units}; draw the mask "
                         "over the op's units")
    if p is not None and philox.check_prob(p) != mask.p:
        raise ValueError(f"{op}: mask was drawn with p={mask.p} but p={p}; pass the mask's p "
                         "or leave p out")
    if align is not None and align != mask.align:
        raise ValueError(f"{op}: mask was drawn with align={mask.align} but align={align}; "
                         "pass the mask's align or leave align out")
    if mask.ranges is None:
        if not isinstance(mask.draw, SliceDraw):
            raise ValueError(f"{op}: a mask with ranges=None must carry its draw (a "
                             "SliceDraw: draw_mask with a device step makes one)")
        return mask
    return mask._replace(ranges=check_ranges(mask.ranges, n_units, "mask.ranges"))


def _host_only(op, mask):
    """The host ranges of ``mask`` for an op that slices on the host; TypeError for a slice
    decided on the device (that op has no kernels for it)."""
    if mask.ranges is None:
        raise TypeError(f"{op}: this op decides its slice on the host; a mask drawn with a device "
                        "step (ranges=None) works with sliceout_linear and sliceout_linear_out "
                        "only: draw with an int step")
    return mask.ranges


def _device_xp(op, mask, xp):
    """``xp`` checked against ``mask``: a slice decided on the device needs CuPy arrays."""
    if mask.ranges is None and xp is np:
        raise TypeError(f"{op}: the mask's slice is decided on the device (drawn with a device "
                        "step) but the arrays are NumPy arrays: pass CuPy arrays, or draw with "
                        "an int step")


def _array(a, name, op):
    if not hasattr(a, "ndim") or not hasattr(a, "dtype"):
        raise TypeError(f"{op}: {name} must be a NumPy or CuPy array, got {type(a).__name__}")


def _same_dtype(op, x, **others):
    for name, a in others.items():
        if a is not None and a.dtype != x.dtype:
            raise TypeError(f"{op}: {name} is {a.dtype} but x is {x.dtype}; cast one to the other")


# ---- the semantic form --------------------------------------------------------------------

def _axis(x, axis, op):
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not (
            -x.ndim <= axis < x.ndim):
        raise ValueError(f"{op}: axis must be an int in [-{x.ndim}, {x.ndim}) for x of shape "
                         f"{x.shape}, got {axis!r}")
    return int(axis) % x.ndim


class SliceOutSaved(NamedTuple):
    """What :func:`sliceout_backward` needs: the mask and the (non-negative) units axis."""
    mask: SliceMask
    axis: int


def _apply_slice(x, ranges, axis, scale):
    xp = backend.get_array_module(x)
    y = xp.zeros_like(x)
    lead = (slice(None),) * axis
    for lo, hi in ranges:
        idx = lead + (slice(lo, hi),)
        y[idx] = x[idx] * scale
    return y


def sliceout(x, p=None, *, mask=None, seed=None, layer=0, step=None, align=None, axis=-1):
    """``x ⊙ m / q`` with ``m`` the slice mask along ``axis`` (features: -1; channels of NCHW: 1).

    ``mask`` (a :class:`SliceMask` over ``x.shape[axis]`` units) or else the one
    :func:`draw_mask` draws from ``(p, seed, layer, step, align)``. Only the kept slices are
    read and scaled (by the mask's ``n / keep``); the output is dense (exact zeros elsewhere) so
    any layer can follow. Returns ``(y, saved)`` for :func:`sliceout_backward`.
    """
    op = "sliceout"
    _array(x, "x", op)
    axis = _axis(x, axis, op)
    mask = _resolve_mask(op, p, mask, (seed, layer, step, align), x.shape[axis],
                         f"x has {x.shape[axis]} units along axis {axis}")
    return _apply_slice(x, _host_only(op, mask), axis, mask.scale), SliceOutSaved(mask, axis)


def sliceout_backward(gy, saved):
    """Gradient of :func:`sliceout`: the same slice of ``gy``, scaled; zeros elsewhere."""
    n = saved.mask.n_units
    if gy.ndim <= saved.axis or gy.shape[saved.axis] != n:
        raise ValueError(f"sliceout_backward: gy must have {n} units along axis {saved.axis}, "
                         f"got shape {gy.shape}")
    return _apply_slice(gy, saved.mask.ranges, saved.axis, saved.mask.scale)


# ---- Linear -------------------------------------------------------------------------------

def _linear_args(x, w, b, op):
    _array(x, "x", op)
    _array(w, "w", op)
    if b is not None:
        _array(b, "b", op)
    xp = backend.get_array_module(x, w, b)
    if x.ndim < 1 or w.ndim != 2:
        raise ValueError(f"{op}: x must be (..., K) and w (K, N); got x {x.shape}, w {w.shape}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"{op}: x has {x.shape[-1]} features in its last axis but w expects "
                         f"{w.shape[0]} (x shape {x.shape}, w shape {w.shape})")
    if b is not None and b.shape != (w.shape[1],):
        raise ValueError(f"{op}: b must have shape ({w.shape[1]},) to match w {w.shape}, "
                         f"got {b.shape}")
    _same_dtype(op, x, w=w, b=b)
    return xp, x.reshape(-1, w.shape[0])


class SliceOutLinearSaved(NamedTuple):
    """What :func:`sliceout_linear_backward` needs: the kept-size Linear's own saved state
    (``functional.linear`` on the kept, scaled input columns and the kept weight rows), the mask,
    x's shape and w's shape."""
    kept: LinearSaved
    mask: SliceMask
    x_shape: tuple
    w_shape: tuple


def sliceout_linear(x, w, b=None, p=None, *, mask=None, seed=None, layer=0, step=None, align=None):
    """Input-unit SliceOut of ``x @ w + b``: ``y = (x ⊙ m / q) @ w + b`` computed as the dense
    Linear of kept-size copies, ``(x[..., S] * K / keep) @ w[S] + b``.

    ``x`` (..., K), ``w`` (K, N), ``b`` (N,) or None; ``mask`` a :class:`SliceMask` over the K
    input units, or else the one :func:`draw_mask` draws from ``(p, seed, layer, step, align)``.
    Returns ``(y, saved)``, ``y`` of shape (..., N).
    """
    op = "sliceout_linear"
    xp, x2 = _linear_args(x, w, b, op)
    k, n = w.shape
    mask = _resolve_mask(op, p, mask, (seed, layer, step, align), k,
                         f"x and w have {k} input units (K)")
    _device_xp(op, mask, xp)
    # The kept units become contiguous operands of fixed shape, (M, keep) scaled on the way and
    # (keep, N): one GEMM whose shape does not change from step to step (a wrapped slice's
    # pieces vary in width, and new shapes cost cuBLAS planning and allocator misses: measured
    # 2x slower than dense at keep 0.5, fp16 4096^2, H200), no strided-view operand, the scale
    # folded into the copy. The product is the dense Linear's (bias in the GEMM's epilogue, its
    # gradient too in backward); it keeps both copies for backward, so w is gathered once.
    xs = _take(x2, mask, 1, xp, x.dtype.type(mask.scale))
    y, kept = linear(xs, _take(w, mask, 0, xp), b)
    return y.reshape(x.shape[:-1] + (n,)), SliceOutLinearSaved(kept, mask, x.shape, w.shape)


def sliceout_linear_backward(gy, saved):
    """Gradients ``(gx, gw, gb)`` of :func:`sliceout_linear`. ``gx`` is dense (the previous layer
    needs it) with zeros outside the kept input units; ``gw`` has exact zero rows outside them;
    only the kept-size products run. ``gb`` is None without a bias."""
    kept, mask, x_shape, w_shape = saved
    xp = backend.get_array_module(gy)
    k, n = w_shape
    if gy.shape != x_shape[:-1] + (n,):
        raise ValueError(f"sliceout_linear_backward: gy must have the output's shape "
                         f"{x_shape[:-1] + (n,)}, got {gy.shape}")
    g2 = gy.reshape(-1, n)
    gxs, gws, gb = linear_backward(g2, kept)
    gx = _put(gxs, mask, 1, (g2.shape[0], k), xp, gy.dtype.type(mask.scale))
    return gx.reshape(x_shape), _put(gws, mask, 0, w_shape, xp), gb


class SliceOutLinearOutSaved(NamedTuple):
    """What :func:`sliceout_linear_out_backward` needs: x as (M, K), the kept weight columns
    ``ws`` (K, keep), w's shape, whether there was a bias, the mask and x's shape."""
    x: object
    ws: object
    w_shape: tuple
    has_bias: bool
    mask: SliceMask
    x_shape: tuple


def sliceout_linear_out(x, w, b=None, p=None, *, mask=None, seed=None, layer=0, step=None,
                        align=None):
    """Output-unit SliceOut of ``x @ w + b``: ``y = (x @ w + b) ⊙ m / q``. Only the kept
    columns ``x @ w[:, lo:hi]`` are computed; the other columns of ``y`` are exact zeros.

    ``x`` (..., K), ``w`` (K, N), ``b`` (N,) or None; ``mask`` a :class:`SliceMask` over the N
    output units, or else the one :func:`draw_mask` draws from ``(p, seed, layer, step,
    align)``; the scale is ``N / keep``. Returns ``(y, saved)``, ``y`` of shape (..., N).
    """
    op = "sliceout_linear_out"
    xp, x2 = _linear_args(x, w, b, op)
    k, n = w.shape
    mask = _resolve_mask(op, p, mask, (seed, layer, step, align), n,
                         f"w has {n} output units (N)")
    _device_xp(op, mask, xp)
    s_ = x.dtype.type(mask.scale)
    ws = _take(w, mask, 1, xp)  # (K, keep): one fixed-shape GEMM, see sliceout_linear
    part = matmul(x2, ws * s_)
    if b is not None:
        part += _take(b, mask, 0, xp) * s_
    y = _put(part, mask, 1, (x2.shape[0], n), xp)
    return y.reshape(x.shape[:-1] + (n,)), SliceOutLinearOutSaved(x2, ws, w.shape, b is not None,
                                                                  mask, x.shape)


def sliceout_linear_out_backward(gy, saved):
    """Gradients ``(gx, gw, gb)`` of :func:`sliceout_linear_out`: ``gw`` and ``gb`` are exact
    zeros outside the kept columns; ``gx`` sums the kept-column products."""
    x2, ws, w_shape, has_b, mask, x_shape = saved
    xp = backend.get_array_module(gy, x2)
    k, n = w_shape
    if gy.shape != x_shape[:-1] + (n,):
        raise ValueError(f"sliceout_linear_out_backward: gy must have the output's shape "
                         f"{x_shape[:-1] + (n,)}, got {gy.shape}")
    g2 = gy.reshape(-1, n)
    gs = _take(g2, mask, 1, xp, gy.dtype.type(mask.scale))
    gx = matmul(gs, ws.T)
    gw = _put(matmul(x2.T, gs), mask, 1, w_shape, xp)
    gb = _put(gs.sum(axis=0), mask, 0, (n,), xp) if has_b else None
    return gx.reshape(x_shape), gw, gb


class SliceOutLinearCompactSaved(NamedTuple):
    """What :func:`sliceout_linear_compact_backward` needs: the kept-size Linear's own saved
    state (the compact input and the kept, scaled weight block), both masks, w's shape."""
    kept: LinearSaved
    in_mask: SliceMask | None
    out_mask: SliceMask | None
    w_shape: tuple


def sliceout_linear_compact(x, w, b=None, *, in_mask=None, out_mask=None):
    """The Linear between *compact* SliceOut activations, where a slice is shared by the
    layer that makes the units and the one that reads them: ``x`` holds only the kept input
    units ``S_in`` of ``in_mask`` (..., keep_in), unscaled; the result holds only the kept
    output units ``S_out`` of ``out_mask`` (..., keep_out), unscaled (the next layer's
    ``in_mask`` is this ``out_mask``, and it applies the scale). So
    ``y = ((h ⊙ m_in / q_in) @ w + b)[..., S_out]`` for the full activation ``h`` whose kept
    units ``x`` holds, computed as one kept-size GEMM ``x @ (w[S_in, S_out] * scale_in) +
    b[S_out]``: the hidden layers of an MLP cost keep_in * keep_out / (K * N) of the dense
    FLOPs, and no activation is scattered or gathered between layers.

    ``w`` (K, N), ``b`` (N,) or None. ``in_mask`` None: ``x`` is the full input (..., K);
    ``out_mask`` None: the full output (..., N). Masks may be decided on the device. Returns
    ``(y, saved)``.
    """
    op = "sliceout_linear_compact"
    _array(x, "x", op)
    _array(w, "w", op)
    if b is not None:
        _array(b, "b", op)
    xp = backend.get_array_module(x, w, b)
    if w.ndim != 2 or x.ndim < 1:
        raise ValueError(f"{op}: x must be (..., K) and w (K, N); got x {x.shape}, w {w.shape}")
    k, n = w.shape
    for name, m, units in (("in_mask", in_mask, k), ("out_mask", out_mask, n)):
        if m is not None and (not isinstance(m, SliceMask) or m.n_units != units):
            raise ValueError(f"{op}: {name} must be a SliceMask over w's {units} "
                             f"{'input' if name == 'in_mask' else 'output'} units or None, "
                             f"got {m!r}")
        if m is not None:
            _device_xp(op, m, xp)
    width = k if in_mask is None else in_mask.keep
    if x.shape[-1] != width:
        raise ValueError(f"{op}: x must hold {width} features in its last axis (the "
                         f"{'kept units of in_mask' if in_mask is not None else 'rows of w'}), "
                         f"got shape {x.shape}")
    if b is not None and b.shape != (n,):
        raise ValueError(f"{op}: b must have shape ({n},) to match w {w.shape}, got {b.shape}")
    _same_dtype(op, x, w=w, b=b)
    # the kept block, with the input scale folded in (one copy, no pass over x)
    ws = _take_block(w, in_mask, out_mask, xp,
                     None if in_mask is None else w.dtype.type(in_mask.scale))
    if out_mask is not None and b is not None:
        b = _take(b, out_mask, 0, xp)
    y, kept = linear(x, ws, b)
    return y, SliceOutLinearCompactSaved(kept, in_mask, out_mask, w.shape)


def sliceout_linear_compact_backward(gy, saved, needs=(True, True, True)):
    """Gradients ``(gx, gw, gb)`` of :func:`sliceout_linear_compact`: ``gx`` compact like x,
    ``gw`` and ``gb`` full-size with exact zeros outside the kept block; only kept-size
    products run. A gradient whose entry of ``needs`` is False is None (an MLP's first layer:
    its input gradient)."""
    kept, in_mask, out_mask, w_shape = saved
    xp = backend.get_array_module(gy)
    k, n = w_shape
    width = n if out_mask is None else out_mask.keep
    want = kept.x_shape[:-1] + (width,)
    if gy.shape != want:
        raise ValueError(f"sliceout_linear_compact_backward: gy must have the output's shape "
                         f"{want}, got {gy.shape}")
    gx, gw, gb = linear_backward(gy, kept, needs)
    if gw is not None:  # d/dw of the block times the scale: the scale again
        gw = _put_block(gw, in_mask, out_mask, w_shape, xp,
                        None if in_mask is None else gy.dtype.type(in_mask.scale))
    if out_mask is not None and gb is not None:
        gb = _put(gb, out_mask, 0, (n,), xp)
    return gx, gw, gb


# ---- Conv2d -------------------------------------------------------------------------------

def _compact(a, ranges, axis, xp):
    """The kept units of ``a`` along ``axis`` as one C-contiguous array (a copy)."""
    return xp.ascontiguousarray(_gather(a, ranges, axis, xp))


def _compact_scaled(a, ranges, axis, xp, s):
    """``_compact(a) * s`` in one pass over the kept units (the product of a view is already
    contiguous); a wrapped slice is concatenated, then scaled in place."""
    part = _gather(a, ranges, axis, xp)
    if len(ranges) == 1:
        return part * s
    part *= s
    return part


def _scatter(part, ranges, axis, shape, xp, s=None):
    """Zeros of ``shape`` with the compact ``part`` (times the dtype scalar ``s`` when given, in
    the same pass) written back at the kept units."""
    out = xp.zeros(shape, dtype=part.dtype)
    lead, off = (slice(None),) * axis, 0
    for lo, hi in ranges:
        src, dst = part[lead + (slice(off, off + hi - lo),)], out[lead + (slice(lo, hi),)]
        if s is None:
            dst[...] = src
        else:
            xp.multiply(src, s, out=dst)
        off += hi - lo
    return out


def _gather(a, ranges, axis, xp):
    """The kept slices of ``a`` along ``axis``, compact: a view for one range, one kept-size
    copy for a wrapped slice (so the convolution builds its im2col columns only once)."""
    lead = (slice(None),) * axis
    parts = [a[lead + (slice(lo, hi),)] for lo, hi in ranges]
    return parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=axis)


def _take(a, mask, axis, xp, s=None):
    """The kept units of ``a`` along ``axis`` as one C-contiguous kept-size array, times the
    dtype scalar ``s`` when given: ``_compact`` / ``_compact_scaled`` on the host ranges, the
    gather kernel for a slice decided on the device (the same values bit for bit: the same
    elements, in the same order, times the same dtype-rounded scale)."""
    if mask.ranges is not None:
        if s is None:
            return _compact(a, mask.ranges, axis, xp)
        return xp.ascontiguousarray(_compact_scaled(a, mask.ranges, axis, xp, s))
    a = xp.ascontiguousarray(a)
    outer, n, inner = _split(a.shape, axis)
    keep = mask.keep
    out = xp.empty(a.shape[:axis] + (keep,) + a.shape[axis + 1:], dtype=a.dtype)
    _launch_slice("slice_gather", out.size, a, out, outer, n, inner, mask, _scale_args(s))
    return out


def _put(part, mask, axis, shape, xp, s=None):
    """Zeros of ``shape`` with the kept-size ``part`` (times the dtype scalar ``s`` when given,
    as ``part * s``) written back at the kept units along ``axis``: ``_scatter`` on the host
    ranges, the scatter kernel (which writes every element, +0 at the dropped units, and scales
    on the way) for a slice decided on the device."""
    if mask.ranges is not None:
        return _scatter(part, mask.ranges, axis, shape, xp, s)
    part = xp.ascontiguousarray(part)
    outer, n, inner = _split(shape, axis)
    out = xp.empty(shape, dtype=part.dtype)
    _launch_slice("slice_scatter", out.size, part, out, outer, n, inner, mask, _scale_args(s))
    return out


def _take_block(w, row_mask, col_mask, xp, s=None):
    """``w[S_rows, S_cols]`` of a 2-D ``w`` (a mask None: every row / column), times ``s``
    (given with ``row_mask`` only), as one C-contiguous array: one block-gather kernel when
    both slices are decided on the device, else one :func:`_take` per sliced axis."""
    if _both_on_device(row_mask, col_mask):
        w = xp.ascontiguousarray(w)
        out = xp.empty((row_mask.keep, col_mask.keep), dtype=w.dtype)
        _launch_block("slice_block_gather", w, out, w.shape, row_mask, col_mask, s)
        return out
    if row_mask is not None:
        w = _take(w, row_mask, 0, xp, s)
    return w if col_mask is None else _take(w, col_mask, 1, xp)


def _put_block(part, row_mask, col_mask, shape, xp, s=None):
    """Zeros of the 2-D ``shape`` with ``part * s`` written at the kept block (the inverse of
    :func:`_take_block`)."""
    if _both_on_device(row_mask, col_mask):
        part = xp.ascontiguousarray(part)
        out = xp.empty(shape, dtype=part.dtype)
        _launch_block("slice_block_scatter", part, out, shape, row_mask, col_mask, s)
        return out
    if col_mask is not None:
        part = _put(part, col_mask, 1, (part.shape[0], shape[1]), xp)
    return part if row_mask is None else _put(part, row_mask, 0, shape, xp, s)


def _both_on_device(row_mask, col_mask):
    return row_mask is not None and col_mask is not None and row_mask.on_device \
        and col_mask.on_device


def _scale_args(s):
    """The copy kernels' last two arguments: the scale and whether to apply it."""
    return np.float64(1.0 if s is None else s), np.int32(s is not None)


def _split(shape, axis):
    """``(outer, n, inner)``: ``shape`` viewed as three axes around ``axis``."""
    return (math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]))


_THREADS = 256
# Enough 256-thread blocks to fill any current GPU several times over; each thread computes the
# slice start once (one Philox call) and walks several 16-byte groups when the array is larger.
_MAX_BLOCKS = 4096


def _slice_args(mask, n):
    """What every slice kernel computes a device-decided start from, for ``mask`` over ``n``
    units: ``(keep, count of valid starts, unit, seed, layer, step value, step pointer)``."""
    seed, layer, step = mask.draw
    step_value, step_ptr = philox.step_args(step)
    keep = mask.keep
    return (keep, num_starts(n, keep, mask.align), mask.align or 1, seed, layer, step_value,
            step_ptr)


def _launch_slice(fn, total, src, dst, outer, n, inner, mask, extra):
    """Launch ``slice.cu``'s ``fn`` over ``total`` elements with the slice arguments of
    ``mask`` (a slice decided on the device) and ``extra`` after them. The kernels walk units in
    groups of ``gcd(align, n, keep)``, which divides every start, so that a column slice of an
    aligned mask moves whole 16-byte rows (slice.cu)."""
    if total == 0:
        return
    keep, count, unit, seed, layer, step_value, step_ptr = _slice_args(mask, n)
    group = math.gcd(unit, n, keep)
    blocks = min(-(-total // (_THREADS * max(1, 16 // src.itemsize))), _MAX_BLOCKS)
    launch("slice.cu", fn, src.dtype, (blocks,), (_THREADS,),
           (src, dst, np.int64(outer), np.int64(n), np.int64(inner), np.int64(keep),
            np.uint32(seed), np.uint32(layer), step_value, step_ptr,
            np.int64(count), np.int64(unit), np.int64(group)) + extra)


# slice.cu's cd_block_axis, passed by value (CuPy passes a NumPy structured scalar as the
# struct): an axis's kept count, valid-start count, unit, step pointer, Philox key and step
_BLOCK_AXIS = np.dtype({"names": ["keep", "count", "unit", "step_ptr", "seed", "layer", "step"],
                        "formats": ["<i8", "<i8", "<i8", "<u8", "<u4", "<u4", "<u4"],
                        "offsets": [0, 8, 16, 24, 32, 36, 40], "itemsize": 48})


def _block_axis(mask, n):
    """``mask`` (decided on the device) over ``n`` units as a ``cd_block_axis``."""
    a = np.zeros((), _BLOCK_AXIS)
    keep, count, unit, seed, layer, step_value, step_ptr = _slice_args(mask, n)
    a["keep"], a["count"], a["unit"] = keep, count, unit
    a["step_ptr"] = 0 if step_ptr is None else step_ptr.data.ptr
    a["seed"], a["layer"], a["step"] = seed, layer, step_value
    return a[()]


def _launch_block(fn, src, dst, shape, row_mask, col_mask, s):
    """Launch ``slice.cu``'s block kernel ``fn`` over the 2-D ``shape`` of the full array:
    CTAs of ``ty`` rows of ``tx`` threads, ``tx`` the destination row's 16-byte accesses
    rounded up to a warp (at most 256), ``ty = 256 // tx`` (so 129-256 threads a CTA), enough
    CTAs to cover the rows, at most 8192 (the kernels loop over the rest)."""
    rows, cols = shape
    out_rows, width = dst.shape
    if dst.size == 0:
        return
    tx = min(256, -(-max(1, width // max(1, 16 // dst.itemsize)) // 32) * 32)
    ty = 256 // tx
    launch("slice.cu", fn, src.dtype, (min(-(-out_rows // ty), 8192),), (tx, ty),
           (src, dst, np.int64(rows), np.int64(cols), _block_axis(row_mask, rows),
            _block_axis(col_mask, cols)) + _scale_args(s))


def load_device_kernels(dtype) -> None:
    """Compile and load the kernels that apply a slice decided on the device to arrays of
    ``dtype`` (memoised by the one loader, ``raw_kernels``). A layer calls it in its eager steps
    on CuPy, so that a later CUDA-graph capture, whose step first takes the device path, does
    not compile or load a module while the stream is capturing."""
    for fn in ("slice_gather", "slice_scatter", "slice_block_gather", "slice_block_scatter"):
        load("slice.cu", fn, dtype)


def _device_starts(n_units, p, *, seed, layer, steps, align=None):
    """The slice start at each of ``steps`` (a uint32 CuPy vector) as the kernels compute it:
    a (len(steps),) int64 CuPy array (tests compare it with :func:`slice_start`)."""
    cp = backend.cupy
    n = _int("n_units", n_units, 1)
    keep = keep_count(n, philox.check_prob(p), check_align(align))
    steps = cp.ascontiguousarray(steps, dtype=np.uint32)
    out = cp.empty(steps.size, np.int64)
    if steps.size:
        launch("slice.cu", "slice_starts", np.dtype(np.float32), (-(-steps.size // _THREADS),),
               (_THREADS,), (steps, out, np.int64(steps.size), np.uint32(seed), np.uint32(layer),
                             np.int64(n), np.int64(keep), np.int64(num_starts(n, keep, align)),
                             np.int64(align or 1)))
    return out


class SliceOutConv2dSaved(NamedTuple):
    """What :func:`sliceout_conv2d_backward` needs: the kept channels' convolution's own saved
    state (``functional._conv.conv2d``), the mask, w's shape and whether there was a bias."""
    conv: object
    mask: SliceMask
    w_shape: tuple
    has_bias: bool


def sliceout_conv2d(x, w, b=None, p=None, *, mask=None, seed=None, layer=0, step=None, align=None,
                    stride=1, padding=0):
    """Output-channel SliceOut of ``conv2d(x, w, b)``: ``y = conv2d(x, w, b) ⊙ m / q`` over the
    O output channels. Only ``w[S]`` is convolved; the other channels of ``y`` are exact zeros.

    ``x`` (N, C, H, W), ``w`` (O, C, kh, kw), ``b`` (O,) or None; ``mask`` a :class:`SliceMask`
    over the O output channels, or else the one :func:`draw_mask` draws from ``(p, seed, layer,
    step, align)``; the scale is ``O / keep``. Returns ``(y, saved)``.
    """
    op = "sliceout_conv2d"
    _conv.check_4d(w, "w", "(O, C, kh, kw)", op)
    xp = backend.get_array_module(x, w, b)
    o = w.shape[0]
    if b is not None and (not hasattr(b, "shape") or b.shape != (o,)):
        raise ValueError(f"{op}: b must have shape (O,) = ({o},) to match w, "
                         f"got {getattr(b, 'shape', type(b).__name__)}")
    mask = _resolve_mask(op, p, mask, (seed, layer, step, align), o,
                         f"w has {o} output channels (O)")
    ranges, scale = _host_only(op, mask), mask.scale
    ws = _gather(w, ranges, 0, xp)
    bs = None if b is None else _gather(b, ranges, 0, xp)
    ys, conv_saved = _conv.conv2d(x, ws, bs, stride, padding)
    ys *= scale
    y = xp.zeros((ys.shape[0], o) + ys.shape[2:], dtype=ys.dtype)
    for lo, hi, off in _pieces(ranges):
        y[:, lo:hi] = ys[:, off:off + hi - lo]
    return y, SliceOutConv2dSaved(conv_saved, mask, w.shape, b is not None)


def sliceout_conv2d_backward(gy, saved):
    """Gradients ``(gx, gw, gb)`` of :func:`sliceout_conv2d`; ``gw``/``gb`` are exact zeros
    outside the kept output channels, and only the kept channels' products run."""
    conv_saved, mask, w_shape, has_b = saved
    ranges, scale = mask.ranges, mask.scale
    xp = backend.get_array_module(gy)
    o = w_shape[0]
    if gy.ndim != 4 or gy.shape[1] != o:
        raise ValueError(f"sliceout_conv2d_backward: gy must be (N, {o}, Ho, Wo), got {gy.shape}")
    gs = _gather(gy, ranges, 1, xp) * scale
    gx, gws, gbs = _conv.conv2d_backward(gs, conv_saved)
    gw = xp.zeros(w_shape, dtype=gws.dtype)
    gb = xp.zeros((o,), dtype=gws.dtype) if has_b else None
    for lo, hi, off in _pieces(ranges):
        gw[lo:hi] = gws[off:off + hi - lo]
        if has_b:
            gb[lo:hi] = gbs[off:off + hi - lo]
    return gx, gw, gb


# ---- multi-head attention -----------------------------------------------------------------

class SliceOutAttentionSaved(NamedTuple):
    """What :func:`sliceout_attention_backward` needs: x as (B*T, D), the two weights, whether
    each bias was given, the head mask, x's shape, the
    attention pair's saved state over the kept heads and the concatenated kept head outputs
    ``oc`` (B*T, kept*hd)."""
    x: object
    w_qkv: object
    w_proj: object
    has_qkv_bias: bool
    has_proj_bias: bool
    mask: SliceMask
    x_shape: tuple
    attn: AttentionSaved
    oc: object


def sliceout_attention(x, w_qkv, b_qkv, w_proj, b_proj=None, p=None, *, mask=None, seed=None,
                       layer=0, step=None, align=None, num_heads=None, causal=False):
    """Head SliceOut of multi-head self-attention (the math of ``nn.MultiHeadAttention``
    without attention-probability dropout): the concatenated head outputs are multiplied by the
    head mask over ``num_heads`` heads and by ``heads / kept heads`` before the output
    projection: ``y = (concat_h(attn_h) ⊙ m / q) @ w_proj + b_proj``.

    Only kept heads are computed: the qkv projection runs on the kept heads' columns of
    ``w_qkv`` (views), the attention products on ``(B, kept, T, T)``, and the output projection
    on the kept heads' rows of ``w_proj``.

    ``x`` (B, T, D), ``w_qkv`` (D, 3D) with columns ordered (q|k|v, head, head_dim) as in
    ``nn.MultiHeadAttention``, ``b_qkv`` (3D,) or None, ``w_proj`` (D, D), ``b_proj`` (D,) or
    None. ``mask`` a :class:`SliceMask` over the heads, or else the one :func:`draw_mask` draws
    from ``(p, seed, layer, step, align)``; ``num_heads`` defaults to the mask's ``n_units``
    (required without a mask). Returns ``(y, saved)``, ``y`` of shape (B, T, D).
    """
    op = "sliceout_attention"
    for name, a in (("x", x), ("w_qkv", w_qkv), ("w_proj", w_proj)):
        _array(a, name, op)
    xp = backend.get_array_module(x, w_qkv, b_qkv, w_proj, b_proj)
    if num_heads is None:
        if not isinstance(mask, SliceMask):
            raise TypeError(f"{op}: num_heads is required when no mask is given")
        num_heads = mask.n_units
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise ValueError(f"{op}: num_heads must be a positive int, got {num_heads!r}")
    if x.ndim != 3:
        raise ValueError(f"{op}: x must be (batch, time, dim), got shape {x.shape}")
    bsz, t, d = x.shape
    if d % num_heads:
        raise ValueError(f"{op}: dim ({d}) must be divisible by num_heads ({num_heads})")
    expect = {"w_qkv": (w_qkv, (d, 3 * d)), "b_qkv": (b_qkv, (3 * d,)),
              "w_proj": (w_proj, (d, d)), "b_proj": (b_proj, (d,))}
    for name, (a, shape) in expect.items():
        if a is not None and getattr(a, "shape", None) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape} for x of shape {x.shape}, "
                             f"got {getattr(a, 'shape', type(a).__name__)}")
    _same_dtype(op, x, w_qkv=w_qkv, b_qkv=b_qkv, w_proj=w_proj, b_proj=b_proj)
    num_heads = int(num_heads)
    mask = _resolve_mask(op, p, mask, (seed, layer, step, align), num_heads,
                         f"num_heads is {num_heads}")
    ranges, scale = _host_only(op, mask), mask.scale
    hd = d // num_heads
    kh = _kept(ranges)
    kw = kh * hd
    x2 = x.reshape(bsz * t, d)

    # qkv for the kept heads only, compact: (B*T, 3, kept*hd).
    qkv = xp.empty((bsz * t, 3, kw), dtype=x.dtype)
    for j in range(3):
        for lo, hi, off in _pieces(ranges, hd, j * d):
            part = matmul(x2, w_qkv[:, lo:hi])
            if b_qkv is not None:
                part += b_qkv[lo:hi]
            qkv[:, j, off:off + hi - lo] = part
    # the kept heads' attention: the attention pair on the compact (B, T, 3 * kept*hd) layout
    o, attn = attention(qkv.reshape(bsz, t, 3 * kw), kh, causal=causal)
    oc = o.reshape(bsz * t, kw)

    # Output projection on the kept heads' rows of w_proj (input-unit SliceOut).
    y = None
    for lo, hi, off in _pieces(ranges, hd):
        part = matmul(oc[:, off:off + hi - lo], w_proj[lo:hi])
        y = part if y is None else xp.add(y, part, out=y)
    y *= scale
    if b_proj is not None:
        y += b_proj
    saved = SliceOutAttentionSaved(x2, w_qkv, w_proj, b_qkv is not None, b_proj is not None,
                                   mask, x.shape, attn, oc)
    return y.reshape(bsz, t, d), saved


def sliceout_attention_backward(gy, saved):
    """Gradients ``(gx, gw_qkv, gb_qkv, gw_proj, gb_proj)`` of :func:`sliceout_attention`
    (bias gradients None where there was no bias). Parameter gradients are exact zeros outside
    the kept heads' columns (qkv) and rows (proj); every product runs on the kept heads only."""
    x2, w_qkv, w_proj, has_bq, has_bp, mask, x_shape, attn, oc = saved
    num_heads, ranges, scale = mask.n_units, mask.ranges, mask.scale
    xp = backend.get_array_module(gy, w_qkv)
    bsz, t, d = x_shape
    if gy.shape != x_shape:
        raise ValueError(f"sliceout_attention_backward: gy must have the output's shape "
                         f"{x_shape}, got {gy.shape}")
    hd = d // num_heads
    kh = _kept(ranges)
    kw = kh * hd
    g2 = gy.reshape(bsz * t, d)
    gb_proj = g2.sum(axis=0) if has_bp else None
    gw_proj = xp.zeros(w_proj.shape, dtype=gy.dtype)
    goc = xp.empty((bsz * t, kw), dtype=gy.dtype)
    for lo, hi, off in _pieces(ranges, hd):
        part = matmul(oc[:, off:off + hi - lo].T, g2)
        part *= scale
        gw_proj[lo:hi] = part
        part = matmul(g2, w_proj[lo:hi].T)
        part *= scale
        goc[:, off:off + hi - lo] = part
    gqkv = attention_backward(goc.reshape(bsz, t, kw), attn).reshape(bsz * t, 3, kw)
    gx = None
    gw_qkv = xp.zeros(w_qkv.shape, dtype=gy.dtype)
    gb_qkv = xp.zeros((3 * d,), dtype=gy.dtype) if has_bq else None
    for j in range(3):
        for lo, hi, off in _pieces(ranges, hd, j * d):
            gpart = gqkv[:, j, off:off + hi - lo]
            part = matmul(gpart, w_qkv[:, lo:hi].T)
            gx = part if gx is None else xp.add(gx, part, out=gx)
            gw_qkv[:, lo:hi] = matmul(x2.T, gpart)
            if has_bq:
                gb_qkv[lo:hi] = gpart.sum(axis=0)
    return gx.reshape(x_shape), gw_qkv, gb_qkv, gw_proj, gb_proj
