"""cudrop: structured dropout that skips the dropped work, on NumPy and CuPy.

Two flat namespaces: the Tensor ops with gradients at the top level (``cudrop.dropout``,
``cudrop.sparsedrop_linear``, ``cudrop.conv2d``, ... as ``torch.*``), and the same ops on raw
arrays as ``(out, saved)`` / ``_backward`` pairs in ``cudrop.functional``. Layers in
``cudrop.nn``; ``cudrop.optim``, ``cudrop.models``, ``cudrop.data``; the block-sparse GEMMs on
raw arrays in ``cudrop.bsmm``; masks in ``cudrop.masks`` and each variant's draw in
``cudrop.variants``; ``cudrop.save`` / ``cudrop.load`` checkpoint a whole training state;
``cudrop.distributed`` trains data-parallel over NCCL; ``cudrop.flops.count()`` counts the
matrix products' work (to see the dropped work skipped).
On the GPU, ops never read device values back to check them: a bad index is raised at the next
check point (``cudrop.check_errors``; see ``cudrop._checks`` for the rule).
Submodules load on first use.
"""
import importlib as _importlib

#: The package version, a PEP 440 string.
__version__ = "0.1.0"

from . import backend
from ._memo import clear_caches
from ._checks import IndexRangeError, check_errors
from .checkpoint import load, save
from .autograd import *  # noqa: F401,F403
from .autograd import Function, Tensor, eval_mode, no_grad, tensor, train_mode

_SUBMODULES = ("autograd", "bsmm", "data", "distributed", "flops", "functional", "graph",
               "masks", "models", "nn", "optim", "philox", "random", "variants")

__all__ = sorted(set(autograd.__all__) | {"IndexRangeError", "check_errors", "clear_caches",  # noqa: F405
                                          "load", "save", "__version__"})


def __getattr__(name):
    if name in _SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cudrop' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
