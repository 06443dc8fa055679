"""cudrop: structured dropout that skips the dropped work, on NumPy and CuPy."""
__version__ = "0.1.0"

from . import backend
from .autograd import *  # noqa: F401,F403
from .autograd import Tensor, Function, no_grad, eval_mode, train_mode, tensor
