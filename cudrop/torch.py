"""cudrop inside PyTorch: ``torch.autograd.Function`` ops and ``torch.nn.Module`` layers over
cudrop's functional pairs (an optional extra: ``pip install torch``).

Arrays cross through DLPack without a copy (CUDA tensors become CuPy arrays, CPU tensors NumPy
arrays, and back), and cudrop's kernels and cuBLAS calls run on PyTorch's current CUDA stream
(wrapped as a CuPy external stream), so nothing synchronises; their temporaries come from
PyTorch's caching allocator, so a ``torch.cuda.graph`` capture keeps them in its pool. CPU tensors run cudrop's NumPy
reference path, which is what ``torch.autograd.gradcheck`` checks in float64.

Ops: ``dropout``, ``sparsedrop_linear``, ``sliceout_linear``, ``blockwise_linear``,
``blockwise_linear_out``, ``dsd``, ``sdd``, ``dsd_t`` -- the same names, arguments and
semantics as ``cudrop.functional`` (arrays first, then ``p``, then keywords). Layers:
``Dropout``, ``SparseDropLinear``, ``SliceOutLinear``, ``BlockwiseLinear``: each draws its mask
from (seed, layer, step) with a step counter that advances per training forward, exactly as
the ``cudrop.nn`` layer of the same name; in eval mode they are the identity or a plain Linear.
"""
from __future__ import annotations

import contextlib
import math

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the machine
    raise ImportError("cudrop.torch needs PyTorch: pip install torch (or cudrop[torch])") from e

import numpy as np

from . import backend
from .functional import _act, _bsmm_pairs
from .variants import blockwise as _blockwise, dropout as _dropout, sliceout as _sliceout
from .variants import sparsedrop as _sparsedrop

__all__ = ["dropout", "sparsedrop_linear", "sliceout_linear", "blockwise_linear",
           "blockwise_linear_out", "dsd", "sdd", "dsd_t", "Dropout", "SparseDropLinear",
           "SliceOutLinear", "BlockwiseLinear"]


# ---- crossing between PyTorch and cudrop ------------------------------------------------------

def _check_tensors(op, named):
    """Every given tensor on one device and of one floating dtype, or a clear error."""
    first = None
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if first is None:
            first = (name, t)
            if not t.dtype.is_floating_point:
                raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
            continue
        if t.device != first[1].device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first[0]} is on "
                             f"{first[1].device}; move them to one device")
        if t.dtype != first[1].dtype:
            raise TypeError(f"{op}: {name} is {t.dtype} but {first[0]} is {first[1].dtype}; "
                            "cast them to one dtype")
    return first[1] if first else None


def _to_array(t):
    if t is None:
        return None
    t = t.detach()
    if t.device.type == "cpu":
        return t.numpy()
    if backend.cupy is None:
        raise RuntimeError("a CUDA tensor was given but CuPy is not installed (pip install "
                           "cudrop[cuda13] or cudrop[cuda12])")
    return backend.cupy.from_dlpack(t)


def _to_tensor(a):
    return None if a is None else torch.from_dlpack(a)


class _StreamProtocol:
    """A raw ``cudaStream_t`` behind the CUDA stream protocol (``__cuda_stream__`` ->
    (version 0, handle)) that ``cupy.cuda.Stream.from_external`` reads."""

    def __init__(self, handle):
        self.handle = handle

    def __cuda_stream__(self):
        return 0, self.handle


@contextlib.contextmanager
def _on_torch_stream(t):
    """Run cudrop's launches on PyTorch's current stream of ``t``'s device."""
    if t is None or t.device.type != "cuda":
        yield
        return
    cp = backend.cupy
    handle = torch.cuda.current_stream(t.device).cuda_stream
    # CuPy 14 deprecates ExternalStream for Stream.from_external, which takes an object with the
    # CUDA stream protocol (measured: a bare int raises TypeError); older CuPy has only the former.
    from_external = getattr(cp.cuda.Stream, "from_external", None)
    stream = (from_external(_StreamProtocol(handle)) if from_external is not None
              else cp.cuda.ExternalStream(handle, t.device.index))
    with cp.cuda.Device(t.device.index), stream, cp.cuda.using_allocator(_torch_malloc):
        yield


