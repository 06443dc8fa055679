"""Gradient averaging across ranks: :class:`GradientReducer` (bucketed, overlapped with
backward, capturable) and :func:`all_reduce_gradients` (one plain pass after backward).

Buckets. The parameters, in reverse registration order (roughly the order backward finishes
them), are packed into buckets of about ``bucket_mb`` MiB, one dtype per bucket; each bucket is
one flat contiguous buffer in which every parameter's gradient has its slot (offsets aligned to
256 bytes). One all-reduce per bucket.

Overlap. The reducer registers a grad-ready hook on every parameter (the autograd's
``Tensor.register_grad_ready_hook``): when a parameter's gradient is final, it is copied into its
slot and ``.grad`` becomes a view of that slot; when every parameter of a bucket is in, the
bucket's all-reduce is enqueued on a side stream (after an event on the compute stream), while
backward goes on with the earlier layers. Buckets start strictly in bucket order, so every rank
issues the same collectives in the same order whatever order its gradients finish in.
:meth:`GradientReducer.finish` (call it between ``backward()`` and ``optimizer.step()``) starts
what is left and makes the compute stream wait for the side stream: nothing waits on the host,
so a step with a reducer can be captured whole by ``cudrop.graph.capture`` (NCCL calls are
capturable).

Parameters without a gradient. A parameter that backward did not reach (a depth-dropout branch
that was skipped) has zeros in its slot for the all-reduce and keeps ``.grad = None`` afterwards,
as on one process, so the optimizer skips it. This is consistent across ranks because skipping
decisions are the same on every rank (the mask rule of ``cudrop.distributed``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend, graph

__all__ = ["Bucket", "plan_buckets", "GradientReducer", "all_reduce_gradients",
           "DEFAULT_BUCKET_MB"]

#: The default bucket size in MiB (PyTorch DDP's).
DEFAULT_BUCKET_MB = 25
_ALIGN_BYTES = 256


class Bucket(NamedTuple):
    """One all-reduce: ``params`` (indices into the reducer's parameter list, in the order they
    are laid out), each at element ``offsets[i]`` of a flat buffer of ``size`` elements of
    ``dtype``."""
    dtype: np.dtype
    params: tuple
    offsets: tuple
    size: int


def plan_buckets(params, bucket_mb: float = DEFAULT_BUCKET_MB, align_bytes: int = _ALIGN_BYTES):
    """The buckets for ``params`` (Tensors, or anything with ``.data`` of a shape and dtype):
    reverse order, one dtype per bucket, a bucket closed when the next parameter would take it
    past ``bucket_mb`` MiB (a larger parameter gets a bucket of its own), slots aligned to
    ``align_bytes``. A pure function of the shapes and dtypes, so every rank plans alike."""
    if not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
    cap = float(bucket_mb) * 2 ** 20
    buckets, open_ = [], {}  # dtype -> (indices, offsets, size in elements)

    def close(dt):
        idx, offs, size = open_.pop(dt)
        buckets.append(Bucket(dt, tuple(idx), tuple(offs), size))

    for i in reversed(range(len(params))):
        a = params[i].data
        dt = np.dtype(a.dtype)
        align = max(1, align_bytes // dt.itemsize)
        if dt in open_:
            idx, offs, size = open_[dt]
            start = -(-size // align) * align
            if idx and (start + a.size) * dt.itemsize > cap:
                close(dt)
        if dt not in open_:
            open_[dt] = ([], [], 0)
        idx, offs, size = open_[dt]
        start = -(-size // align) * align
        idx.append(i)
        offs.append(start)
        open_[dt] = (idx, offs, start + int(a.size))
    for dt in list(open_):
        close(dt)
    return tuple(buckets)


class _ProcessGroupComm:
    """The process group as the reducer's communicator."""

    def all_reduce(self, array, op, stream=None):
        from . import group
        group.all_reduce(array, op, stream=stream)


def _default_comm():
    from . import group
    group._current()  # raises, naming init(), when not initialized
    return _ProcessGroupComm()


