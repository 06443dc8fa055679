"""Minimal reverse-mode autograd over NumPy/CuPy arrays (no double backward)."""
import sys as _sys
from .function import Function
from .gradcheck import check_grad
from .linalg import matmul
from .math import add, astype, div, exp, gelu, log, mul, neg, pow, relu, sigmoid, sub, tanh
from .mode import enable_grad, eval_mode, is_grad_enabled, is_training, no_grad, set_training, train_mode
from .reduce import log_softmax, max, mean, softmax, sum, var
from .shape import concat, getitem, reshape, stack, transpose
from .tensor import Tensor, as_tensor, tensor
from .ops import *  # noqa: F401,F403  every functional pair as a Tensor op
from .pair import differentiable

# Functions and classes only: the submodules (conv, norm, loss, ...) stay out of
# ``from cudrop.autograd import *`` and so out of the ``cudrop`` namespace.
__all__ = [_n for _n, _v in list(globals().items())
           if not _n.startswith("_") and not isinstance(_v, type(_sys))]
