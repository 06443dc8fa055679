"""Random-direction gradient check (after HIPS autograd's ``check_grads``).

One directional derivative per call instead of one finite difference per element: cheap enough
to run on every op over hypothesis-drawn shapes, and any wrong gradient component shows up in a
random direction with probability 1.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from .mode import no_grad
from .tensor import Tensor


def check_grad(fn, *inputs, eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-8,
               seed: int = 0, wrt=None) -> tuple[float, float]:
    """Compare autograd with central differences along a random direction.

    ``fn`` maps Tensors to a Tensor. ``inputs`` are float64 arrays or Tensors; ``wrt`` lists the
    indices of the inputs to differentiate (default: every floating input). Raises
    AssertionError when ``<grad, v>`` and ``(f(x + eps v) - f(x - eps v)) / 2 eps`` (with the
    output contracted against a random cotangent) disagree; returns the two numbers.
    """
    raw = [x.data if isinstance(x, Tensor) else backend.as_array(x) for x in inputs]
    xp = backend.get_array_module(*raw)
    rng = np.random.default_rng(seed)
    if wrt is None:
        wrt = [i for i, a in enumerate(raw) if a.dtype.kind == "f"]
    for i in wrt:
        if raw[i].dtype != np.float64:
            raise TypeError(f"check_grad needs float64 inputs; input {i} is {raw[i].dtype}")
    dirs = {i: xp.asarray(rng.standard_normal(raw[i].shape)) for i in wrt}

    ts = [Tensor(a, requires_grad=(i in wrt)) for i, a in enumerate(raw)]
    out = fn(*ts)
    cot = xp.asarray(rng.standard_normal(out.shape))
    out.backward(cot)
    analytic = 0.0
    for i in wrt:
        g = ts[i].grad
        analytic += float((g * dirs[i]).sum()) if g is not None else 0.0

    def f_at(sign):
        with no_grad():
            moved = [Tensor(a + sign * eps * dirs[i]) if i in dirs else Tensor(a)
                     for i, a in enumerate(raw)]
            return float((fn(*moved).data * cot).sum())

    numeric = (f_at(+1) - f_at(-1)) / (2 * eps)
    if not np.isclose(analytic, numeric, rtol=rtol, atol=atol):
        raise AssertionError(f"gradient check failed: autograd gives {analytic!r}, central "
                             f"differences give {numeric!r}")
    return analytic, numeric
