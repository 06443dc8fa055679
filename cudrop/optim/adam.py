"""Adam (L2 penalty added to the gradient) and AdamW (decoupled weight decay)."""
from __future__ import annotations

import numpy as np

from .. import backend, graph
from .optimizer import Optimizer, TableEntry, check_number, launch_fused, step_scalar

__all__ = ["Adam", "AdamW"]


class Adam(Optimizer):
    """Bias-corrected Adam, PyTorch semantics: ``g = grad + weight_decay * p``,
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``."""

    _hyper = ("betas", "eps", "weight_decay")
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self._validate()

    def _validate(self):
        try:
            b1, b2 = self.betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}") from None
        self.betas = (check_number("betas[0]", b1, 0.0, 1.0, high_open=True),
                      check_number("betas[1]", b2, 0.0, 1.0, high_open=True))
        self.eps = check_number("eps", self.eps, low=0.0)
        self.weight_decay = check_number("weight_decay", self.weight_decay, low=0.0)

    def _scalars(self, t):
        """The step's scalars at Adam step ``t``: lr / (1 - b1^t), sqrt(1 - b2^t) and the
        decoupled decay factor 1 - lr wd."""
        b1, b2 = self.betas
        return (self.lr / (1.0 - b1 ** t), (1.0 - b2 ** t) ** 0.5,
                1.0 - self.lr * self.weight_decay)

    def _update(self, w, g, state, xp):
        b1, b2 = self.betas
        # Per-step numbers are graph scalars: device values that a captured step's replays
        # refresh (from the next step t + 1), plain floats eagerly.
        values = self._scalars(state["step"])
        step_size, bc2_sqrt, decay = (
            graph.scalar(v, lambda i=i: self._scalars(state.get("step", 0) + 1)[i], w.dtype)
            for i, v in enumerate(values))
        if self.weight_decay:
            if self._decoupled:
                w *= decay
            else:
                g = g + self.weight_decay * w
        m = state.get("exp_avg")
        if m is None:
            m = state["exp_avg"] = xp.zeros_like(w)
            v = state["exp_avg_sq"] = xp.zeros_like(w)
        else:
            v = state["exp_avg_sq"]
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        denom = xp.sqrt(v)
        denom /= bc2_sqrt
        denom += self.eps
        w -= step_size * (m / denom)


    def _step_args(self, state, dtype):
        """The kernels' arguments after the parameter's arrays: the per-step scalars (device
        values a captured step's replays refresh, from the parameter's next step t + 1) and the
        hyperparameters."""
        b1, b2 = self.betas
        scalars = ()
        for i, v in enumerate(self._scalars(state["step"])):
            scalars += step_scalar(graph.scalar(
                v, lambda i=i: self._scalars(state.get("step", 0) + 1)[i], dtype))
        return scalars + tuple(np.float64(x) for x in (b1, b2, 1.0 - b1, 1.0 - b2, self.eps,
                                                       self.weight_decay)) \
            + (np.int32(self._decoupled),)

    def _moments(self, p, master, state):
        m = state.get("exp_avg")
        if m is None:
            dtype = (p if master is None else master).dtype
            m = state["exp_avg"] = backend.cupy.zeros(p.shape, dtype)
            state["exp_avg_sq"] = backend.cupy.zeros(p.shape, dtype)
        return m, state["exp_avg_sq"]

    def _fused_many(self, batch, guard):
        """The run's updates as ``adam_step`` launches, one per Adam step count (the bias
        corrections depend on it; a parameter without a gradient at some step lags)."""
        runs = {}
        for f in batch:
            runs.setdefault(f.state["step"], []).append(f)
        for run in runs.values():
            w = run[0].master if run[0].master is not None else run[0].p
            entries = [TableEntry(f.p, f.master, f.grad, *self._moments(f.p, f.master, f.state))
                       for f in run]
            launch_fused("adam_step", entries, self._step_args(run[0].state, w.dtype),
                         guard)


class AdamW(Adam):
    """Adam with decoupled weight decay: ``p -= lr * weight_decay * p`` before the Adam step
    (the gradient is left alone)."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr, betas, eps, weight_decay)
