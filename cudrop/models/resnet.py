"""CIFAR-style ResNets (He et al. 2016, §4.2): 6n+2 layers, widths 16/32/64, with optional depth
dropout (Guo & Gould) or stochastic depth (Huang et al. 2016) on the residual units."""
from __future__ import annotations

import numpy as np

from .. import nn
from ..nn.depth import (DepthDropout, StochasticDepth, check_mode, conv_shortcut,
                        stochastic_depth_probs)
from ..nn.init import rng_of
from ..philox import check_prob


class ResNet(nn.Module):
    """``depth_dropout``: drop probability ``p`` of every residual unit; each unit's shortcut
    becomes the trainable ``t`` = 1x1 conv + BN + ReLU (with the unit's stride).

    ``stochastic_depth``: drop probability ``p_L`` of the *last* unit; unit ``l`` of ``L`` drops
    with ``l / L * p_L`` (survival ``1 - l / L * p_L``); the basic block's identity/projection
    shortcut stays. ``stochastic_depth_mode``: 'batch' (one draw per unit per step) or
    'sample' (one per sample; the body runs on the kept samples only).

    ``keep_downsampling`` (default True, Guo & Gould's recommended setting) never drops the
    stride-2 units: they are still wrapped, with ``p = 0``, so every unit exposes its ``p``
    (for stochastic depth they keep their place ``l`` in the decay). Pass False for Huang et
    al.'s setting, which drops them too.

    Stochastic layers are numbered in module order (``nn.number_layers``) and draw with
    ``seed``: decisions do not depend on what else the process built, so a model rebuilt from the
    same arguments and state_dict resumes them.
    """

    def __init__(self, depth=20, num_classes=10, in_channels=3, widths=(16, 32, 64),
                 dropout="dropout", p=0.0, seed=0, dtype=np.float32, *, depth_dropout=0.0,
                 keep_downsampling=True, stochastic_depth=0.0, stochastic_depth_mode="batch"):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
        self.depth_dropout = check_prob(depth_dropout, "depth_dropout")
        self.stochastic_depth = check_prob(stochastic_depth, "stochastic_depth")
        self.stochastic_depth_mode = check_mode("stochastic_depth_mode", stochastic_depth_mode)
        if self.depth_dropout and self.stochastic_depth:
            raise ValueError("depth_dropout and stochastic_depth are alternatives; set at most "
                             f"one above 0, got {depth_dropout!r} and {stochastic_depth!r}")
        self.keep_downsampling = bool(keep_downsampling)
        n = (depth - 2) // 6
        rng = rng_of(seed)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False, rng=rng, dtype=dtype),
            *nn.bn_relu(widths[0], dtype))
        sd_probs = stochastic_depth_probs(3 * n, self.stochastic_depth)
        units, c = [], widths[0]
        for stage, w in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                unit = nn.basic_block(c, w, stride, rng=rng, dtype=dtype)
                keep = self.keep_downsampling and unit.downsamples
                k = len(units)
                if self.depth_dropout:
                    unit = DepthDropout.from_unit(
                        unit, 0.0 if keep else self.depth_dropout,
                        shortcut=conv_shortcut(c, w, stride, rng=rng, dtype=dtype),
                        seed=seed)
                elif self.stochastic_depth:
                    unit = StochasticDepth.from_unit(
                        unit, 0.0 if keep else sd_probs[k], mode=self.stochastic_depth_mode,
                        seed=seed)
                units.append(unit)
                c = w
        self.units = nn.ModuleList(*units)
        self.pool = nn.GlobalAvgPool2d()
        self.head = nn.dropped_linear(dropout, c, num_classes, p, rng=rng, dtype=dtype)
        nn.number_layers(self, seed)

    def forward(self, x):
        x = self.stem(x)
        for unit in self.units:
            x = unit(x)
        return self.head(self.pool(x))


def resnet20(**kw):
    """``ResNet(20, **kw)``: 3 stages of 3 basic blocks (widths 16/32/64), 0.27M parameters for
    10 classes; (N, in_channels, H, W) images (CIFAR: 3x32x32) -> (N, num_classes) logits.
    Keywords as :class:`ResNet`."""
    return ResNet(20, **kw)


def resnet56(**kw):
    """``ResNet(56, **kw)``: 3 stages of 9 basic blocks (widths 16/32/64), 0.86M parameters for
    10 classes. Keywords as :class:`ResNet`."""
    return ResNet(56, **kw)
