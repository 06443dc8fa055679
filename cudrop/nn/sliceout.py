"""SliceOut layers: one contiguous slice of units (features, channels or heads) kept per training
step, drawn from (seed, layer, step); the layers' products run on the kept slice only.

- ``SliceOut``: the standalone mask, ``x ⊙ m / q`` along the feature axis (-1), or the channel
  axis (1) of a 4-D NCHW input. It saves no compute by itself; it is the semantic form (and the
  way to slice activations that feed a non-linear layer).
- ``SliceOutLinear``: ``mode='input'`` drops input units, ``(x ⊙ m / q) @ W + b`` as
  ``X[:, S] @ W[S, :]``; ``mode='output'`` drops output units, ``(x W + b) ⊙ m / q`` as
  ``X @ W[:, S]``.
- ``SliceOutChain``: a Sequential MLP of Linear / ``SliceOutLinear(mode='input')`` layers and
  element-wise activations that trains with *compact* activations: each hidden layer computes
  only the units the next layer keeps (``models.mlp(dropout='sliceout')`` builds it).
- ``SliceOutConv2d``: drops output channels; only ``weight[S]`` is convolved.
- ``SliceOutMultiHeadAttention``: drops heads; only the kept heads are projected, attended and
  projected back.

Each training forward draws the step's mask with ``cudrop.variants.sliceout.draw_mask`` at
``(seed, layer, next_step())``, keeps it in ``last_mask`` (a ``SliceMask``: its ``ranges`` are
the kept units) and passes it to the op as ``mask=``. ``SliceOutLinear`` on CuPy inputs asks
for ``next_step(device=True)``: eagerly that is the same int, and inside a CUDA-graph capture a
device step, so the mask's slice is decided on the device at every replay (``last_mask`` is then
the captured mask, ``ranges=None``); the other layers decide their slice on the host and refuse
a capture. The layers alone decide train versus eval:
in eval mode they are the plain dense layer (or the identity), with no scaling, and the step
does not advance. Wrap-around vs aligned slices: see ``cudrop.variants.sliceout``;
``SliceOutLinear`` and ``SliceOutConv2d`` default to ``align='auto'``
(``variants.sliceout.auto_align``: 32 units for wide layers), the standalone mask and the
attention heads to wrap mode. The layer classes subclass the dense ones, so parameter names and
initialisation are those of ``Linear``, ``Conv2d`` and ``MultiHeadAttention``.
"""
from __future__ import annotations

import numpy as np

from .. import autograd as ag
from .. import backend, graph
from ..variants import sliceout as F
from ..philox import check_prob
from .attention import MultiHeadAttention
from .layers import GELU, Conv2d, Linear, ReLU, Tanh
from .module import Sequential
from .stochastic import StochasticLayer

__all__ = ["SliceOut", "SliceOutLinear", "SliceOutConv2d", "SliceOutMultiHeadAttention",
           "SliceOutChain"]


class _SliceMixin:
    """Shared by the layers: validated (p, align), the per-step draw, ``last_mask``."""

    def _init_slice(self, p, align, seed, layer, n_units=None):
        self.init_rng(seed, layer)
        self.p = check_prob(p)
        if align == "auto":
            align = None if n_units is None else F.auto_align(n_units)
        self.align = F.check_align(align)
        if n_units is not None:  # fail at construction, not at the first training step
            F.num_starts(n_units, F.keep_count(n_units, self.p, self.align), self.align)
        self.last_mask = None

    # Whether the layer's op takes a slice decided on the device (sliceout_linear and
    # sliceout_linear_out do: raw_kernels/slice.cu); the others decide it on the host and so
    # refuse a CUDA-graph capture (StochasticLayer.next_step).
    _device_slices = False

    def _draw(self, n_units, x=None):
        data = getattr(x, "data", x)
        device = self._device_slices and backend.is_gpu_array(data)
        if device and not graph.is_capturing():
            F.load_device_kernels(data.dtype)  # before a capture needs them: see its docstring
        self.last_mask = F.draw_mask(n_units, self.p, seed=self.seed, layer=self.layer,
                                     step=self.next_step(device=device), align=self.align)
        return self.last_mask

    def _slice_repr(self):
        align = "" if self.align is None else f", align={self.align}"
        return f"p={self.p}{align}, {StochasticLayer.extra_repr(self)}"


