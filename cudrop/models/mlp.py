"""Multi-layer perceptron."""
from __future__ import annotations

import numpy as np

from .. import nn
from ..nn.init import rng_of


def mlp(in_features, num_classes, hidden=(256, 256), dropout="dropout", p=0.0, seed=0,
        dtype=np.float32):
    """Flatten -> [Linear -> ReLU -> dropout] * len(hidden) -> Linear."""
    rng = rng_of(seed)
    layers, width = [nn.Flatten()], int(np.prod(in_features))
    for h in hidden:
        layers += [nn.Linear(width, h, rng=rng, dtype=dtype), nn.ReLU(), nn.make_dropout(dropout, p)]
        width = h
    layers.append(nn.Linear(width, num_classes, rng=rng, dtype=dtype))
    return nn.number_layers(nn.Sequential(*layers), seed)