class _TorchBlock:
    """Owns one block of PyTorch's caching allocator for the CuPy array that wraps it; the
    block goes back to PyTorch when the array (and every view of it) is gone."""

    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr

    def __del__(self):
        try:
            torch.cuda.caching_allocator_delete(self.ptr)
        except Exception:  # pragma: no cover - at interpreter exit torch.cuda may be gone
            pass


def _torch_malloc(size):
    """CuPy's allocator inside ``_on_torch_stream``: cudrop's temporaries come from PyTorch's
    caching allocator on PyTorch's stream, so under ``torch.cuda.graph`` they land in the
    graph's private pool (CuPy's own pool would call cudaMalloc inside the capture and hand the
    same memory to work outside it)."""
    cp = backend.cupy
    dev = cp.cuda.runtime.getDevice()
    size = max(int(size), 1)
    ptr = torch.cuda.caching_allocator_alloc(size, dev, torch.cuda.current_stream(dev))
    mem = cp.cuda.UnownedMemory(ptr, size, _TorchBlock(ptr), dev)
    return cp.cuda.MemoryPointer(mem, 0)


class _Pair(torch.autograd.Function):
    """One torch.autograd.Function for every functional pair: arrays in, the pair's forward,
    ``saved`` kept on ctx, the pair's backward on the way back."""

    @staticmethod
    def forward(ctx, spec, *tensors):
        fwd, bwd, names, options = spec
        ref = _check_tensors(fwd.__name__, zip(names, tensors))
        # Both crossings inside the stream context, so that DLPack's exchange names one stream
        # on both sides: otherwise CuPy makes one stream wait on the other, which a capture
        # forbids (cudaErrorStreamCaptureImplicit going in and cudaErrorStreamCaptureIsolation
        # coming out, both seen on the H200 machine).
        with _on_torch_stream(ref):
            arrays = {n: _to_array(t) for n, t in zip(names, tensors)}
            y, saved = fwd(**arrays, **options)
            ctx.spec, ctx.saved, ctx.ref = spec, saved, ref
            return _to_tensor(y)

    @staticmethod
    def backward(ctx, grad):
        _, bwd, names, _ = ctx.spec
        with _on_torch_stream(ctx.ref):
            grads = bwd(_to_array(grad.contiguous()), ctx.saved)
            grads = grads if isinstance(grads, tuple) else (grads,)
            return (None,) + tuple(_to_tensor(g) for g in grads)


def _torch_op(forward, backward, inputs):
    import functools
    import inspect
    names = list(inspect.signature(forward).parameters)

    @functools.wraps(forward)
    def op(*args, **kwargs):
        for name, value in zip(names, args):
            kwargs[name] = value
        tensors = [kwargs.pop(n, None) for n in inputs]
        return _Pair.apply((forward, backward, tuple(inputs), kwargs), *tensors)

    op.__doc__ = (f"PyTorch form of ``cudrop.functional.{forward.__name__}`` (gradients to "
                  f"{', '.join(inputs)}).\n\n" + (inspect.getdoc(forward) or ""))
    return op


dropout = _torch_op(_dropout.dropout, _dropout.dropout_backward, ("x",))
sparsedrop_linear = _torch_op(_sparsedrop.sparsedrop_linear, _sparsedrop.sparsedrop_linear_backward,
                              ("x", "w", "b"))
sliceout_linear = _torch_op(_sliceout.sliceout_linear, _sliceout.sliceout_linear_backward,
                            ("x", "w", "b"))
blockwise_linear = _torch_op(_blockwise.blockwise_linear, _blockwise.blockwise_linear_backward,
                             ("x", "w", "b"))
blockwise_linear_out = _torch_op(_blockwise.blockwise_linear_out,
                                 _blockwise.blockwise_linear_out_backward, ("x", "w", "b"))
