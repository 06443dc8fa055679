"""Residual units: o = act(f(x) + t(x)).

The body ``f`` and the shortcut ``t`` are separate modules so that depth dropout and stochastic
depth can skip ``f`` entirely while keeping ``t``. A ReLU activation is fused with the sum
(``cudrop.add_relu``: one kernel each way on the GPU), and the builders' conv-BN-ReLU runs as
``BatchNorm2d(act='relu')`` (:func:`bn_relu`).
"""
from __future__ import annotations

import numpy as np

from .. import autograd as ag
from .layers import BatchNorm2d, Conv2d, ReLU
from .dropout import Identity
from .module import Module, Sequential


class ResidualUnit(Module):
    """``activation(body(x) + shortcut(x))``; ``shortcut`` and ``activation`` default to
    Identity. The body is its own module so that depth dropout and stochastic depth can skip it
    and keep the shortcut. :func:`basic_block` builds the CIFAR ResNet one."""

    def __init__(self, body: Module, shortcut: Module | None = None, activation: Module | None = None):
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else Identity()
        self.activation = activation if activation is not None else Identity()

    def forward(self, x):
        return self.merge(self.body(x), self.shortcut(x))

    def merge(self, f, t):
        """``activation(f + t)``: one op, ``add_relu``, when the activation is a plain
        :class:`ReLU` and ``f`` and ``t`` match in shape and dtype (the same values as the
        two ops)."""
        if type(self.activation) is ReLU and f.shape == t.shape and f.dtype == t.dtype:
            return ag.add_relu(f, t)
        return self.activation(f + t)


def bn_relu(channels, dtype=np.float32):
    """Conv nets' BN + ReLU as two modules: ``BatchNorm2d(channels, act='relu')`` (the ReLU
    fused into batch norm) and an Identity in the place a separate ReLU had, so that the layers
    after it keep their index in a Sequential and checkpoints written with the separate ReLU
    load (the same ``state_dict`` keys). The PyTorch quantisation tools' module fusion leaves
    an Identity the same way."""
    return BatchNorm2d(channels, dtype=dtype, act="relu"), Identity()


class ConvBatchNorm(Sequential):
    """``Conv2d`` (no bias) then ``BatchNorm2d`` (its ``act``) as one op,
    :func:`cudrop.conv_batch_norm` (fused kernels for 1x1, stride-1 convolutions on the GPU; the
    two ops otherwise), then the modules of ``rest`` (the Identity of :func:`bn_relu`) in
    order. A Sequential, so its ``state_dict`` keys are those of ``Sequential(conv, bn,
    *rest)``."""

    def __init__(self, conv: Conv2d, norm: BatchNorm2d, *rest: Module):
        if not isinstance(conv, Conv2d) or conv.bias is not None:
            raise TypeError("ConvBatchNorm: conv must be a Conv2d without bias")
        if not isinstance(norm, BatchNorm2d) or norm.num_features != conv.out_channels:
            raise TypeError(f"ConvBatchNorm: norm must be a BatchNorm2d of {conv.out_channels} "
                            f"features, got {norm!r}")
        super().__init__(conv, norm, *rest)

    def forward(self, x):
        conv, norm, *rest = self
        x = ag.conv_batch_norm(x, conv.weight, norm.weight, norm.bias, norm.running_mean,
                               norm.running_var, training=norm.is_training,
                               momentum=norm.momentum, eps=norm.eps, stride=conv.stride,
                               padding=conv.padding, act=norm.act)
        for m in rest:
            x = m(x)
        return x


def basic_block(in_channels, out_channels, stride=1, projection=None, rng=None, dtype=np.float32,
                zero_init_residual=True):
    """The CIFAR ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, then ReLU.

    ``projection`` (default: only when the shape changes) makes the shortcut a 1x1 conv + BN.
    ``zero_init_residual`` starts the branch's last BN scale at 0 (Goyal et al. 2017), so the
    block starts as its shortcut: without it ResNet-56 at lr 0.1 diverged on digits (epoch-1
    validation loss 1.3e6, 10 steps an epoch leave the BN running statistics far off); with it,
    0.88 test accuracy after 3 epochs. ``torch.nn``'s ResNets have it as an option, off.
    """
    body = Sequential(
        Conv2d(in_channels, out_channels, 3, stride, 1, bias=False, rng=rng, dtype=dtype),
        *bn_relu(out_channels, dtype),
        Conv2d(out_channels, out_channels, 3, 1, 1, bias=False, rng=rng, dtype=dtype),
        BatchNorm2d(out_channels, dtype=dtype))
    if zero_init_residual:
        body[4].weight.data[...] = 0
    if projection is None:
        projection = stride != 1 or in_channels != out_channels
    if not projection and (stride != 1 or in_channels != out_channels):
        raise ValueError("an identity shortcut needs stride 1 and equal channel counts; "
                         "pass projection=True")
    shortcut = ConvBatchNorm(Conv2d(in_channels, out_channels, 1, stride, 0, bias=False,
                                    rng=rng, dtype=dtype),
                             BatchNorm2d(out_channels, dtype=dtype)) if projection else None
    unit = ResidualUnit(body, shortcut, ReLU())
    unit.downsamples = stride != 1
    return unit
