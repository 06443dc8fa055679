"""The one generic wrapper that turns a functional pair into a Tensor op.

A pair is ``forward(*arrays, **options) -> (out, saved)`` and ``backward(grad_out, saved)``
returning one gradient per array input (a tuple when there are several, None for an optional
input that was None or one that gets no gradient). ``differentiable(forward, backward, inputs)``
makes the Tensor op: the parameters named in ``inputs`` are graph inputs (Tensors, arrays or
None), the rest are passed to ``forward`` unchanged; arguments go by position or keyword,
exactly as the pair takes them.
Ops apply what they are given; they never decide train versus eval (layers do).
"""
from __future__ import annotations

import functools
import inspect

from .function import Function


class PairFunction(Function):
    """A Function that runs a functional pair; ``options`` are the pair's non-array arguments.
    A backward that takes ``needs`` (one bool per array input) is told which gradients the
    graph wants, so it can skip the others' work (a first layer's input gradient)."""

    def __init__(self, forward, backward, names, options, takes_needs=False):
        self.pair, self.names, self.options = (forward, backward), names, options
        self.takes_needs = takes_needs

    def forward(self, *xs):
        y, self.saved = self.pair[0](**dict(zip(self.names, xs)), **self.options)
        return y

    def backward(self, g):
        if self.takes_needs:
            needs = tuple(x is not None and x.requires_grad for x in self.inputs)
            gxs = self.pair[1](g, self.saved, needs=needs)
        else:
            gxs = self.pair[1](g, self.saved)
        return gxs if isinstance(gxs, tuple) else (gxs,)

    def __repr__(self):
        return f"<{self.pair[0].__name__}>"


def differentiable(forward, backward, inputs):
    """The Tensor op of the pair ``(forward, backward)``. ``inputs`` names the parameters that
    are arrays (graph inputs; an int ``n`` means the first ``n``), in the order ``backward``
    returns their gradients; the other parameters are options. Keeps ``forward``'s name and
    signature; the docstring says it is the Tensor form."""
    names = list(inspect.signature(forward).parameters)
    inputs = tuple(names[:inputs]) if isinstance(inputs, int) else tuple(inputs)
    unknown = set(inputs) - set(names)
    if unknown:
        raise ValueError(f"differentiable: {forward.__name__} has no parameters {sorted(unknown)}")
    takes_needs = "needs" in inspect.signature(backward).parameters

    @functools.wraps(forward)
    def op(*args, **kwargs):
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{forward.__name__}() got multiple values for argument {name!r}")
            kwargs[name] = value
        arrays = [kwargs.pop(name, None) for name in inputs]
        return PairFunction(forward, backward, inputs, kwargs, takes_needs)(*arrays)

    op.__doc__ = (f"Tensor form of ``cudrop.functional.{forward.__name__}`` (gradients to "
                  f"{', '.join(inputs)}).\n\n" + (inspect.getdoc(forward) or ""))
    op.__module__ = "cudrop"
    return op
