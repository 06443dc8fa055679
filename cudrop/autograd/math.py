"""Element-wise arithmetic and activations, with un-broadcasting in backward."""
from __future__ import annotations

from .. import backend
from ..functional import _act
from ..functional._reduce import sum_leading
from .function import Function
from .pair import differentiable
from .tensor import Tensor, as_tensor


def sum_to(g, shape):
    """Sum ``g`` down to ``shape``: the adjoint of NumPy broadcasting. A sum over leading axes
    only (axes of size 1 aside: a bias (d,) or a position embedding (1, T, d) broadcast over a
    batch) runs ``sum_leading`` (a GPU kernel for CuPy arrays); any other, the array's sum."""
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape)
                                      if n == 1 and g.shape[i + lead] != 1)
    k = axes[-1] + 1 if axes else 0
    if all(g.shape[i] == 1 for i in range(k) if i not in axes):
        return sum_leading(g, k).reshape(shape)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def _pair(a, b):
    """Lift Python scalars to tensors of the other operand's dtype and device."""
    if isinstance(a, Tensor):
        return a, as_tensor(b, like=a)
    return as_tensor(a, like=b), b


class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return _act.add(a, b)

    def backward(self, g):
        return (sum_to(g, self.shapes[0]) if self.needs_grad(0) else None,
                sum_to(g, self.shapes[1]) if self.needs_grad(1) else None)


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, g):
        return (sum_to(g, self.shapes[0]) if self.needs_grad(0) else None,
                sum_to(-g, self.shapes[1]) if self.needs_grad(1) else None)


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        return (sum_to(g * self.b, self.a.shape) if self.needs_grad(0) else None,
                sum_to(g * self.a, self.b.shape) if self.needs_grad(1) else None)


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, g):
        ga = g / self.b
        return (sum_to(ga, self.a.shape) if self.needs_grad(0) else None,
                sum_to(-ga * self.a / self.b, self.b.shape) if self.needs_grad(1) else None)


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return -g


class Pow(Function):
    """a ** c for a constant exponent c (tensor exponents go through exp/log)."""

    def __init__(self, c):
        self.c = c

    def forward(self, a):
        self.a = a
        return a ** self.c

    def backward(self, g):
        if self.c == 0:  # d(a**0)/da = 0, also at a = 0 where 0 * 0**-1 would be NaN
            return backend.get_array_module(g).zeros_like(g)
        return g * self.c * self.a ** (self.c - 1)


class Exp(Function):
    def forward(self, a):
        self.y = backend.get_array_module(a).exp(a)
        return self.y

    def backward(self, g):
        return g * self.y


class Log(Function):
    def forward(self, a):
        self.a = a
        return backend.get_array_module(a).log(a)

    def backward(self, g):
        return g / self.a


class Tanh(Function):
    def forward(self, a):
        self.y = backend.get_array_module(a).tanh(a)
        return self.y

    def backward(self, g):  # cast: CuPy computes bfloat16 with a Python scalar in float32
        return (g * (1 - self.y * self.y)).astype(g.dtype, copy=False)


class Sigmoid(Function):
    def forward(self, a):
        xp = backend.get_array_module(a)
        # tanh form: no overflow warning for large |a|, unlike 1 / (1 + exp(-a))
        self.y = (xp.tanh(a * 0.5) * 0.5 + 0.5).astype(a.dtype, copy=False)
        return self.y

    def backward(self, g):
        return (g * self.y * (1 - self.y)).astype(g.dtype, copy=False)


# the functional pairs as Tensor ops (one kernel each way on the GPU; float32 arithmetic for
# 16-bit inputs)
_relu = differentiable(_act.relu, _act.relu_backward, 1)
_gelu_tanh = differentiable(_act.gelu_tanh, _act.gelu_tanh_backward, 1)


class AsType(Function):
    def __init__(self, dtype):
        self.dtype = dtype

    def forward(self, a):
        self.src = a.dtype
        return a.astype(self.dtype)

    def backward(self, g):
        return g.astype(self.src)


def add(a, b):
    """``a + b`` with NumPy broadcasting; the gradient of a broadcast operand is summed back to
    its shape. Either operand may be a Python/NumPy scalar: it takes the other's device and dtype
    (promoted only where needed, so an int tensor + 0.5 is float)."""
    return Add()(*_pair(a, b))


def sub(a, b):
    """``a - b``, broadcasting and scalars as in :func:`add`."""
    return Sub()(*_pair(a, b))


def mul(a, b):
    """``a * b`` element-wise (not a matrix product: see :func:`matmul`), broadcasting and
    scalars as in :func:`add`."""
    return Mul()(*_pair(a, b))


def div(a, b):
    """``a / b`` (true division), broadcasting and scalars as in :func:`add`."""
    return Div()(*_pair(a, b))


def neg(a):
    """``-a``."""
    return Neg()(a)


def pow(a, c):
    """``a ** c`` for a constant Python-number exponent ``c`` (gradient ``c * a ** (c - 1)``,
    0 for ``c == 0``). A Tensor exponent raises TypeError: write ``exp(c * log(a))``."""
    if isinstance(c, Tensor):
        raise TypeError("pow: the exponent must be a Python number; for a tensor exponent "
                        "use exp(c * log(a))")
    return Pow(c)(a)


def exp(a):
    """``e ** a`` element-wise, like ``np.exp``."""
    return Exp()(a)


def log(a):
    """Natural logarithm element-wise, like ``np.log`` (gradient ``1 / a``; no clamping at 0)."""
    return Log()(a)


def tanh(a):
    """Hyperbolic tangent element-wise."""
    return Tanh()(a)


def sigmoid(a):
    """Logistic sigmoid ``1 / (1 + e ** -a)``, computed as ``tanh(a / 2) / 2 + 1 / 2`` so large
    ``|a|`` raise no overflow warning; keeps ``a``'s dtype."""
    return Sigmoid()(a)


def relu(a):
    """``max(a, 0)`` element-wise; the gradient is 0 at ``a == 0``."""
    return _relu(a)


def gelu(a):
    """GELU with the tanh approximation (GPT-2/BERT; PyTorch's ``gelu(x, approximate='tanh')``):
    ``0.5 * a * (1 + tanh(sqrt(2 / pi) * (a + 0.044715 * a ** 3)))``."""
    return _gelu_tanh(a)


def astype(a, dtype):
    """``a`` cast to ``dtype``; the gradient is cast back to ``a``'s dtype. Same as
    ``Tensor.astype``."""
    return AsType(dtype)(a)
