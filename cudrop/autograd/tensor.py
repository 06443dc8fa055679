"""Tensor: a raw NumPy/CuPy array plus what reverse mode needs (grad, creator, generation)."""
from __future__ import annotations

import numpy as np

from .. import backend
from .._checks import check_errors


class Tensor:
    """A node of the autograd graph.

    ``data`` is the raw array (NumPy on the CPU, CuPy on the GPU); ``grad`` is a raw array of the
    same shape, set on leaves by ``backward``. Operations on tensors build the graph while
    gradient recording is on (see ``no_grad``) and some input requires a gradient.
    """

    __array_priority__ = 200  # make ndarray (op) Tensor defer to Tensor's reflected operators
    _grad_hooks = None  # grad-ready hooks (register_grad_ready_hook); a list once one is added

    def __init__(self, data, requires_grad: bool = False, name: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        self.data = backend.as_array(data)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.creator = None
        self.generation = 0
        self.name = name

    # ---- array facts -------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    dtype = property(lambda self: self.data.dtype)
    device = property(lambda self: backend.device_of(self.data))
    xp = property(lambda self: backend.get_array_module(self.data))

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        body = str(backend.asnumpy(self.data)).replace("\n", "\n       ")
        extra = ", requires_grad=True" if self.requires_grad else ""
        dev = "" if self.device == "cpu" else f", device={self.device}"
        return f"tensor({body}{dev}{extra})"

    # ---- conversions -------------------------------------------------------------------
    def numpy(self):
        """The data as a NumPy array. From the GPU this waits for the device, so it is also a
        check point: a failure recorded by a device-side check is raised here
        (``cudrop.check_errors``)."""
        out = backend.asnumpy(self.data)
        if backend.is_gpu_array(self.data):
            check_errors()
        return out

    def item(self):
        """The single element as a Python number; a check point on the GPU, as ``numpy()``."""
        out = self.data.item()
        if backend.is_gpu_array(self.data):
            check_errors()
        return out

    def to(self, device: str) -> "Tensor":
        """A leaf copy on 'cpu' or 'gpu' (the graph does not cross devices)."""
        return Tensor(backend.to_device(self.data, device), requires_grad=self.requires_grad)

    def detach(self) -> "Tensor":
        return Tensor(self.data)

    def astype(self, dtype):
        from .math import astype
        return astype(self, dtype)

    def __dlpack__(self, *args, **kwargs):
        return self.data.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()

    # ---- autograd ----------------------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False):
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        ``grad`` is required unless ``self`` holds a single element.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: no input of "
                               "its graph was created with requires_grad=True")
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() on a non-scalar tensor of shape {self.shape} "
                                   "needs grad= (an array of that shape)")
            grad = self.xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else backend.as_array(grad)
            backend.get_array_module(self.data, grad)
            if grad.shape != self.shape:
                raise ValueError(f"grad has shape {grad.shape}, expected {self.shape}")
            grad = grad.astype(self.dtype, copy=False)
        from .function import run_backward
        run_backward(self, grad, retain_graph=retain_graph)

    def zero_grad(self):
        self.grad = None

    def register_grad_ready_hook(self, fn) -> "HookHandle":
        """Call ``fn(self)`` in every backward pass as soon as this leaf's ``.grad`` is final
        for the pass: after its last contribution, while backward goes on through the rest of
        the graph (data-parallel training starts a bucket's all-reduce there, so communication
        overlaps the remaining backward). Called once per pass that gives the leaf a gradient,
        never for a pass that does not reach it. Only leaves (tensors made by the user, such as
        parameters) have their hooks called. Returns a handle whose ``remove()`` unregisters
        ``fn``."""
        if not callable(fn):
            raise TypeError(f"register_grad_ready_hook: fn must be callable, got {fn!r}")
        if self._grad_hooks is None:
            self._grad_hooks = []
        self._grad_hooks.append(fn)
        from .function import _hooked
        _hooked.add(self)
        return HookHandle(self, fn)

    # ---- operators (the ops live in math/shape/reduce/linalg) ---------------------------
    def __add__(self, o): return _m.add(self, o)
    def __radd__(self, o): return _m.add(o, self)
    def __sub__(self, o): return _m.sub(self, o)
    def __rsub__(self, o): return _m.sub(o, self)
    def __mul__(self, o): return _m.mul(self, o)
    def __rmul__(self, o): return _m.mul(o, self)
    def __truediv__(self, o): return _m.div(self, o)
    def __rtruediv__(self, o): return _m.div(o, self)
    def __neg__(self): return _m.neg(self)
    def __pow__(self, o): return _m.pow(self, o)
    def __matmul__(self, o): return _l.matmul(self, o)
    def __rmatmul__(self, o): return _l.matmul(o, self)
    def __getitem__(self, idx): return _s.getitem(self, idx)

    # Comparisons give raw boolean arrays: they have no gradient.
    def _raw(self, o):
        return o.data if isinstance(o, Tensor) else o
    def __lt__(self, o): return self.data < self._raw(o)
    def __le__(self, o): return self.data <= self._raw(o)
    def __gt__(self, o): return self.data > self._raw(o)
    def __ge__(self, o): return self.data >= self._raw(o)

    def reshape(self, *shape):
        return _s.reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    def transpose(self, *axes):
        return _s.transpose(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else (axes or None))

    @property
    def T(self):
        return _s.transpose(self, None)

    def sum(self, axis=None, keepdims=False): return _r.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return _r.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return _r.max(self, axis, keepdims)
    def var(self, axis=None, keepdims=False): return _r.var(self, axis, keepdims)
    def exp(self): return _m.exp(self)
    def log(self): return _m.log(self)
    def tanh(self): return _m.tanh(self)
    def sigmoid(self): return _m.sigmoid(self)
    def relu(self): return _m.relu(self)


