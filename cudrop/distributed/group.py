"""The process group: one NCCL communicator per process (one process per GPU), the collectives
on CuPy arrays, and the guard against a rank that dies.

Hangs. A collective waits on the device for every rank; if one rank dies, the others' NCCL
kernels would wait forever and so would any host wait behind them. Two guards, both bounded by
``init(timeout=...)``:

- host waits in this module (``barrier``, ``synchronize``, ``save`` / ``load``) poll the device
  work with a deadline and ``ncclCommGetAsyncError``; on an error or at the deadline they abort
  the communicator (``ncclCommAbort``) and raise :class:`DistributedError`;
- a watchdog thread (started by ``init``) polls the asynchronous error and the work this module
  enqueued (every collective records an event after it, ``heartbeat`` marks more, e.g. a
  replayed CUDA graph); when something is older than the timeout, or NCCL reports an error, it
  prints which rank gave up and why, aborts the communicator and ends the process with status 1,
  whatever the main thread is blocked in (a loss read, a stream synchronisation). It also bounds
  ``ncclCommInitRank`` in ``init``.

Not covered: work enqueued inside a CUDA-graph capture is watched only through a ``heartbeat``
after the replay; a rank that hangs without dying (an endless loop on the host) is seen only as
its peers' timeout; NCCL may report a dead peer sooner by itself (network transports), or only
at the timeout (NVLink and shared memory within a host).
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time

import numpy as np

from .. import backend
from .env import LaunchEnv, read_env
from .rendezvous import exchange

__all__ = ["init", "destroy", "is_initialized", "rank", "world_size", "local_rank", "barrier",
           "all_reduce", "broadcast", "synchronize", "heartbeat", "broadcast_parameters",
           "save", "load", "DistributedError", "DEFAULT_TIMEOUT", "OPS"]

#: Seconds a rank waits for the others (rendezvous, a collective, a barrier) before it gives up.
DEFAULT_TIMEOUT = 300.0
#: The reductions ``all_reduce`` takes.
OPS = ("avg", "sum", "max", "min", "prod")
_NCCL_2_10 = 21000  # ncclAvg and ncclBfloat16 arrived in NCCL 2.10

_group = None  # the process group, once init() ran


class DistributedError(RuntimeError):
    """A collective failed or timed out (a rank died or hung); the communicator is aborted and
    this process cannot take part in collectives any more."""


class _Group:
    def __init__(self, env, nccl, device, timeout):
        self.env, self.nccl, self.device, self.timeout = env, nccl, device, float(timeout)
        self.version = nccl.get_version()
        self.comm = None
        self.watchdog = None
        self.flag = None  # a one-element device buffer for barrier and agreement


def init(backend_name: str = "nccl", *, timeout: float = DEFAULT_TIMEOUT,
         environ=None) -> LaunchEnv:
    """Join the job the launcher started (torchrun, ``cudrop launch``, mpirun or Slurm: see
    ``cudrop.distributed.env``) and build its NCCL communicator. This process uses GPU
    ``LOCAL_RANK`` (GPU 0 when it sees only one, e.g. under ``CUDA_VISIBLE_DEVICES`` per rank),
    made the current CuPy device. World size 1 needs no variables (a communicator of one rank:
    the whole path, on one GPU). ``timeout``: seconds any rank waits for the others before it
    fails (:class:`DistributedError`; see the module docstring). Returns the ``LaunchEnv``."""
    global _group
    if backend_name != "nccl":
        raise ValueError(f"cudrop.distributed.init: backend must be 'nccl' (the only one), got "
                         f"{backend_name!r}")
    if _group is not None:
        raise RuntimeError("cudrop.distributed is already initialized; call destroy() first")
    if not float(timeout) > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    env = read_env(environ)
    try:
        nccl = backend.nccl()
    except RuntimeError as e:
        raise RuntimeError(f"cudrop.distributed.init(backend='nccl'): {e}") from None
    if not backend.gpu_available():
        raise RuntimeError("cudrop.distributed.init(backend='nccl') needs a CUDA GPU per rank; "
                           "this process sees none")
    count = backend.gpu_count()
    device = env.local_rank if count > 1 else 0
    if device >= count:
        raise RuntimeError(f"rank {env.rank} has local rank {env.local_rank} but this host has "
                           f"{count} GPU(s): start at most {count} ranks per host")
    cp = backend.cupy
    cp.cuda.Device(device).use()
    group = _Group(env, nccl, device, timeout)
    group.watchdog = _Watchdog(group, _die)
    started = threading.Event()
    group.watchdog.watch(started.is_set, "joining the NCCL communicator")
    group.watchdog.start()
    try:
        uid = _id_to_bytes(nccl.get_unique_id()) if env.rank == 0 else None
        uid = exchange(env, uid, timeout)
        try:
            group.comm = nccl.NcclCommunicator(env.world_size, bytes(uid), env.rank)
        except TypeError:  # CuPy before 14 takes NCCL's id as a tuple of signed chars
            group.comm = nccl.NcclCommunicator(env.world_size, _id_from_bytes(uid), env.rank)
    except BaseException:
        group.watchdog.stop()
        raise
    started.set()
    group.flag = cp.zeros(1, np.int32)
    _group = group
    return env


def _id_to_bytes(uid):
    return bytes(b & 0xFF for b in uid)


def _id_from_bytes(data):
    return tuple(b - 256 if b > 127 else b for b in data)  # NCCL's id is signed chars


def destroy() -> None:
    """Leave the group: stop the watchdog and free the communicator (after the device has
    finished the work enqueued on it). Nothing happens when not initialized."""
    global _group
    g, _group = _group, None
    if g is None:
        return
    g.watchdog.stop()
    if g.comm is not None:
        g.comm.destroy()


def is_initialized() -> bool:
    """Whether :func:`init` ran (and :func:`destroy` has not)."""
    return _group is not None


def _current():
    if _group is None:
        raise RuntimeError("cudrop.distributed is not initialized: call "
                           "cudrop.distributed.init() first (under torchrun, cudrop launch, "
                           "mpirun or srun)")
    return _group


def rank() -> int:
    """This process's rank: the group's once initialized, before that what the launcher's
    variables say (0 without any)."""
    return (_group.env if _group is not None else read_env()).rank


def world_size() -> int:
    """The number of processes in the job (see :func:`rank` for before ``init``)."""
    return (_group.env if _group is not None else read_env()).world_size


def local_rank() -> int:
    """This process's index on its host, which picks its GPU (see :func:`rank`)."""
    return (_group.env if _group is not None else read_env()).local_rank


