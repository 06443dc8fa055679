"""Depth dropout (Guo & Gould) and stochastic depth (Huang et al. 2016): residual units whose
body ``f`` is skipped -- not called, no node in the backward graph -- when the unit is dropped.

Both compute ``o = act(a * s * f(x) + t(x))`` where ``a`` is the keep gate and ``s`` a scale:

=====================  ==============================  ====================================
                       ``DepthDropout``                ``StochasticDepth``
=====================  ==============================  ====================================
shortcut ``t``         trainable (1x1 conv + BN + ReLU  identity, or the projection of the
                       for conv nets, Linear for MLPs)  basic block when the shape changes
training               ``s = 1`` (paper, §III-D)        ``s = 1/q`` (inverted)
test                   ``a = 1, s = 1``                 ``a = 1, s = 1``
=====================  ==============================  ====================================

Scaling. Depth dropout never rescales: the paper lets the trainable shortcut absorb the missing
branch. Huang et al. train stochastic depth unscaled and multiply ``f`` by its survival
probability ``q`` at *test* time; cudrop uses the inverted form instead (``f / q`` while
training, nothing at test), the same convention as every other cudrop dropout and the one the
per-sample mode needs (it scatter-adds kept samples with ``1/q``). Both give the same expected
training output and the same test-time network up to a reparameterisation of ``f``'s output
scale (``f_inverted = q * f_huang``), so a model trained one way is the other's with its last
layer in ``f`` rescaled.

Randomness. Every draw is host-side Philox keyed by ``(seed, layer)`` at the unit's step
counter (one ``next_step()`` per training forward, none in eval): no GPU synchronisation, and a
decision is a pure function of ``(seed, layer, step)``, so a run resumed from a state_dict
(which saves the counters) makes the same decisions. The same property lets a captured CUDA
graph skip a dropped body (batch mode): the host decides each replay's gates and launches or
skips the bodies' pieces of the graph (``cudrop.graph.gate``); per-sample mode stays eager.

Modes. ``mode='batch'`` (the papers): one gate per unit per step, shared by the batch,
``a = uniform(seed, layer, step, TAG_DEPTH, 1)[0] >= p``. ``mode='sample'``: one gate per
sample, ``uniform(seed, layer, step, TAG_SAMPLE, n) >= p``; the kept rows are gathered, ``f``
runs on them only (work in proportion to the kept fraction) and its output is scatter-added onto
the shortcut with ``s``. A BatchNorm inside ``f`` then normalises over (and updates its running
statistics from) the kept samples only, so it needs more than one value per channel among
them (one kept sample is enough for conv maps larger than 1x1). If no sample is kept, ``f`` is
not called at all.

Data parallelism (``cudrop.distributed``): the batch-mode gate is the same on every rank
(``(seed, layer, step)`` only); per-sample gates are addressed by the sample's index in the
global batch, so the ranks' gates together are one process's gates for the global batch. A rank
that keeps none of its samples while another rank keeps some runs ``f`` on one sample scaled by
0, so that every rank's optimizer updates the same parameters.
"""
from __future__ import annotations


import numpy as np

from .. import backend, graph, philox
from ..autograd.ops import gate_in, gate_out, gather_rows, scatter_add_rows
from ..autograd.tensor import Tensor
from .layers import Conv2d, Linear, ReLU
from .module import Module
from .residual import ConvBatchNorm, ResidualUnit, bn_relu
from .stochastic import StochasticLayer

MODES = ("batch", "sample")


def check_mode(name, mode):
    if mode not in MODES:
        raise ValueError(f"{name} must be one of {MODES}, got {mode!r}")
    return mode