class SliceOut(_SliceMixin, StochasticLayer):
    """``x ⊙ m / q`` with ``m`` one contiguous slice of ``round((1 - p) n)`` units along
    ``axis`` (default: 1 for 4-D NCHW inputs, else -1); ``q = keep / n``. Identity in eval."""

    def __init__(self, p=0.5, align=None, seed=0, layer=None, axis=None):
        StochasticLayer.__init__(self)
        self._init_slice(p, align, seed, layer)
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, (int, np.integer))):
            raise ValueError(f"axis must be an int or None, got {axis!r}")
        self.axis = axis

    def forward(self, x):
        if not self.is_training:
            return x
        axis = self.axis if self.axis is not None else (1 if x.ndim == 4 else -1)
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"SliceOut: axis {axis} is out of range for input of shape "
                             f"{x.shape}")
        return ag.sliceout(x, mask=self._draw(x.shape[axis]), axis=axis)

    def extra_repr(self):
        return self._slice_repr()


class SliceOutLinear(Linear, _SliceMixin, StochasticLayer):
    """Linear layer with SliceOut on its input units (``mode='input'``: the GEMM shrinks along
    K) or its output units (``mode='output'``: the GEMM shrinks along N). On CuPy inputs it can
    be captured in a CUDA graph (``cudrop.graph``): there its slice is decided on the device
    from the replay's step, the slice eager mode draws at that step."""

    _device_slices = True

    def __init__(self, in_features, out_features, p=0.5, *, bias=True, mode="input",
                 align="auto", seed=0, layer=None, rng=None, dtype=np.float32):
        if mode not in ("input", "output"):
            raise ValueError(f"mode must be 'input' or 'output', got {mode!r}")
        Linear.__init__(self, in_features, out_features, bias=bias, rng=rng, dtype=dtype)
        self.mode = mode
        n = self.in_features if mode == "input" else self.out_features
        self._init_slice(p, align, seed, layer, n)

    def forward(self, x):
        if not self.is_training:
            return Linear.forward(self, x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SliceOutLinear expects inputs with {self.in_features} features "
                             f"in the last axis, got shape {x.shape}")
        if self.mode == "input":
            return ag.sliceout_linear(x, self.weight, self.bias,
                                      mask=self._draw(self.in_features, x))
        return ag.sliceout_linear_out(x, self.weight, self.bias,
                                      mask=self._draw(self.out_features, x))

    def extra_repr(self):
        return f"{Linear.extra_repr(self)}, mode={self.mode!r}, {self._slice_repr()}"


class SliceOutConv2d(Conv2d, _SliceMixin, StochasticLayer):
    """Conv2d with SliceOut on its output channels: only the kept filters are convolved."""

    def __init__(self, in_channels, out_channels, kernel_size, p=0.5, *, stride=1, padding=0,
                 bias=True, align="auto", seed=0, layer=None, rng=None, dtype=np.float32):
        Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride,
                        padding=padding, bias=bias, rng=rng, dtype=dtype)
        self._init_slice(p, align, seed, layer, self.out_channels)

    def forward(self, x):
        if not self.is_training:
            return Conv2d.forward(self, x)
        return ag.sliceout_conv2d(x, self.weight, self.bias, mask=self._draw(self.out_channels),
                                  stride=self.stride, padding=self.padding)

    def extra_repr(self):
        return f"{Conv2d.extra_repr(self)}, {self._slice_repr()}"


