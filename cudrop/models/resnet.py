"""CIFAR-style ResNets (He et al. 2016, §4.2): 6n+2 layers, widths 16/32/64."""
from __future__ import annotations

import numpy as np

from .. import nn
from ..nn.init import rng_of


class ResNet(nn.Module):
    def __init__(self, depth=20, num_classes=10, in_channels=3, widths=(16, 32, 64),
                 dropout="dropout", p=0.0, seed=0, dtype=np.float32):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        rng = rng_of(seed)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False, rng=rng, dtype=dtype),
            nn.BatchNorm2d(widths[0], dtype=dtype), nn.ReLU())
        units, c = [], widths[0]
        for stage, w in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                units.append(nn.basic_block(c, w, stride, rng=rng, dtype=dtype))
                c = w
        self.units = nn.ModuleList(*units)
        self.pool = nn.GlobalAvgPool2d()
        self.drop = nn.make_dropout(dropout, p)
        self.head = nn.Linear(c, num_classes, rng=rng, dtype=dtype)

    def forward(self, x):
        x = self.stem(x)
        for unit in self.units:
            x = unit(x)
        return self.head(self.drop(self.pool(x)))


def resnet20(**kw):
    return ResNet(20, **kw)


def resnet56(**kw):
    return ResNet(56, **kw)
