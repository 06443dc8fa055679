"""Adam (L2 penalty added to the gradient) and AdamW (decoupled weight decay)."""
from __future__ import annotations

from .optimizer import Optimizer, check_number

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

    def _update(self, w, g, state, xp):
        b1, b2 = self.betas
        t = state["step"]
        if self.weight_decay:
            if self._decoupled:
                w *= 1.0 - self.lr * self.weight_decay
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
        bc1 = 1.0 - b1 ** t
        bc2_sqrt = (1.0 - b2 ** t) ** 0.5
        denom = xp.sqrt(v)
        denom /= bc2_sqrt
        denom += self.eps
        w -= (self.lr / bc1) * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay: ``p -= lr * weight_decay * p`` before the Adam step
    (the gradient is left alone)."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr, betas, eps, weight_decay)