class GradientReducer:
    """Averages the gradients of ``params`` over the ranks, bucket by bucket, overlapped with
    backward (see the module docstring). ``params``: the model's parameters in registration
    order (``model.parameters()``), all on this rank's GPU (or all NumPy, with a ``comm`` of
    your own, for tests). ``comm``: anything with ``all_reduce(array, op, stream=None)``
    reducing in place; default the process group (``cudrop.distributed.init`` first).
    ``average``: 'avg' (the mean-loss gradient of the global batch) rather than 'sum'.

    Per step: ``loss.backward()``, then :meth:`finish`, then ``optimizer.step()``. The buckets
    are allocated once here; :meth:`close` removes the hooks.
    """

    def __init__(self, params, *, bucket_mb: float = DEFAULT_BUCKET_MB, comm=None,
                 average: bool = True):
        seen, plist = set(), []
        for p in params:
            if id(p) not in seen and getattr(p, "requires_grad", False):
                seen.add(id(p))
                plist.append(p)
        if not plist:
            raise ValueError("GradientReducer: no parameters that require a gradient")
        self.params = plist
        self.comm = _default_comm() if comm is None else comm
        self.op = "avg" if average else "sum"
        self.buckets = plan_buckets(plist, bucket_mb)
        xp = backend.get_array_module(*[p.data for p in plist])
        self.xp = xp
        self.flat = [xp.zeros(b.size, b.dtype) for b in self.buckets]
        self.where = {}  # param index -> (bucket index, view of its slot)
        for k, b in enumerate(self.buckets):
            for i, off in zip(b.params, b.offsets):
                p = plist[i]
                self.where[i] = (k, self.flat[k][off:off + p.data.size].reshape(p.data.shape))
        self.stream = backend.cupy.cuda.Stream(non_blocking=True) if xp is not np else None
        self.index = {id(p): i for i, p in enumerate(plist)}
        self.handles = [p.register_grad_ready_hook(self._ready) for p in plist]
        self._reset()

    def _reset(self):
        self.done = set()                       # params whose gradient is in its slot
        self.count = [0] * len(self.buckets)    # such params per bucket
        self.next = 0                           # the next bucket to start

    # ---- during backward ---------------------------------------------------------------
    def _ready(self, p):
        if graph.gate_of(p) is not None:
            # a bucket's all-reduce would land in the unit's gated part, and a replay that
            # skips the unit would skip it for the bucket's other parameters too
            raise graph.CaptureError("data-parallel gradient buckets cannot be captured with "
                                     "depth dropout or stochastic depth units yet")
        i = self.index[id(p)]
        if i in self.done:
            raise RuntimeError("GradientReducer: a second backward pass before finish(): call "
                               "finish() after every backward (accumulating gradients over "
                               "several backward passes is not supported)")
        self._take(i, p)
        k = self.where[i][0]
        self.count[k] += 1
        while self.next < len(self.buckets) and \
                self.count[self.next] == len(self.buckets[self.next].params):
            self._start(self.next)
            self.next += 1

    def _take(self, i, p):
        view = self.where[i][1]
        if p.grad is not view:
            if p.grad.dtype != view.dtype:
                raise TypeError(f"GradientReducer: parameter {i} has a {p.grad.dtype} gradient "
                                f"for {view.dtype} data")
            self.xp.copyto(view, p.grad)
            p.grad = view
        self.done.add(i)

    def _start(self, k):
        flat = self.flat[k]
        if self.stream is None:
            self.comm.all_reduce(flat, self.op)
            return
        cp = backend.cupy
        ready = cp.cuda.Event(disable_timing=True)
        ready.record(cp.cuda.get_current_stream())
        self.stream.wait_event(ready)
        self.comm.all_reduce(flat, self.op, stream=self.stream)

    # ---- after backward ----------------------------------------------------------------
    def finish(self):
        """Start the buckets not started yet (parameters without a gradient contribute zeros
        and keep ``.grad = None``) and make the current stream wait for the all-reduces. No host
        wait. Then ``.grad`` of every reached parameter is the average over the ranks."""
        absent = []
        for k in range(self.next, len(self.buckets)):
            for i in self.buckets[k].params:
                if i in self.done:
                    continue
                p = self.params[i]
                if p.grad is not None:  # reached on a path whose hook could not fire early
                    self._take(i, p)
                else:
                    self.where[i][1].fill(0)
                    absent.append(i)
        for k in range(self.next, len(self.buckets)):
            self._start(k)
        if self.stream is not None:
            cp = backend.cupy
            done = cp.cuda.Event(disable_timing=True)
            done.record(self.stream)
            cp.cuda.get_current_stream().wait_event(done)
        for i in absent:
            self.params[i].grad = None
        self._reset()

    def close(self):
        """Remove the hooks (the reducer does nothing more)."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def __repr__(self):
        sizes = ", ".join(f"{b.size * np.dtype(b.dtype).itemsize / 2 ** 20:.1f} MiB"
                          for b in self.buckets)
        return f"GradientReducer({len(self.params)} parameters in buckets of {sizes})"


def all_reduce_gradients(params, *, comm=None, average: bool = True):
    """Average the ``.grad`` of ``params`` over the ranks once, after backward (no overlap): one
    flat buffer per dtype, one all-reduce each. Every parameter has a slot (zeros where
    ``.grad`` is None, which stays None), so every rank reduces the same layout."""
    comm = _default_comm() if comm is None else comm
    op = "avg" if average else "sum"
    plist = [p for p in params if getattr(p, "requires_grad", False)]
    by_dtype = {}
    for p in plist:
        by_dtype.setdefault(np.dtype(p.data.dtype), []).append(p)
    for dt, ps in by_dtype.items():
        xp = backend.get_array_module(*[p.data for p in ps])
        flat = xp.zeros(sum(p.data.size for p in ps), dt)
        off = 0
        for p in ps:
            if p.grad is not None:
                flat[off:off + p.data.size] = p.grad.reshape(-1)
            off += p.data.size
        comm.all_reduce(flat, op)
        off = 0
        for p in ps:
            if p.grad is not None:
                p.grad = flat[off:off + p.data.size].reshape(p.data.shape)
            off += p.data.size