class HookHandle:
    """What :meth:`Tensor.register_grad_ready_hook` returns: ``remove()`` unregisters the hook
    (a second call does nothing)."""

    def __init__(self, tensor, fn):
        self.tensor, self.fn = tensor, fn

    def remove(self):
        """Unregister the hook."""
        hooks = self.tensor._grad_hooks
        if hooks and self.fn in hooks:
            hooks.remove(self.fn)
        if not hooks:
            from .function import _hooked
            _hooked.discard(self.tensor)


def as_tensor(x, like: Tensor | None = None) -> Tensor:
    """Tensor from a Tensor, raw array, DLPack producer or Python scalar.

    A Python scalar takes the dtype and device of ``like`` so that ``t * 2`` keeps float16
    float16 and a GPU tensor on the GPU.
    """
    if isinstance(x, Tensor):
        return x
    if like is not None and isinstance(x, (int, float, bool, np.generic)):
        if isinstance(x, np.generic):
            x = x.item()  # NumPy scalars (np.sqrt(d)) lift like Python scalars: weakly typed
        # A floating tensor keeps its dtype (bfloat16 included: NumPy's promotion of ml_dtypes'
        # bfloat16 with a Python float gave float64 on the GPU machine); an int tensor takes
        # result_type, so int * 2.5 does not truncate 2.5 to 2. Built on the host in that
        # dtype, then uploaded: CuPy cannot cast a scalar to bfloat16 itself.
        dtype = like.dtype if backend.is_floating(like.dtype) else np.result_type(like.dtype, x)
        return Tensor(like.xp.asarray(np.asarray(x, dtype=dtype)))
    return Tensor(x)


def tensor(data, requires_grad: bool = False, dtype=None, device: str | None = None) -> Tensor:
    """Build a tensor, optionally casting and moving it ('cpu', 'gpu', 'auto')."""
    a = backend.as_array(data)
    if device is not None:
        a = backend.to_device(a, device)
    if dtype is not None:
        a = a.astype(dtype, copy=False)
    return Tensor(a, requires_grad=requires_grad)


from . import linalg as _l, math as _m, reduce as _r, shape as _s  # noqa: E402  (cycle)
