"""Basic layers: Linear, Embedding, Conv2d, pooling, norms, activations, Flatten."""
from __future__ import annotations

import numpy as np

from .. import autograd as ag
from ..functional import _norm
from .init import normal, rng_of, uniform_fan_in
from .module import Module, Parameter


def _positive_int(name, v):
    if not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


class Linear(Module):
    """y = x W + b with W of shape (in_features, out_features): the K x N layout of the dropout
    papers, so a kept slice of input units is a row slice of W."""
    checks_input_dtype = True

    def __init__(self, in_features, out_features, bias=True, rng=None, dtype=np.float32):
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        rng = rng_of(rng)
        self.weight = Parameter(uniform_fan_in(rng, (in_features, out_features), in_features, dtype))
        self.bias = Parameter(uniform_fan_in(rng, (out_features,), in_features, dtype)) if bias else None

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects inputs with {self.in_features} features in the "
                             f"last axis, got shape {x.shape}")
        # One op: leading axes are rows of one GEMM, and on the GPU the bias is added in the
        # GEMM's epilogue (cuBLASLt) instead of a second pass over the output.
        return ag.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """Lookup table, like ``torch.nn.Embedding``: integer ``idx`` of any shape (array or
    Tensor) -> ``weight[idx]`` of shape ``idx.shape + (dim,)``. ``weight`` is
    (num_embeddings, dim), initialised N(0, std**2) with ``std=0.02`` (GPT-2's, not PyTorch's
    N(0, 1)); repeated indices accumulate their gradients."""

    def __init__(self, num_embeddings, dim, rng=None, dtype=np.float32, std=0.02):
        super().__init__()
        self.num_embeddings = _positive_int("num_embeddings", num_embeddings)
        self.dim = _positive_int("dim", dim)
        self.weight = Parameter(normal(rng_of(rng), (num_embeddings, dim), std, dtype))

    def forward(self, idx):
        return ag.embedding(idx, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.dim}"


class Conv2d(Module):
    """2-D convolution on NCHW input, like ``torch.nn.Conv2d`` (no dilation or groups).
    ``weight`` (out_channels, in_channels, kh, kw) and ``bias`` (out_channels,) both
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_channels * kh * kw (PyTorch's default
    init). ``kernel_size``, ``stride``, ``padding``: an int or an (h, w) pair."""
    checks_input_dtype = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 rng=None, dtype=np.float32):
        super().__init__()
        k = (kernel_size, kernel_size) if np.isscalar(kernel_size) else tuple(kernel_size)
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.kernel_size, self.stride, self.padding = k, stride, padding
        rng = rng_of(rng)
        fan_in = in_channels * k[0] * k[1]
        self.weight = Parameter(uniform_fan_in(rng, (out_channels, in_channels) + k, fan_in, dtype))
        self.bias = Parameter(uniform_fan_in(rng, (out_channels,), fan_in, dtype)) if bias else None

    def forward(self, x):
        return ag.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


class MaxPool2d(Module):
    """Max pooling over (N, C, H, W), like ``torch.nn.MaxPool2d``; ``stride`` defaults to
    ``kernel_size`` and padding counts as -inf. On ties the gradient goes to the window's first
    maximum."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.args = (kernel_size, stride, padding)

    def forward(self, x):
        return ag.max_pool2d(x, *self.args)


class AvgPool2d(MaxPool2d):
    """Average pooling over (N, C, H, W), arguments as :class:`MaxPool2d`. Zero padding counts
    in the mean (PyTorch's ``count_include_pad=True``)."""

    def forward(self, x):
        return ag.avg_pool2d(x, *self.args)


class GlobalAvgPool2d(Module):
    """Mean over the spatial axes: (N, C, H, W) -> (N, C), like
    ``torch.nn.AdaptiveAvgPool2d(1)`` followed by a flatten."""

    def forward(self, x):
        return ag.global_avg_pool2d(x)


class Flatten(Module):
    """(N, ...) -> (N, prod(...)), keeping the batch axis, like ``torch.nn.Flatten()``."""

    def forward(self, x):
        return ag.reshape(x, (x.shape[0], -1))


class _BatchNorm(Module):
    _ndims = ()

    def __init__(self, num_features, momentum=0.1, eps=1e-5, dtype=np.float32, *, act=None):
        super().__init__()
        self.num_features = _positive_int("num_features", num_features)
        if act not in _norm.ACTS:
            raise ValueError(f"act must be one of {_norm.ACTS}, got {act!r}")
        self.momentum, self.eps, self.act = momentum, eps, act
        self.weight = Parameter(np.ones(num_features, dtype))
        self.bias = Parameter(np.zeros(num_features, dtype))
        # Running statistics stay float32 even for half-precision models.
        self.register_buffer("running_mean", np.zeros(num_features, np.float32))
        self.register_buffer("running_var", np.ones(num_features, np.float32))

    def forward(self, x):
        if x.ndim not in self._ndims or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expects input of "
                             f"{' or '.join(map(str, self._ndims))} dims with "
                             f"{self.num_features} channels in axis 1, got shape {x.shape}")
        return ag.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                             training=self.is_training, momentum=self.momentum, eps=self.eps,
                             act=self.act)

    def extra_repr(self):
        return str(self.num_features) + (f", act={self.act!r}" if self.act else "")


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) input over the batch, like ``torch.nn.BatchNorm1d``
    (without its (N, C, L) form). ``weight`` ones and ``bias`` zeros of shape (C,); float32
    buffers ``running_mean`` / ``running_var`` are updated with ``momentum`` in training and
    normalise in eval. ``act='relu'``: a ReLU on the output, fused into the op (the same
    result as a separate :class:`ReLU` after it; on the GPU no pass of its own)."""
    _ndims = (2,)


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (N, C, H, W) input per channel over N, H and W, like
    ``torch.nn.BatchNorm2d``; parameters, buffers and modes as :class:`BatchNorm1d`."""
    _ndims = (4,)


class LayerNorm(Module):
    """Layer normalisation over the last axis, of size ``dim``, like
    ``torch.nn.LayerNorm(dim)``; ``weight`` ones and ``bias`` zeros of shape (dim,).
    Statistics are computed in float32 at least for half-precision inputs."""

    def __init__(self, dim, eps=1e-5, dtype=np.float32):
        super().__init__()
        self.dim, self.eps = _positive_int("dim", dim), eps
        self.weight = Parameter(np.ones(dim, dtype))
        self.bias = Parameter(np.zeros(dim, dtype))

    def forward(self, x):
        return ag.layer_norm(x, self.weight, self.bias, eps=self.eps)

    def extra_repr(self):
        return str(self.dim)


class ReLU(Module):
    """``max(x, 0)`` element-wise (:func:`cudrop.relu`)."""

    def forward(self, x):
        return ag.relu(x)


class GELU(Module):
    """GELU, tanh approximation (:func:`cudrop.gelu`): ``torch.nn.GELU(approximate='tanh')``,
    not PyTorch's default erf form."""

    def forward(self, x):
        return ag.gelu(x)


class Tanh(Module):
    """Hyperbolic tangent element-wise (:func:`cudrop.tanh`)."""

    def forward(self, x):
        return ag.tanh(x)