dsd = _torch_op(_bsmm_pairs.dsd, _bsmm_pairs.dsd_backward, ("a", "b", "bias"))
sdd = _torch_op(_bsmm_pairs.sdd, _bsmm_pairs.sdd_backward, ("a", "b", "bias"))
dsd_t = _torch_op(_bsmm_pairs.dsd_t, _bsmm_pairs.dsd_t_backward, ("a", "b"))
_linear = _torch_op(_act.linear, _act.linear_backward, ("x", "w", "b"))


# ---- layers ---------------------------------------------------------------------------------

class _Stochastic(torch.nn.Module):
    """seed, layer and a step counter (an int32 buffer in state_dict, so a resumed run draws
    the same masks); the step advances once per training forward.

    Layers whose masks are drawn by kernels (Dropout, SparseDropLinear, BlockwiseLinear) keep
    the step on the module's device: the mask kernels read it from device memory and a PyTorch
    op advances it, so nothing synchronises and a step captured with ``torch.cuda.graph`` draws
    a new mask on every replay. A layer that decides its mask on the host (SliceOut's slice)
    keeps it on the CPU and cannot be captured."""

    _device_step = False

    def __init__(self, p, seed, layer):
        super().__init__()
        from .philox import check_prob, check_seed
        self.p = check_prob(p)
        self.seed = check_seed("seed", seed)
        self.layer = check_seed("layer", layer)
        self.register_buffer("step", torch.zeros((), dtype=torch.int32), persistent=True)

    def _next_step(self, x):
        """This forward's step for input ``x``: an int, or for a CUDA ``x`` in a layer with a
        device step, a 0-d uint32 CuPy view of the buffer (read by the kernel when it runs)."""
        if x.device.type == "cuda" and self._device_step:
            if self.step.device != x.device:
                self.step = self.step.to(x.device)
            # This step's value in its own buffer (the kernel reads it later on the same
            # stream), then the counter advances: two tiny PyTorch ops, captured like any other.
            current = self.step.clone()
            self.step.add_(1)
            return backend.cupy.from_dlpack(current).view(np.uint32)
        if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{type(self).__name__} decides its mask on the host and cannot "
                               "be captured in a CUDA graph (its mask would be frozen)")
        s = int(self.step)  # a host-side count: the buffer lives on the CPU
        self.step.fill_(s + 1)
        return s

    def _apply(self, fn, *args, **kwargs):
        step = self.step
        out = super()._apply(fn, *args, **kwargs)
        if not self._device_step:
            self.step = step  # the counter stays on the host: reading it must not synchronise
        return out

    def extra_repr(self):
        return f"p={self.p}, seed={self.seed}, layer={self.layer}, step={int(self.step)}"


class Dropout(_Stochastic):
    """Inverted element dropout with cudrop's counter-based masks (one fused kernel on CUDA);
    the identity in eval mode."""

    _device_step = True

    def __init__(self, p=0.5, seed=0, layer=0):
        super().__init__(p, seed, layer)

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        with _on_torch_stream(x):
            step = self._next_step(x)
        return dropout(x, self.p, seed=self.seed, layer=self.layer, step=step)


class _LinearBase(_Stochastic):
    """A Linear whose weight is (in_features, out_features) -- cudrop's K x N layout -- with
    PyTorch's default initialisation (uniform in ±1/sqrt(in_features))."""

    def __init__(self, in_features, out_features, p, bias, seed, layer, device, dtype):
        super().__init__(p, seed, layer)
        self.in_features, self.out_features = int(in_features), int(out_features)
        bound = 1.0 / math.sqrt(self.in_features)
        kw = dict(device=device, dtype=dtype)
        self.weight = torch.nn.Parameter(
            torch.empty(self.in_features, self.out_features, **kw).uniform_(-bound, bound))
        self.bias = (torch.nn.Parameter(torch.empty(self.out_features, **kw).uniform_(-bound, bound))
                     if bias else None)

    def _check(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects inputs with {self.in_features} "
                             f"features in the last axis, got shape {tuple(x.shape)}")

    def _dense(self, x):
        return _linear(x, self.weight, self.bias)

    def _xp(self, x):
        return np if x.device.type == "cpu" else backend.cupy

    def _rows(self, x):
        return int(np.prod(x.shape[:-1], dtype=np.int64))


