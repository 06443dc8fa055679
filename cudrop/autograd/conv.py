"""Convolution and pooling over Tensors: thin Functions over ``cudrop.functional`` pairs."""
from __future__ import annotations

from ..functional import _conv, _pool
from .function import Function

__all__ = ["conv2d", "max_pool2d", "avg_pool2d", "global_avg_pool2d"]


class Conv2d(Function):
    def __init__(self, stride=1, padding=0):
        self.stride, self.padding = stride, padding

    def forward(self, x, w, b=None):
        y, self.saved = _conv.conv2d(x, w, b, self.stride, self.padding)
        return y

    def backward(self, gy):
        gx, gw, gb = _conv.conv2d_backward(gy, self.saved)
        # Called with two inputs when there is no bias: one gradient per input.
        return (gx, gw) if gb is None else (gx, gw, gb)


class MaxPool2d(Function):
    def __init__(self, kernel_size, stride=None, padding=0):
        self.args = kernel_size, stride, padding

    def forward(self, x):
        y, self.saved = _pool.max_pool2d(x, *self.args)
        return y

    def backward(self, gy):
        return _pool.max_pool2d_backward(gy, self.saved)


class AvgPool2d(Function):
    def __init__(self, kernel_size, stride=None, padding=0):
        self.args = kernel_size, stride, padding

    def forward(self, x):
        y, self.saved = _pool.avg_pool2d(x, *self.args)
        return y

    def backward(self, gy):
        return _pool.avg_pool2d_backward(gy, self.saved)


class GlobalAvgPool2d(Function):
    def forward(self, x):
        y, self.saved = _pool.global_avg_pool2d(x)
        return y

    def backward(self, gy):
        return _pool.global_avg_pool2d_backward(gy, self.saved)


def conv2d(x, w, b=None, stride=1, padding=0):
    """2-D cross-correlation: ``x`` (N, C, H, W), ``w`` (O, C, kh, kw), optional bias ``b``
    (O,); ``stride`` and zero ``padding`` an int or an (h, w) pair. Returns (N, O, Ho, Wo)."""
    f = Conv2d(stride, padding)
    return f(x, w) if b is None else f(x, w, b)


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max pooling (stride defaults to kernel_size, -inf padding); the gradient goes to the
    first maximum of each window."""
    return MaxPool2d(kernel_size, stride, padding)(x)


def avg_pool2d(x, kernel_size, stride=None, padding=0):
    """Average pooling (stride defaults to kernel_size); zero padding counts in the mean."""
    return AvgPool2d(kernel_size, stride, padding)(x)


def global_avg_pool2d(x):
    """Mean over H and W: (N, C, H, W) -> (N, C)."""
    return GlobalAvgPool2d()(x)