class SliceOutMultiHeadAttention(MultiHeadAttention, _SliceMixin, StochasticLayer):
    """Self-attention with SliceOut on its heads: the concatenated head outputs are masked by
    a contiguous slice of heads and scaled by ``heads / kept`` before the output projection,
    and only the kept heads are computed. No attention-probability dropout."""

    def __init__(self, dim, num_heads, p=0.5, *, causal=False, align=None, seed=0, layer=None,
                 rng=None, dtype=np.float32):
        MultiHeadAttention.__init__(self, dim, num_heads, causal=causal, rng=rng, dtype=dtype)
        self._init_slice(p, align, seed, layer, self.num_heads)

    def forward(self, x):
        if not self.is_training:
            return MultiHeadAttention.forward(self, x)
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"SliceOutMultiHeadAttention expects (batch, time, {self.dim}), "
                             f"got {x.shape}")
        return ag.sliceout_attention(x, self.qkv.weight, self.qkv.bias, self.proj.weight,
                                     self.proj.bias, mask=self._draw(self.num_heads),
                                     num_heads=self.num_heads, causal=self.causal)

    def extra_repr(self):
        return f"{MultiHeadAttention.extra_repr(self)}, {self._slice_repr()}"


_ELEMENTWISE = (ReLU, GELU, Tanh)


class SliceOutChain(Sequential):
    """A Sequential MLP -- modules before its first Linear (``Flatten``), then Linear layers
    (plain, or ``SliceOutLinear(mode='input')``) with element-wise activations between them --
    whose training forward keeps the activations *compact*: the units a ``SliceOutLinear``
    drops from its input are never computed by the layer before it. That layer gets the mask
    (drawn by the ``SliceOutLinear`` itself, at its own (seed, layer, step), so the masks are
    those of the plain Sequential) and computes only the kept units
    (``ag.sliceout_linear_compact``), the activation runs on them, and the next layer reads
    them as they are: the hidden GEMMs run on ``W[S_i, S_(i+1)]``, a quarter of the FLOPs at
    p = 0.5, and no activation is scattered or gathered between layers. The same function as
    the plain Sequential (eval mode runs exactly that); same parameters and state_dict keys.
    """

    def __init__(self, *layers):
        super().__init__(*layers)
        mods = list(self)
        first = next((i for i, m in enumerate(mods) if isinstance(m, Linear)), None)
        if first is None:
            raise ValueError("SliceOutChain: no Linear layer")
        if isinstance(mods[first], SliceOutLinear):
            raise ValueError(f"SliceOutChain: the first Linear (layer {first}) is a "
                             "SliceOutLinear; nothing before it could compute only its kept "
                             "input units (use a Sequential, or a plain first Linear)")
        for i, m in enumerate(mods[first:], first):
            if isinstance(m, SliceOutLinear) and m.mode != "input":
                raise ValueError(f"SliceOutChain: layer {i} is a SliceOutLinear in mode "
                                 f"{m.mode!r}; the chain drops input units (mode='input')")
            if type(m) not in (Linear, SliceOutLinear) and not isinstance(m, _ELEMENTWISE):
                raise TypeError(f"SliceOutChain: layer {i} is a {type(m).__name__}; after the "
                                "first Linear only Linear, SliceOutLinear(mode='input') and "
                                "element-wise activations (ReLU, GELU, Tanh) can run on "
                                "compact activations")
        self._first = first

    def forward(self, x):
        if not self.is_training:
            return Sequential.forward(self, x)
        mods = list(self)
        for m in mods[:self._first]:
            x = m(x)
        linears = [m for m in mods if isinstance(m, Linear)]
        in_mask = None
        for m in mods[self._first:]:
            if not isinstance(m, Linear):
                x = m(x)
                continue
            j = linears.index(m) + 1
            nxt = linears[j] if j < len(linears) else None
            out_mask = (nxt._draw(nxt.in_features, x) if isinstance(nxt, SliceOutLinear)
                        else None)
            x = ag.sliceout_linear_compact(x, m.weight, m.bias, in_mask=in_mask,
                                           out_mask=out_mask)
            in_mask = out_mask
        return x
