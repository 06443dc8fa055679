"""Base class for layers whose randomness is a pure function of (seed, layer id, step)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import graph
from ..philox import check_seed, check_step
from .module import Module


class Shard(NamedTuple):
    """Which part of each global batch this process holds in data-parallel training: part
    ``rank`` of ``world_size`` equal parts, in rank order (``cudrop.distributed``)."""
    rank: int = 0
    world_size: int = 1


class StochasticLayer(Module):
    """A layer that draws masks. It holds ``seed``, a ``layer`` (so masks differ between
    layers) and a ``step`` counter that each training-mode forward advances (so masks differ
    between steps); all three are saved by ``state_dict``, so a resumed run draws the same masks.

    Only layers draw masks and decide train versus eval; the ops they call apply what they are
    given. A subclass calls ``init_rng(seed, layer)`` in its ``__init__`` after its base's
    ``__init__`` (explicitly: a stochastic Linear is ``Linear`` + ``init_rng``).

    Layer ids. ``layer=None`` (the default) means "my position": the layer is numbered
    0, 1, 2, ... in module order among the automatically numbered stochastic layers of the
    outermost module it is attached to, renumbered each time a module is attached. Two models
    built alike draw the same masks, whatever else the process built. An explicit ``layer``
    is kept as given.

    Data parallelism. ``shard`` (set by :func:`set_shard`; not saved, a checkpoint resumes on
    any number of ranks) says which rows of the global batch this process holds. Structural
    draws (a slice, a gate, a sub-network set) ignore it: every rank makes the same decision.
    Per-row draws (element and block masks, gyro row groups, per-sample gates) address the
    rows by their index in the global batch, so the ranks' masks together are the mask one
    process would draw for the global batch.
    """

    shard = Shard()

    def global_rows(self, local_rows: int):
        """``(offset, total)``: where this rank's ``local_rows`` start in the global batch and
        how many rows the global batch has (every rank holds as many)."""
        rank, world = self.shard
        return rank * int(local_rows), world * int(local_rows)

    def init_rng(self, seed: int = 0, layer: int | None = None) -> None:
        self.register_counter("seed", check_seed("seed", seed))
        self.register_counter("layer", 0 if layer is None else
                              check_seed("layer", layer))
        self.register_counter("step", 0)
        object.__setattr__(self, "_auto_layer", layer is None)

    def next_step(self, device: bool = False):
        """The step to draw this forward's mask with; advances the counter.

        ``device=True``: the layer's mask kernels read the step from device memory, so inside a
        CUDA-graph capture (``cudrop.graph``) the step is a device scalar that each replay
        refreshes; eagerly it is the int either way. Layers that decide their mask on the host
        (``device=False``) cannot be captured and say so."""
        s = self.step
        if not device:
            graph.refuse_capture(f"{type(self).__name__}(layer {self.layer})")
        object.__setattr__(self, "step", s + 1)
        return graph.scalar(s, lambda: self.step, np.uint32) if device else s

    def extra_repr(self):
        return f"seed={self.seed}, layer={self.layer}, step={self.step}"


def set_step(model: Module, step: int) -> None:
    """Set the step counter of every stochastic layer in ``model`` (resume at ``step``)."""
    step = check_step(step)
    for m in model.modules():
        if isinstance(m, StochasticLayer):
            object.__setattr__(m, "step", step)


def set_shard(model: Module, rank: int, world_size: int) -> Module:
    """Tell every stochastic layer of ``model`` that this process holds part ``rank`` of
    ``world_size`` equal parts of each global batch (data-parallel training; see
    :class:`StochasticLayer`). ``set_shard(model, 0, 1)`` is the single-process default."""
    for name, v, low in (("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if rank >= world_size:
        raise ValueError(f"rank {rank} is not below world_size {world_size}")
    shard = Shard(int(rank), int(world_size))
    for m in model.modules():
        if isinstance(m, StochasticLayer):
            object.__setattr__(m, "shard", shard)
    return model


def number_layers(model: Module, seed: int | None = None) -> Module:
    """Give every stochastic layer of ``model`` (explicit ids too) the ids 0, 1, 2, ... in
    module order, and ``seed`` when given."""
    for i, m in enumerate(m for m in model.modules() if isinstance(m, StochasticLayer)):
        object.__setattr__(m, "layer", i)
        if seed is not None:
            object.__setattr__(m, "seed", check_seed("seed", seed))
    return model