# ---- collectives ------------------------------------------------------------------------------

def _nccl_dtype(g, dtype):
    n = g.nccl
    name = np.dtype(dtype).name
    table = {"float32": n.NCCL_FLOAT32, "float64": n.NCCL_FLOAT64, "float16": n.NCCL_FLOAT16,
             "int8": n.NCCL_INT8, "uint8": n.NCCL_UINT8, "int32": n.NCCL_INT32,
             "uint32": n.NCCL_UINT32, "int64": n.NCCL_INT64, "uint64": n.NCCL_UINT64}
    if name == "bfloat16":
        if not hasattr(n, "NCCL_BFLOAT16") or g.version < _NCCL_2_10:
            raise TypeError(f"bfloat16 collectives need NCCL >= 2.10 and a CuPy that exports "
                            f"NCCL_BFLOAT16 (NCCL here: {g.version}); use float32 "
                            "(--precision fp32)")
        return n.NCCL_BFLOAT16
    if name not in table:
        raise TypeError(f"NCCL has no type for dtype {name}")
    return table[name]


def _check_array(g, a, what):
    if not backend.is_gpu_array(a):
        raise TypeError(f"{what} needs a CuPy array on this rank's GPU, got "
                        f"{type(a).__module__}.{type(a).__name__}")
    if a.device.id != g.device:
        raise ValueError(f"{what}: the array is on GPU {a.device.id}, this rank uses GPU "
                         f"{g.device}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} needs a C-contiguous array (reduce a copy, then copy back)")


