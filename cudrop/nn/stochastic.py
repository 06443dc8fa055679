"""Base class for layers whose randomness is a pure function of (seed, layer id, step)."""
from __future__ import annotations

import itertools

from ..philox import check_seed, check_step
from .module import Module

_next_layer_id = itertools.count()


class StochasticLayer(Module):
    """Holds ``seed``, a ``layer_id`` (unique per process unless given, so masks differ between
    layers) and a ``step`` counter that each training-mode forward advances (so masks differ
    between steps). All three are saved by ``state_dict``: a resumed run draws the same masks.
    """

    def __init__(self, seed: int = 0, layer_id: int | None = None):
        super().__init__()
        self.register_counter("seed", check_seed("seed", seed))
        self.register_counter("layer_id", check_seed(
            "layer_id", next(_next_layer_id) if layer_id is None else layer_id))
        self.register_counter("step", 0)

    def next_step(self) -> int:
        """The step to draw this forward's mask with; advances the counter."""
        s = self.step
        object.__setattr__(self, "step", s + 1)
        return s

    def extra_repr(self):
        return f"seed={self.seed}, layer_id={self.layer_id}, step={self.step}"


def set_step(model: Module, step: int) -> None:
    """Set the step counter of every stochastic layer in ``model`` (resume at ``step``)."""
    step = check_step(step)
    for m in model.modules():
        if isinstance(m, StochasticLayer):
            object.__setattr__(m, "step", step)


def number_layers(model: Module, seed: int | None = None) -> Module:
    """Give the stochastic layers of ``model`` the ids 0, 1, 2, ... in module order (and
    ``seed`` when given). Model builders call this, so a model rebuilt in a new process draws
    the same masks whatever else that process built first."""
    for i, m in enumerate(m for m in model.modules() if isinstance(m, StochasticLayer)):
        object.__setattr__(m, "layer_id", i)
        if seed is not None:
            object.__setattr__(m, "seed", check_seed("seed", seed))
    return model
