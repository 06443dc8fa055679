"""Argument checks that never make the host wait for the device.

A training step that reads a value back from the GPU cannot be captured in a CUDA graph, and
stalls the host's queue of launches either way. So an op never validates the *values* of a
device array on the host: :func:`check_index_range` launches one small kernel that records the
first bad index in a persistent per-device error record, and the host reads that record only at
a check point, :func:`check_errors`, where it raises.

The rule:

- On NumPy an op checks at once and raises :class:`IndexRangeError` itself.
- On the GPU an op with a bad index returns without raising, and its results (and whatever is
  computed from them) are garbage until the next check point, where the error is raised. The
  error is never lost: it stays in the record until a check point reads it, and the first
  failing call wins (a later one never overwrites it). With several bad elements in one call,
  the one reported is the lowest of one 4096-element chunk of the array (the chunks race), not
  necessarily the lowest of the whole array as on NumPy.
- The ops that consume the indices must stay inside their arrays on a bad index, so the garbage
  is never an out-of-bounds access: cudrop's gathers and scatters go through CuPy's integer
  indexing (``take``, ``take_along_axis``, ``add.at``), which wraps an out-of-range index into
  the axis (documented: "Differences between CuPy and NumPy", out-of-bounds indices). A custom
  kernel that consumes checked indices must clamp or wrap them itself.
- Check points: :func:`cudrop.check_errors` (anyone may call it), ``Tensor.item()`` and
  ``Tensor.numpy()`` of a GPU tensor (they wait for the device anyway), and the training loop
  (:class:`cudrop.train.Trainer`) where it reads its loss, at the end of each epoch, in
  evaluation and before it writes a checkpoint.
- A check point sees the failures of the work queued before it on the current stream of each
  device; with several streams, synchronise them first.
- CUDA graphs: a device's error record is allocated by the first check on it; run one step
  before capturing (as for CuPy's memory pool) so that the capture does not allocate it.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import backend
from ._memo import Memo

__all__ = ["IndexRangeError", "check_errors", "check_index_range"]

_THREADS = 256   # checks.cu: CD_CHECK_THREADS
_CHUNK = 4096    # checks.cu: CD_CHECK_CHUNK
_RECORD_WORDS = 4
_INT64 = np.iinfo(np.int64)


class IndexRangeError(IndexError, ValueError):
    """An index argument holds a value outside its valid range. The message names the op, the
    argument, the bad element's position and value and the range, e.g.
    ``cross_entropy: targets[17] = 12 is outside [0, 10)``. On the GPU it is raised at the
    next check point (:func:`check_errors`), not by the op. A ValueError too, as cudrop's
    other argument errors are."""


class CheckSite(NamedTuple):
    """What a check id stands for: the op, the argument, its shape and dtype, the range."""
    op: str
    arg: str
    shape: tuple
    dtype: np.dtype
    low: int
    high: int


# The id -> site registry and the per-device records are state, not caches: emptying them (as
# _memo.clear_caches does to caches) would lose a failure still waiting in a record, or the
# meaning of its id. The registry only grows with distinct (op, argument, shape, dtype, range).
_SITES: list = []
_SITE_IDS: dict = {}
_RECORDS: dict = {}  # device id -> that device's record, a CuPy uint64 array of _RECORD_WORDS
_CLEARED: dict = {}  # device id -> how many times a check point has cleared its record
_KERNELS = Memo().data  # (dtype, device id) -> the compiled check_index_range<I>

_C_TYPES = {("i", 1): "signed char", ("i", 2): "short", ("i", 4): "int", ("i", 8): "long long",
            ("u", 1): "unsigned char", ("u", 2): "unsigned short", ("u", 4): "unsigned int",
            ("u", 8): "unsigned long long"}
_NAMES = tuple(f"check_index_range<{t}>" for t in _C_TYPES.values())


def _message(site: CheckSite, pos: int, value: int) -> str:
    if len(site.shape) == 0:
        where = site.arg
    else:
        where = f"{site.arg}[{', '.join(str(int(i)) for i in np.unravel_index(pos, site.shape))}]"
    return f"{site.op}: {where} = {value} is outside [{site.low}, {site.high})"


def check_index_range(name: str, indices, low: int, high: int, op: str) -> None:
    """Check that every element of the integer array ``indices`` (the argument ``name`` of
    ``op``) lies in ``[low, high)``.

    NumPy: checked now; raises :class:`IndexRangeError` naming the first bad element. CuPy:
    one kernel launch records a failure on the device and this returns at once, without
    reading anything back; :func:`check_errors` raises it later.
    """
    if indices.dtype.kind not in "iu":
        raise TypeError(f"{op}: {name} must be an integer array, got dtype {indices.dtype}")
    low, high = int(low), int(high)
    if not (_INT64.min <= low <= high <= _INT64.max):
        raise ValueError(f"{op}: the range of {name} must satisfy low <= high within int64, got "
                         f"[{low}, {high})")
    if indices.size == 0:
        return
    if not backend.is_gpu_array(indices):
        _check_now(name, indices, low, high, op)
        return
    site = CheckSite(op, name, tuple(indices.shape), indices.dtype, low, high)
    site_id = _SITE_IDS.get(site)
    if site_id is None:
        site_id = _SITE_IDS[site] = len(_SITES)
        _SITES.append(site)
    cp = backend.cupy
    dev = cp.cuda.runtime.getDevice()
    idx = cp.ascontiguousarray(indices)
    n = idx.size
    _kernel(idx.dtype, dev)((-(-n // _CHUNK),), (_THREADS,),
                            (idx, np.int64(n), np.int64(low), np.int64(high),
                             np.uint64(site_id), _record(dev)))


def _check_now(name, indices, low, high, op):
    lo, hi = int(indices.min()), int(indices.max())
    if lo >= low and hi < high:
        return
    flat = np.asarray(indices).reshape(-1)
    bad = np.zeros(flat.shape, bool)
    if lo < low:
        bad |= flat < low
    if hi >= high:
        bad |= flat >= high
    pos = int(np.argmax(bad))
    site = CheckSite(op, name, tuple(indices.shape), indices.dtype, low, high)
    raise IndexRangeError(_message(site, pos, int(flat[pos])))


def _kernel(dtype, dev):
    f = _KERNELS.get((dtype, dev))
    if f is None:
        from .raw_kernels import kernel
        expr = f"check_index_range<{_C_TYPES[dtype.kind, dtype.itemsize]}>"
        f = _KERNELS[(dtype, dev)] = kernel("checks.cu", expr, _NAMES)
    return f


def error_record(dev):
    """The device's error record (word 0 is nonzero once a check failed), or None while no
    check has run there. The fused optimizers read it to skip an update computed from a step
    that saw a bad index."""
    return _RECORDS.get(dev)


def _record(dev):
    rec = _RECORDS.get(dev)
    if rec is None:
        rec = _RECORDS[dev] = backend.cupy.zeros(_RECORD_WORDS, np.uint64)
    return rec


def _raise_recorded(dev, words, generation=None) -> None:
    """Raise the failure in a device's record words (a host copy), after clearing the record on
    the device; nothing when the record is clean. ``generation``: the device's clear count when
    the copy was started; if a check point has cleared the record since, it read everything
    this copy holds and raised it already, so the copy is stale and is ignored."""
    if int(words[0]) == 0 or (generation is not None and generation != _CLEARED.get(dev, 0)):
        return
    site = _SITES[int(words[1])]
    pos = int(words[2])
    value = int(words[3]) if site.dtype.kind == "u" else int(words.view(np.int64)[3])
    with backend.cupy.cuda.Device(dev):
        _RECORDS[dev].fill(0)
    _CLEARED[dev] = _CLEARED.get(dev, 0) + 1
    raise IndexRangeError(_message(site, pos, value))


def check_errors() -> None:
    """Raise the first failure that cudrop's device-side checks recorded since the last check
    point, and clear it; nothing when there is none (or no check ever ran on a GPU).

    On the GPU an op given a bad index (a class target of ``cross_entropy`` outside the
    classes, an ``embedding`` index outside the table) does not raise: checking it on the host
    would make every call wait for the device. It records the failure on the device and
    computes garbage, without touching memory outside its arrays; the error is raised here, at
    the next check point, e.g. ``IndexRangeError: cross_entropy: targets[17] = 12 is outside
    [0, 10)`` (an IndexError and a ValueError). The first failure wins; it is never lost.
    ``Tensor.item()``, ``Tensor.numpy()`` of a GPU tensor and :class:`cudrop.train.Trainer`
    call this where they read from the device anyway. Costs one small device-to-host read per
    GPU used (it waits for the work queued on the current stream). On NumPy, ops raise at once.
    """
    for dev, rec in list(_RECORDS.items()):
        with backend.cupy.cuda.Device(dev):
            words = rec.get()
        _raise_recorded(dev, words)


class ErrorSnapshot:
    """A copy of every device's error record started now, without waiting for the device (the
    training loop takes one beside its loss copy): ``ready()`` polls, ``check()`` raises the
    failure the copy holds, as :func:`check_errors` does."""

    def __init__(self):
        self._copies = []
        for dev, rec in list(_RECORDS.items()):
            with backend.cupy.cuda.Device(dev):
                self._copies.append((dev, _CLEARED.get(dev, 0), backend.HostCopy(rec)))

    def ready(self) -> bool:
        return all(c.ready() for _, _, c in self._copies)

    def check(self) -> None:
        for dev, generation, copy in self._copies:
            _raise_recorded(dev, copy.array(), generation)
