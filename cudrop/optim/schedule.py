"""Learning-rate schedules: pure functions of a step counter that write ``optimizer.lr``.

Call ``step()`` once per optimizer step (or once per epoch: the unit is yours). On creation a
schedule records the optimizer's current ``lr`` as ``base_lr`` and sets ``lr`` for step 0.
"""
from __future__ import annotations

import math

from .optimizer import Optimizer, check_number

__all__ = ["LRSchedule", "StepLR", "CosineLR", "LinearWarmup"]


class LRSchedule:
    """Base class: a subclass defines ``lr_at(t)``. On creation it records the optimizer's
    ``lr`` as ``base_lr`` and writes ``lr_at(0)``; each ``step()`` advances ``last_step`` and
    writes ``lr_at(last_step)`` to ``optimizer.lr``. ``state_dict`` holds base_lr and
    last_step."""

    def __init__(self, optimizer: Optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a cudrop.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.last_step = 0
        optimizer.lr = self.lr_at(0)

    def lr_at(self, t: int) -> float:  # pragma: no cover - abstract
        """The learning rate after ``t`` calls of ``step()``."""
        raise NotImplementedError

    def get_lr(self) -> float:
        return self.lr_at(self.last_step)

    @property
    def lr(self) -> float:
        return self.get_lr()

    def step(self):
        self.last_step += 1
        self.optimizer.lr = self.get_lr()

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "last_step": self.last_step}

    def load_state_dict(self, sd: dict):
        self.base_lr = check_number("base_lr", sd["base_lr"], low=0.0)
        self.last_step = int(sd["last_step"])
        self.optimizer.lr = self.get_lr()

    def __repr__(self):
        return f"{type(self).__name__}(step={self.last_step}, lr={self.get_lr():.6g})"


def _positive_int(name, v):
    if isinstance(v, bool) or int(v) != v or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


class StepLR(LRSchedule):
    """``lr = base_lr * gamma ** (t // step_size)``."""

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1):
        self.step_size = _positive_int("step_size", step_size)
        self.gamma = check_number("gamma", gamma, low=0.0)
        super().__init__(optimizer)

    def lr_at(self, t):
        return self.base_lr * self.gamma ** (t // self.step_size)


class CosineLR(LRSchedule):
    """``lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * t / total_steps)) / 2`` for
    ``t <= total_steps``, then ``min_lr``."""

    def __init__(self, optimizer, total_steps: int, min_lr: float = 0.0):
        self.total_steps = _positive_int("total_steps", total_steps)
        self.min_lr = check_number("min_lr", min_lr, low=0.0)
        super().__init__(optimizer)

    def lr_at(self, t):
        frac = min(t, self.total_steps) / self.total_steps
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


class LinearWarmup(LRSchedule):
    """``lr = base_lr * (t + 1) / warmup_steps`` for ``t < warmup_steps`` (so the first step
    already moves), then ``after``'s schedule counted from 0, or ``base_lr`` without one.

    ``after`` must be built on the same optimizer, before this schedule::

        sched = LinearWarmup(opt, 100, after=CosineLR(opt, total_steps=900))
    """

    def __init__(self, optimizer, warmup_steps: int, after: LRSchedule | None = None):
        self.warmup_steps = _positive_int("warmup_steps", warmup_steps)
        if after is not None:
            if not isinstance(after, LRSchedule):
                raise TypeError(f"after must be an LRSchedule or None, got {type(after).__name__}")
            if after.optimizer is not optimizer:
                raise ValueError("after must schedule the same optimizer as the warmup")
        self.after = after
        super().__init__(optimizer)
        if after is not None:
            self.base_lr = after.base_lr  # after already overwrote optimizer.lr with its lr(0)
            optimizer.lr = self.lr_at(0)

    def lr_at(self, t):
        if t < self.warmup_steps:
            top = self.after.lr_at(0) if self.after is not None else self.base_lr
            return top * (t + 1) / self.warmup_steps
        if self.after is not None:
            return self.after.lr_at(t - self.warmup_steps)
        return self.base_lr

    def step(self):
        super().step()
        if self.after is not None:
            self.after.last_step = max(0, self.last_step - self.warmup_steps)

    def state_dict(self):
        sd = super().state_dict()
        if self.after is not None:
            sd["after"] = self.after.state_dict()
        return sd

    def load_state_dict(self, sd):
        if self.after is not None and "after" in sd:
            self.after.load_state_dict(sd["after"])
        super().load_state_dict(sd)