def _stream(stream):
    return backend.cupy.cuda.get_current_stream() if stream is None else stream


def all_reduce(array, op: str = "avg", *, stream=None):
    """Reduce ``array`` (a C-contiguous CuPy array on this rank's GPU) over all ranks, in place,
    on ``stream`` (default: the current stream); returns it. ``op``: 'avg' (ncclAvg, or a sum
    then a scale by 1 / world size where NCCL predates 2.10), 'sum', 'max', 'min', 'prod'.
    bfloat16 arrays need NCCL >= 2.10. Enqueued only: nothing waits for the device (so it can be
    captured in a CUDA graph)."""
    g = _current()
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    _check_array(g, array, "all_reduce")
    n = g.nccl
    s = _stream(stream)
    scale = op == "avg" and g.version < _NCCL_2_10
    if scale and not backend.is_floating(array.dtype):
        raise TypeError(f"op='avg' on {array.dtype} needs NCCL >= 2.10")
    code = {"sum": n.NCCL_SUM, "max": n.NCCL_MAX, "min": n.NCCL_MIN, "prod": n.NCCL_PROD,
            "avg": n.NCCL_SUM if scale else getattr(n, "NCCL_AVG", 4)}[op]
    if array.size:
        g.comm.allReduce(array.data.ptr, array.data.ptr, array.size,
                         _nccl_dtype(g, array.dtype), code, s.ptr)
        if scale:
            with s:
                array *= array.dtype.type(1.0 / g.env.world_size)
    _watch(g, s, "an all_reduce")
    return array


def broadcast(array, root: int = 0, *, stream=None):
    """Copy rank ``root``'s ``array`` into every rank's ``array`` (same shape and dtype
    everywhere), in place, on ``stream`` (default: the current stream); returns it."""
    g = _current()
    _check_array(g, array, "broadcast")
    if not 0 <= root < g.env.world_size:
        raise ValueError(f"root must be a rank in [0, {g.env.world_size}), got {root}")
    s = _stream(stream)
    if array.size:
        g.comm.broadcast(array.data.ptr, array.data.ptr, array.size,
                         _nccl_dtype(g, array.dtype), int(root), s.ptr)
    _watch(g, s, "a broadcast")
    return array


def _watch(g, stream, what):
    from .. import graph
    if graph.is_capturing():
        return  # an event recorded inside a capture cannot be polled from the host
    ev = backend.cupy.cuda.Event(disable_timing=True)
    ev.record(stream)
    g.watchdog.watch(lambda: ev.done, what)


def heartbeat(what: str = "a training step") -> None:
    """Have the watchdog check that the work enqueued on the current stream so far finishes
    within the timeout (e.g. after launching a captured step, whose collectives it cannot see
    otherwise). Cheap: one event record. Nothing happens when not initialized."""
    if _group is not None:
        _watch(_group, _stream(None), what)


def synchronize(what: str = "the device's work") -> None:
    """Wait until the current stream's work is done, at most the timeout; a NCCL error or the
    deadline aborts the communicator and raises :class:`DistributedError` naming ``what``."""
    g = _current()
    ev = backend.cupy.cuda.Event(disable_timing=True)
    ev.record(_stream(None))
    _wait(g, ev, what)


def _wait(g, event, what):
    deadline = time.monotonic() + g.timeout
    delay = 1e-5
    while not event.done:
        reason = _async_error(g)
        if reason is None and time.monotonic() > deadline:
            reason = (f"{what} did not finish within {g.timeout:.0f} s: another rank probably "
                      "died or hung")
        if reason is not None:
            _abort(g)
            raise DistributedError(f"rank {g.env.rank}: {reason}; the NCCL communicator is "
                                   "aborted")
        time.sleep(delay)
        delay = min(2 * delay, 1e-3)


def barrier() -> None:
    """Wait until every rank has reached this call (a one-element all-reduce, waited for with
    the timeout)."""
    g = _current()
    all_reduce(g.flag, "sum")
    synchronize("a barrier")


