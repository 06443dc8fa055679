"""Multi-layer perceptron."""
from __future__ import annotations

import numpy as np

from .. import nn
from ..nn.init import rng_of


def mlp(in_features, num_classes, hidden=(256, 256), dropout="dropout", p=0.0, seed=0,
        dtype=np.float32):
    """Flatten -> Linear -> ReLU -> [dropped Linear -> ReLU] * (len(hidden) - 1) -> dropped
    Linear: every hidden layer's units are dropped by ``dropout`` at rate ``p`` on their way into
    the next Linear (``nn.dropped_linear``), where SliceOut and SparseDrop skip the work."""
    rng = rng_of(seed)
    width = int(np.prod(in_features))
    layers = [nn.Flatten()]
    for i, h in enumerate(hidden):
        kind = "none" if i == 0 else dropout  # the input pixels are not dropped
        layers += [nn.dropped_linear(kind, width, h, p, rng=rng, dtype=dtype), nn.ReLU()]
        width = h
    layers.append(nn.dropped_linear(dropout if hidden else "none", width, num_classes, p,
                                    rng=rng, dtype=dtype))
    # SliceOut's hidden activations stay compact between layers (nn.SliceOutChain): the same
    # masks and function, a quarter of the hidden GEMMs' FLOPs at p = 0.5
    chain = nn.SliceOutChain if dropout == "sliceout" and p > 0 else nn.Sequential
    return nn.number_layers(chain(*layers), seed)
