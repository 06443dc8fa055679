"""Stochastic gradient descent with optional (Nesterov) momentum, PyTorch semantics."""
from __future__ import annotations

from .. import backend, graph
import numpy as np

from .optimizer import Optimizer, TableEntry, check_number, launch_fused, step_scalar

__all__ = ["SGD"]


class SGD(Optimizer):
    """``g = grad + weight_decay * p``; with momentum ``b = momentum * b + g`` (``b = g`` on
    the first step) and ``g = b``, or ``g = g + momentum * b`` with ``nesterov=True``;
    then ``p -= lr * g``."""

    _hyper = ("momentum", "nesterov", "weight_decay")
    _gates_in_kernel = True

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, lr)
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        self._validate()

    def _validate(self):
        self.momentum = check_number("momentum", self.momentum, 0.0, 1.0, high_open=True)
        self.weight_decay = check_number("weight_decay", self.weight_decay, low=0.0)
        self.nesterov = bool(self.nesterov)
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")

    def _update(self, w, g, state, xp):
        if self.weight_decay:
            g = g + self.weight_decay * w
        mu = self.momentum
        if mu:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= mu
                buf += g
            g = g + mu * buf if self.nesterov else buf
        w -= graph.scalar(self.lr, lambda: self.lr, w.dtype) * g  # a device value in a captured step

    def _fused_many(self, batch, guard):
        """The run's updates as ``sgd_step`` launches of up to 48 parameters each."""
        entries = [TableEntry(f.p, f.master, f.grad, *self._buffer(f.p, f.master, f.state),
                              gate=f.gate) for f in batch]
        w = batch[0].master if batch[0].master is not None else batch[0].p
        lr = step_scalar(graph.scalar(self.lr, lambda: self.lr, w.dtype))
        launch_fused("sgd_step", entries,
                     lr + (np.float64(self.momentum), np.float64(self.weight_decay),
                           np.int32(self.nesterov)), guard, vector=True)

    def _buffer(self, p, master, state):
        """``(momentum buffer or None, None, whether it is new)`` (a :class:`TableEntry`'s
        state): a new buffer is zeros, so a skipped first step leaves a valid one."""
        if not self.momentum:
            return None, None, False
        buf = state.get("momentum_buffer")
        if buf is not None:
            return buf, None, False
        buf = state["momentum_buffer"] = backend.cupy.zeros(p.shape, (p if master is None
                                                                      else master).dtype)
        return buf, None, True