def _agree(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (a host sync)."""
    g = _current()
    g.flag.fill(0 if ok else 1)
    all_reduce(g.flag, "sum")
    synchronize("an agreement between the ranks")
    return int(g.flag.get()[0]) == 0


def broadcast_parameters(model, root: int = 0) -> None:
    """Give every rank rank ``root``'s parameters and buffers (a ``Module``) or tensors (a list
    of Tensors), so that all ranks start from the same weights."""
    if hasattr(model, "named_buffers"):
        arrays = [p.data for p in model.parameters()]
        arrays += [getattr(m, b) for _, m, b in model.named_buffers()]
    else:
        arrays = [t.data for t in model]
    for a in arrays:
        if backend.is_gpu_array(a) and a.flags.c_contiguous:
            broadcast(a, root)
        else:
            raise TypeError("broadcast_parameters needs the model on this rank's GPU "
                            "(model.to('gpu')) with contiguous arrays")


def save(path, model, optimizer=None, schedule=None, **state):
    """``cudrop.save`` for a data-parallel job: rank 0 writes (atomically), every rank waits
    until it has, and a failure on rank 0 raises on every rank. Returns ``path``."""
    from .. import checkpoint
    barrier()
    error = None
    if rank() == 0:
        try:
            checkpoint.save(path, model, optimizer, schedule, **state)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others know
            error = e
    if not _agree(error is None):
        if error is not None:
            raise error
        raise DistributedError(f"rank 0 could not write the checkpoint {path!r}")
    return path


def load(path, model, optimizer=None, schedule=None, **kwargs) -> dict:
    """``cudrop.load`` on every rank of a data-parallel job, after a barrier (so a checkpoint
    rank 0 has just written is complete). Returns the extra state."""
    from .. import checkpoint
    barrier()
    return checkpoint.load(path, model, optimizer, schedule, **kwargs)


# ---- the watchdog ----------------------------------------------------------------------------

def _async_error(g):
    if g.comm is None:
        return None
    try:
        g.comm.check_async_error()
    except Exception as e:  # noqa: BLE001 - NcclError, or the comm already gone
        return f"NCCL reported an error: {e}"
    return None


def _abort(g):
    comm, g.comm = g.comm, None
    if comm is not None:
        try:
            comm.abort()
        except Exception:  # noqa: BLE001 - aborting is the last resort; nothing more to do
            pass


def _die(g, reason):
    print(f"cudrop.distributed: rank {g.env.rank}: {reason}; aborting the NCCL communicator "
          "and exiting", file=sys.stderr, flush=True)
    _abort(g)
    os._exit(1)


class _Watchdog(threading.Thread):
    """Polls the group's asynchronous NCCL error and the oldest unfinished watched work; calls
    ``on_fail(group, reason)`` once when either goes wrong (see the module docstring)."""

    def __init__(self, group, on_fail, poll=None):
        super().__init__(name="cudrop-nccl-watchdog", daemon=True)
        self.group, self.on_fail = group, on_fail
        self.poll = min(1.0, group.timeout / 10) if poll is None else poll
        self.items = collections.deque()
        self._stop_event = threading.Event()

    def watch(self, done, what):
        """Expect ``done()`` to become true within the timeout from now."""
        self.items.append((done, time.monotonic(), what))

    def stop(self):
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5.0)

    def check(self):
        """The reason to give up now, or None."""
        reason = _async_error(self.group)
        if reason is not None:
            return reason
        items = self.items
        while items and items[0][0]():
            items.popleft()
        if items:
            _, t0, what = items[0]
            if time.monotonic() - t0 > self.group.timeout:
                return (f"{what} did not finish within {self.group.timeout:.0f} s: another "
                        "rank probably died or hung")
        return None

    def run(self):
        if backend.gpu_available():
            backend.cupy.cuda.Device(self.group.device).use()  # the current device is per thread
        while not self._stop_event.wait(self.poll):
            reason = self.check()
            if reason is not None and not self._stop_event.is_set():
                self.on_fail(self.group, reason)
                return
