"""RMSprop, PyTorch semantics (not centered)."""
from __future__ import annotations

from .. import graph
from .optimizer import Optimizer, check_number

__all__ = ["RMSprop"]


class RMSprop(Optimizer):
    """``g = grad + weight_decay * p``, ``s = alpha s + (1 - alpha) g^2``,
    ``d = g / (sqrt(s) + eps)``; with momentum ``b = momentum b + d`` (from zero) and
    ``p -= lr b``, else ``p -= lr d``."""

    _hyper = ("alpha", "eps", "momentum", "weight_decay")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0):
        super().__init__(params, lr)
        self.alpha, self.eps, self.momentum, self.weight_decay = alpha, eps, momentum, weight_decay
        self._validate()

    def _validate(self):
        self.alpha = check_number("alpha", self.alpha, 0.0, 1.0, high_open=True)
        self.eps = check_number("eps", self.eps, low=0.0)
        self.momentum = check_number("momentum", self.momentum, 0.0, 1.0, high_open=True)
        self.weight_decay = check_number("weight_decay", self.weight_decay, low=0.0)

    def _update(self, w, g, state, xp):
        if self.weight_decay:
            g = g + self.weight_decay * w
        sq = state.get("square_avg")
        if sq is None:
            sq = state["square_avg"] = xp.zeros_like(w)
        sq *= self.alpha
        sq += (1.0 - self.alpha) * (g * g)
        d = xp.sqrt(sq)
        d += self.eps
        d = g / d
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = xp.zeros_like(w)
            buf *= self.momentum
            buf += d
            d = buf
        w -= graph.scalar(self.lr, lambda: self.lr, w.dtype) * d  # a device value in a captured step
