"""Batch and layer normalisation as autograd ops (thin wrappers over cudrop.functional.norm)."""
from __future__ import annotations

from ..functional import _norm as F
from . import mode
from .function import Function
from .tensor import Tensor

__all__ = ["batch_norm", "layer_norm"]


def _raw(a):
    return a.data if isinstance(a, Tensor) else a


class _Affine(Function):
    """Shared plumbing: the graph inputs are x plus whichever of gamma/beta were given."""

    def __init__(self, has_gamma, has_beta):
        self.has_gamma, self.has_beta = has_gamma, has_beta

    def _split(self, params):
        params = list(params)
        gamma = params.pop(0) if self.has_gamma else None
        beta = params.pop(0) if self.has_beta else None
        return gamma, beta

    def _grads(self, gx, ggamma, gbeta):
        out = [gx]
        if self.has_gamma:
            out.append(ggamma)
        if self.has_beta:
            out.append(gbeta)
        return tuple(out)


class BatchNorm(_Affine):
    def __init__(self, running_mean, running_var, training, momentum, eps, has_gamma, has_beta):
        super().__init__(has_gamma, has_beta)
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.momentum, self.eps = training, momentum, eps

    def forward(self, x, *params):
        gamma, beta = self._split(params)
        y, self.saved = F.batch_norm(x, gamma, beta, self.running_mean, self.running_var,
                                     self.training, self.momentum, self.eps)
        # running statistics are not needed by backward; do not keep them alive
        self.running_mean = self.running_var = None
        return y

    def backward(self, g):
        return self._grads(*F.batch_norm_backward(g, self.saved))


class LayerNorm(_Affine):
    def __init__(self, eps, has_gamma, has_beta):
        super().__init__(has_gamma, has_beta)
        self.eps = eps

    def forward(self, x, *params):
        gamma, beta = self._split(params)
        y, self.saved = F.layer_norm(x, gamma, beta, self.eps)
        return y

    def backward(self, g):
        return self._grads(*F.layer_norm_backward(g, self.saved))


def batch_norm(x, gamma, beta, running_mean, running_var, training=None, momentum=0.1,
               eps=1e-5):
    """Batch normalisation over every axis but axis 1 of ``x`` ((N, C) or (N, C, ...)).

    ``gamma``/``beta`` are tensors of shape (C,) or None. ``running_mean``/``running_var`` are
    raw arrays (or None), not graph inputs: in training they are updated in place. ``training``
    None follows ``cudrop.autograd.mode.is_training()``.
    """
    if training is None:
        training = mode.is_training()
    params = [p for p in (gamma, beta) if p is not None]
    op = BatchNorm(_raw(running_mean), _raw(running_var), bool(training), momentum, eps,
                   gamma is not None, beta is not None)
    return op(x, *params)


def layer_norm(x, gamma, beta, eps=1e-5):
    """Layer normalisation over the last axis; ``gamma``/``beta`` of shape ``x.shape[-1:]`` or
    None."""
    params = [p for p in (gamma, beta) if p is not None]
    return LayerNorm(eps, gamma is not None, beta is not None)(x, *params)
