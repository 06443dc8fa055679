"""Plain inverted dropout on raw arrays (the dense baseline the structured variants beat)."""
from __future__ import annotations

import numbers

from .. import backend


def check_p(p):
    """Raise ValueError unless ``p`` is a drop probability in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ValueError(f"dropout probability p must be a number in [0, 1), got {p!r}")
    return float(p)


def dropout(x, p, rng=None):
    """Inverted dropout: keep each element with probability ``1 - p`` and scale kept ones by
    ``1 / (1 - p)`` so the expectation is unchanged.

    ``rng`` is a NumPy/CuPy ``Generator`` (or RandomState); None uses ``xp.random``. ``p == 0``
    returns ``x`` itself. Returns ``(y, saved)`` for :func:`dropout_backward`; ``saved`` holds
    the boolean keep mask.
    """
    xp = backend.get_array_module(x)
    p = check_p(p)
    if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
        raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
    if p == 0:
        return x, {"mask": None, "scale": 1.0}
    u = (xp.random if rng is None else rng).random(x.shape)
    mask = xp.asarray(u) >= p
    scale = 1.0 / (1.0 - p)
    y = x * mask
    y *= scale
    return y, {"mask": mask, "scale": scale}


def dropout_backward(grad_out, saved):
    """Gradient ``grad_out * mask / (1 - p)``."""
    if saved["mask"] is None:
        return grad_out
    g = grad_out * saved["mask"]
    g *= saved["scale"]
    return g