class _GatedUnit(ResidualUnit, StochasticLayer):
    """A ResidualUnit (same ``body`` / ``shortcut`` / ``activation``) that is also a
    StochasticLayer (``seed`` / ``layer`` / ``step``). Subclasses fix the scale."""

    inverted = False

    def __init__(self, body, shortcut=None, p=0.5, activation=None, *, mode="batch", seed=0,
                 layer=None):
        if not isinstance(body, Module):
            raise TypeError(f"body must be a Module, got {type(body).__name__}")
        ResidualUnit.__init__(self, body, shortcut, activation)
        self.init_rng(seed, layer)
        self.p = philox.check_prob(p)
        self.mode = check_mode("mode", mode)

    @classmethod
    def from_unit(cls, unit, p, *, shortcut=None, mode="batch", seed=0, layer=None):
        """Wrap an existing ResidualUnit's body and activation (and its shortcut unless
        ``shortcut`` is given); keeps its ``downsamples`` flag."""
        new = cls(unit.body, unit.shortcut if shortcut is None else shortcut, p,
                  unit.activation, mode=mode, seed=seed, layer=layer)
        if hasattr(unit, "downsamples"):
            new.downsamples = unit.downsamples
        return new

    @property
    def scale(self) -> float:
        """What the body's output is multiplied by in training when kept."""
        return 1.0 / (1.0 - self.p) if self.inverted else 1.0

    def keep_gate(self, step: int) -> bool:
        """Batch mode: is the body run at ``step``?"""
        return bool(philox.uniform(self.seed, self.layer, step, philox.TAG_DEPTH, 1)[0]
                    >= self.p)

    def keep_samples(self, step: int, n: int) -> np.ndarray:
        """Sample mode: boolean keep bit per sample at ``step`` (host NumPy) for the first
        ``n`` samples of the (global) batch (a rank's samples are its slice of them)."""
        return philox.uniform(self.seed, self.layer, step, philox.TAG_SAMPLE, n) >= self.p

    def forward(self, x):
        if not self.is_training:
            return self.merge(self.body(x), self.shortcut(x))
        if self.mode == "batch" and graph.is_capturing():
            return self._gated(x)
        step = self.next_step()
        t = self.shortcut(x)
        if self.mode == "batch":
            kept = self.keep_gate(step)
            return self.merge(self._scaled(self.body(x)), t) if kept else self.activation(t)
        offset, total = self.global_rows(x.shape[0])
        everyone = self.keep_samples(step, total)  # the global batch's gates, drawn once
        keep = everyone[offset:offset + x.shape[0]]
        if keep.all():  # no gather/scatter copies when every sample survives
            return self.merge(self._scaled(self.body(x)), t)
        scale = self.scale
        if not keep.any():
            if not everyone.any():
                return self.activation(t)
            # Another rank keeps samples of this unit: its body's parameters get gradients
            # there, so they must get (zero) gradients here too, or the ranks' optimizers
            # would update different sets of parameters. Run the body on one row, scaled by 0.
            keep[0], scale = True, 0.0
        xp = backend.get_array_module(x.data if isinstance(x, Tensor) else x)
        idx = xp.asarray(np.flatnonzero(keep))  # built on the host, strictly increasing by construction; one small upload
        fk = self.body(gather_rows(x, idx))
        return self.activation(scatter_add_rows(t, fk, idx, scale))

    def _gated(self, x):
        """The unit in a CUDA-graph capture (batch mode): recorded as kept, its body a gated
        part that each replay runs or skips as ``keep_gate`` says at the replay's step (see
        ``cudrop.graph``)."""
        self.next_step(device=True)  # advances the counter; the gate reads it on the host
        gate = graph.gate(lambda: self.keep_gate(self.step),
                          f"{type(self).__name__}(layer {self.layer})")
        t = self.shortcut(x)
        # in x's dtype once (the slot is float32 for 16-bit x and holds its value exactly), so
        # the ends' three uses of it launch no cast each
        scale = gate.scalar(self.scale, x.dtype).astype(x.dtype, copy=False)
        xb = gate_in(x, scale=scale)
        with gate:
            f = self.body(xb)
        if type(self.activation) is ReLU:  # the end and its ReLU in one op, as merge does
            return gate_out(t, f, scale=scale, act="relu")
        return self.activation(gate_out(t, f, scale=scale))

    def _scaled(self, y):
        s = self.scale
        return y if s == 1.0 else y * s

    def extra_repr(self):
        return f"p={self.p}, mode={self.mode!r}, " + StochasticLayer.extra_repr(self)


class DepthDropout(_GatedUnit):
    """Depth dropout unit (Guo & Gould): ``o = act(a f(x) + t(x))``, ``a ~ Bernoulli(1 - p)``
    once per unit per step for the whole batch; ``f`` is skipped when ``a = 0``. No rescaling at
    training or test (test: ``a = 1``). ``shortcut`` is the trainable ``t`` (see
    :func:`conv_shortcut`, :func:`linear_shortcut`; None means identity)."""

    inverted = False


class StochasticDepth(_GatedUnit):
    """Stochastic depth unit (Huang et al. 2016) with inverted scaling:
    ``o = act(a f(x) / q + t(x))`` in training, ``act(f(x) + t(x))`` at test, ``q = 1 - p``.
    ``shortcut`` None is the identity. See :func:`stochastic_depth_probs` for the linear decay
    of ``p`` over depth."""

    inverted = True


def conv_shortcut(in_channels, out_channels, stride=1, rng=None, dtype=np.float32):
    """Depth dropout's trainable shortcut for conv nets: 1x1 conv (``stride``) + BN + ReLU, the
    ReLU fused into the BN (:func:`~cudrop.nn.residual.bn_relu`), all three one op
    (:class:`~cudrop.nn.residual.ConvBatchNorm`)."""
    return ConvBatchNorm(Conv2d(in_channels, out_channels, 1, stride, 0, bias=False, rng=rng,
                                dtype=dtype),
                         *bn_relu(out_channels, dtype))


def linear_shortcut(in_features, out_features, rng=None, dtype=np.float32):
    """Depth dropout's trainable shortcut for MLPs: a Linear layer."""
    return Linear(in_features, out_features, rng=rng, dtype=dtype)


def stochastic_depth_probs(num_units: int, p_last: float) -> list[float]:
    """Drop probability of units ``l = 1..L``: ``l / L * p_last`` (Huang et al.'s linear decay
    of the survival probability ``1 - l / L * p_last``; the last unit drops with ``p_last``)."""
    p_last = philox.check_prob(p_last, "stochastic_depth")
    if not isinstance(num_units, (int, np.integer)) or num_units < 1:
        raise ValueError(f"num_units must be a positive int, got {num_units!r}")
    return [l / num_units * p_last for l in range(1, num_units + 1)]
