"""Dynamic loss scaling for float16 training.

float16 gradients underflow (its smallest normal is 6e-5): the loss's gradient is multiplied by
a scale ``s`` before backward, so small gradients stay representable, and divided by ``s``
before the update. A step whose gradients overflowed (an inf or NaN anywhere) is skipped --
parameters and optimizer moments untouched -- and ``s`` is halved; after ``growth_interval``
good steps in a row ``s`` doubles. This is the scheme of Micikevicius et al. (2018) and of
PyTorch's ``GradScaler``.

Everything lives on the parameters' device: the scale, the good-step count and the overflow
flag are 0-d arrays updated by array ops, and the skip is decided by the optimizer's kernels
reading the flag (``Optimizer.step(skip=...)``), so a step with loss scaling never waits for the
device and can be captured in a CUDA graph. The optimizer's host-side step counters advance on
a skipped step too (``state["step"]``, so Adam's bias correction counts it), a difference from
PyTorch, whose skipped step does not call the optimizer at all.

Usage::

    scaler = LossScaler()
    loss = cross_entropy(model(x), y)
    model.zero_grad()
    scaler.backward(loss)      # backward from s * dloss
    scaler.step(opt)           # check, update with grad / s or skip, adapt s
"""
from __future__ import annotations

import numpy as np

from .. import backend, graph
from .optimizer import Optimizer, check_number

__all__ = ["LossScaler"]

# The scale is applied to the loss's gradient in the loss's dtype: for float16 a scale of 2**16
# would already be inf (float16's largest finite value is 65504).
MAX_SCALE = {"float16": 2.0 ** 15}


class LossScaler:
    """Dynamic loss scale: ``init_scale`` (default 2**15, the largest power of two a float16
    gradient holds), multiplied by ``backoff_factor`` after a step with non-finite gradients and
    by ``growth_factor`` after ``growth_interval`` finite steps in a row."""

    def __init__(self, init_scale=2.0 ** 15, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000):
        self.init_scale = check_number("init_scale", init_scale, low=0.0, low_open=True)
        self.growth_factor = check_number("growth_factor", growth_factor, low=1.0,
                                          low_open=True)
        self.backoff_factor = check_number("backoff_factor", backoff_factor, 0.0, 1.0,
                                           low_open=True, high_open=True)
        if int(growth_interval) != growth_interval or growth_interval < 1:
            raise ValueError(f"growth_interval must be a positive int, got {growth_interval!r}")
        self.growth_interval = int(growth_interval)
        self._scale = self._good = self._found = None  # 0-d arrays on the loss's device
        self._start = (self.init_scale, 0)  # (scale, good steps) the arrays start from

    def _state(self, xp):
        if self._scale is None or backend.get_array_module(self._scale) is not xp:
            self._scale = xp.asarray(self._start[0], np.float32)
            self._good = xp.asarray(self._start[1], np.int64)
            self._found = xp.zeros((), np.uint64)
        return self._scale

    @property
    def scale(self):
        """The current scale, a 0-d float32 array on the device (reading it as a float waits
        for the device)."""
        return self._scale

    def backward(self, loss):
        """``loss.backward()`` seeded with the scale instead of 1, in the loss's dtype."""
        xp = loss.xp
        scale = self._state(xp)
        cap = MAX_SCALE.get(loss.data.dtype.name)
        if cap is not None:
            scale = xp.minimum(scale, np.float32(cap))
        loss.backward(xp.broadcast_to(scale.astype(loss.data.dtype), loss.shape).copy())

    def step(self, optimizer: Optimizer):
        """Record whether any gradient is non-finite, let ``optimizer`` update with the
        gradients divided by the scale (in its state's precision: float16 gradients are unscaled
        in float32, where they do not underflow) -- or skip, on the device, when one was not
        finite -- and adapt the scale. ``.grad`` is left as backward wrote it (scaled)."""
        params = [p for p in optimizer.params if p.grad is not None]
        if not params:
            optimizer.step()
            return
        xp = backend.get_array_module(params[0].grad)
        scale = self._state(xp)
        cap = MAX_SCALE.get(params[0].grad.dtype.name)
        used = scale if cap is None else xp.minimum(scale, np.float32(cap))
        inv = (np.float32(1.0) / used).astype(np.float32)
        found = xp.zeros((), bool)
        for p in params:
            # in a capture, a gated parameter's check is part of its gate (graph.gate): a
            # replay that skips the unit leaves ``found`` as the other checks made it
            graph.switch(graph.gate_of(p))
            found |= ~xp.isfinite(p.grad).all()
        graph.switch(None)
        self._found[...] = found
        optimizer.step(skip=self._found, inv_scale=xp.asarray(inv))
        # The scale's update, as array ops on the device (no host read).
        good = xp.where(found, 0, self._good + 1)
        grow = good >= self.growth_interval
        self._scale[...] = xp.where(found, scale * np.float32(self.backoff_factor),
                                    xp.where(grow, scale * np.float32(self.growth_factor),
                                             scale))
        self._good[...] = xp.where(grow, 0, good)

    def state_dict(self) -> dict:
        """The scale and the good-step count (host values: reading them waits for the device)."""
        if self._scale is None:
            return {"scale": self._start[0], "good_steps": self._start[1]}
        return {"scale": float(self._scale), "good_steps": int(self._good)}

    def load_state_dict(self, sd: dict) -> None:
        """Continue from a :meth:`state_dict` (the arrays are made on the next step's device)."""
        scale = check_number("scale", sd["scale"], low=0.0, low_open=True)
        good = int(sd["good_steps"])
        if good < 0:
            raise ValueError(f"good_steps must be >= 0, got {good}")
        self._start = (scale, good)
        self._scale = self._good = self._found = None