class SparseDropLinear(_LinearBase):
    """SparseDrop on the input of a Linear: i.i.d. dropped (Mb, Kb) blocks of x (leading axes
    flattened to rows), skipped in all three GEMMs; a plain Linear in eval mode."""

    _device_step = True

    def __init__(self, in_features, out_features, p, block=_sparsedrop.DEFAULT_BLOCK, bias=True,
                 seed=0, layer=0, device=None, dtype=None):
        super().__init__(in_features, out_features, p, bias, seed, layer, device, dtype)
        self.block = tuple(block)

    def forward(self, x):
        self._check(x)
        if not self.training or self.p == 0:
            return self._dense(x)
        with _on_torch_stream(x):
            mask = _sparsedrop.draw_mask((self._rows(x), self.in_features), self.p,
                                         block=self.block, seed=self.seed, layer=self.layer,
                                         step=self._next_step(x), xp=self._xp(x))
        return sparsedrop_linear(x, self.weight, self.bias, mask=mask)


class SliceOutLinear(_LinearBase):
    """SliceOut on the input units of a Linear: one contiguous slice of units kept per step,
    the GEMMs run on ``x[..., S] @ W[S]``; a plain Linear in eval mode."""

    def __init__(self, in_features, out_features, p=0.5, bias=True, align="auto", seed=0,
                 layer=0, device=None, dtype=None):
        super().__init__(in_features, out_features, p, bias, seed, layer, device, dtype)
        self.align = _sliceout.check_align(_sliceout.auto_align(self.in_features)
                                           if align == "auto" else align)
        n = self.in_features  # fail at construction, not at the first training step
        _sliceout.num_starts(n, _sliceout.keep_count(n, self.p, self.align), self.align)

    def forward(self, x):
        self._check(x)
        if not self.training or self.p == 0:
            return self._dense(x)
        mask = _sliceout.draw_mask(self.in_features, self.p, seed=self.seed, layer=self.layer,
                                   step=self._next_step(x), align=self.align)
        return sliceout_linear(x, self.weight, self.bias, mask=mask)


class BlockwiseLinear(_LinearBase):
    """Block-wise gyro dropout fused into a Linear: ``mode='input'`` drops input blocks (input
    pruning), ``mode='output'`` drops output blocks after ``act`` (output pruning); a plain
    Linear (then ``act``) in eval mode. ``**schedule``: block, num_subnets, co_scheduled,
    period, schedule (see ``cudrop.variants.blockwise.draw_mask``)."""

    _device_step = True

    def __init__(self, in_features, out_features, p=0.5, mode="input", act=None, bias=True,
                 seed=0, layer=0, device=None, dtype=None, **schedule):
        super().__init__(in_features, out_features, p, bias, seed, layer, device, dtype)
        if mode not in ("input", "output"):
            raise ValueError(f"mode must be 'input' or 'output', got {mode!r}")
        if act not in (None, "relu") or (act is not None and mode == "input"):
            raise ValueError(f"act must be None, or 'relu' with mode='output', got {act!r}")
        self.mode, self.act, self.schedule = mode, act, schedule

    def forward(self, x):
        self._check(x)
        if not self.training or self.p == 0:
            y = self._dense(x)
            return torch.relu(y) if self.act == "relu" else y
        units = self.in_features if self.mode == "input" else self.out_features
        with _on_torch_stream(x):
            mask = _blockwise.draw_mask((self._rows(x), units), self.p, step=self._next_step(x),
                                        seed=self.seed, layer=self.layer, xp=self._xp(x),
                                        **self.schedule)
        if self.mode == "input":
            return blockwise_linear(x, self.weight, self.bias, mask=mask)
        return blockwise_linear_out(x, self.weight, self.bias, mask=mask, act=self.act)
