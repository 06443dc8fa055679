"""Matrix product with broadcasting over leading (batch) dimensions."""
from ..functional._matmul import matmul as _matmul
from .function import Function
from .math import sum_to


class MatMul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return _matmul(a, b)

    def backward(self, g):
        a, b = self.a, self.b
        ga = _matmul(g, b.swapaxes(-1, -2))
        gb = _matmul(a.swapaxes(-1, -2), g)
        return sum_to(ga, a.shape), sum_to(gb, b.shape)


def matmul(a, b):
    """``a @ b`` for tensors of at least 2 dimensions (no 1-D vector case, unlike
    ``np.matmul``) and one dtype, broadcasting the leading (batch) dimensions; a broadcast
    operand's gradient is summed back to its shape. Same as ``a @ b`` on Tensors."""
    from .math import _pair
    return MatMul()(*_pair(a, b))
