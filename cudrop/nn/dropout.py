"""Element dropout and the identity; the structured variants live beside it and are chosen by
name in ``variants.py``."""
from __future__ import annotations

from .. import autograd as ag
from ..philox import check_prob
from .module import Module
from .stochastic import StochasticLayer


class Dropout(StochasticLayer):
    """Inverted element-wise dropout (Srivastava et al. 2014) with drop probability ``p``; the
    identity in eval mode. The mask of each training forward is a pure function of
    (seed, layer, step), drawn and applied in one fused pass; nothing is skipped."""

    def __init__(self, p=0.5, seed=0, layer=None):
        super().__init__()
        self.init_rng(seed, layer)
        self.p = check_prob(p)

    def forward(self, x):
        if not self.is_training or self.p == 0:
            return x
        return ag.dropout(x, self.p, seed=self.seed, layer=self.layer,
                          step=self.next_step(device=True), offset=self.element_offset(x.size))

    def element_offset(self, n):
        """Flat index of this rank's first element in the global batch (0 on one process).
        Four elements share a Philox counter: when ``n`` is not a multiple of 4 the ranks take
        ``ceil(n / 4) * 4`` each, still disjoint (independent masks) but no longer the global
        batch's mask."""
        return self.shard.rank * (-(-int(n) // 4) * 4)

    def extra_repr(self):
        return f"p={self.p}, " + super().extra_repr()


class Identity(Module):
    """Returns its input."""

    def forward(self, x):
        return x
