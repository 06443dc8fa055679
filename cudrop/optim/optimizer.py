"""Optimizer base: parameter bookkeeping, per-parameter state, checkpointing.

Subclasses implement ``_update(w, g, state, xp)`` on raw arrays; the base class handles the
skipping of parameters without a gradient, low-precision parameters and state round trips.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import _checks, backend, graph, raw_kernels

__all__ = ["Optimizer"]


def check_number(name: str, value, low=None, high=None, low_open=False, high_open=False):
    """Return ``value`` as a float, raising ValueError naming ``name`` when it is out of range."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    lo_bad = low is not None and (v <= low if low_open else v < low)
    hi_bad = high is not None and (v >= high if high_open else v > high)
    if lo_bad or hi_bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        if low is not None and high is not None:
            rng = f"in {lo}, {hi}"
        elif low is not None:
            rng = f"{'>' if low_open else '>='} {low}"
        else:
            rng = f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"{name} must be {rng}, got {value!r}")
    return v


def state_dtype(dtype):
    """The dtype optimizer state and update arithmetic use for parameters of ``dtype``.

    float16/bfloat16 parameters train in mixed precision: the optimizer keeps a float32 master
    copy of each (state ``"master"``), applies every update to it in float32 and writes the
    rounded result back to the parameter, so updates below half a unit in the last place of the
    half-precision weight accumulate instead of being lost; moments are float32 too (v ~ g**2
    underflows float16).
    """
    if dtype.itemsize <= 2:
        return np.dtype(np.float32)
    return dtype


class Optimizer:
    """Base class. ``params``: an iterable of Tensors (duplicates are dropped); ``lr``: the
    learning rate, a plain attribute that schedules rewrite between steps."""

    _hyper = ()  # names of the subclass's hyperparameters, saved by state_dict

    def __init__(self, params, lr):
        if hasattr(params, "data") and hasattr(params, "grad"):
            params = [params]
        seen, plist = set(), []
        for i, p in enumerate(params):
            if not (hasattr(p, "data") and hasattr(p, "grad")):
                raise TypeError(f"params[{i}] must be a Tensor, got {type(p).__name__}")
            if not backend.is_floating(p.data.dtype):
                raise TypeError(f"params[{i}] has dtype {p.data.dtype}; only floating-point "
                                "tensors can be optimized")
            if id(p) not in seen:
                seen.add(id(p))
                plist.append(p)
        if not plist:
            raise ValueError("params is empty: the optimizer got no tensors to update")
        self.params = plist
        self.lr = lr
        self.state = [{} for _ in plist]
        self.steps = 0  # calls to step()

    # lr is validated on every write, because schedules and users set it between steps.
    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = check_number("lr", value, low=0.0)

    def _validate(self):  # pragma: no cover - overridden
        pass

    def hyperparams(self) -> dict:
        return {k: getattr(self, k) for k in self._hyper}

    def __repr__(self):
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams().items())
        return f"{type(self).__name__}({len(self.params)} tensors, lr={self.lr!r}" + \
            (f", {hp})" if hp else ")")

    # ---- the update ---------------------------------------------------------------------
    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self, *, skip=None, inv_scale=None):
        """Update every parameter that has a gradient, in place on ``p.data``.

        ``p.grad`` is never written: autograd may hand the same array to several leaves.
        ``skip`` (None or a 0-d array on the parameters' device): where it is nonzero the update
        is skipped -- decided on the device, without a host read, so parameters, master copies
        and moments keep their values; the step counters still advance. ``inv_scale`` (None or
        a 0-d float32 array): each gradient is multiplied by it, in the state's precision, as it
        is read. :class:`~cudrop.optim.LossScaler` passes both. On the GPU a failure recorded
        by a device-side check (a bad label earlier in the step) skips the update the same way.
        """
        guard = None  # (skip flag, inv_scale) for the fused kernels, made once per step
        # In a capture with gated parts (depth dropout: graph.gate), a gated parameter's update
        # is skipped when a replay skips its part: the fused kernel reads the gate's device flag
        # (_gates_in_kernel) in the ungated launch, else the update is recorded into the part.
        gates = None
        if graph.is_capturing():
            graph.require_state(self)
            gates = [graph.gate_of(p) for p in self.params]
        # Fused updates are batched per run of parameters of one dtype and one gate: one
        # _fused_many call (one kernel for up to 48 parameters) for each run.
        batch, batch_key = [], None

        def flush():
            if batch:
                graph.switch(batch_key[1])
                self._fused_many(batch, guard)
                batch.clear()

        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            xp = backend.get_array_module(p.data, g)
            if g.shape != p.data.shape:
                raise ValueError(f"params[{i}].grad has shape {g.shape}, expected "
                                 f"{p.data.shape}")
            sdt = state_dtype(p.data.dtype)
            st = self.state[i]
            if p.data.dtype == sdt:
                w = p.data
            else:  # the float32 master copy is what trains; the parameter is its rounding
                w = st.get("master")
                if w is None:
                    w = st["master"] = p.data.astype(sdt)
            st["step"] = st.get("step", 0) + 1
            if xp is np:
                if skip is not None and bool(skip):
                    continue
            gate = None if gates is None else gates[i]
            if gate is not None:
                gate.opt_states.append(st)
            if xp is not np and self._fuses(p.data, g):
                if guard is None:
                    # Every later update reads the guard (a kernel's output with a loss scaler):
                    # recorded outside the gated parts, or a replay that skips the part that made
                    # it would hand the other updates a stale skip flag.
                    graph.switch(None)
                    guard = (_device_flag(skip), null_or(inv_scale))
                flag = None
                if gate is not None and self._gates_in_kernel:
                    gate, flag = None, gate.flag()[1]
                if batch_key != (p.data.dtype, gate):
                    flush()
                    batch_key = (p.data.dtype, gate)
                batch.append(Fused(p.data, None if w is p.data else w, g, st, flag))
                continue
            flush()
            graph.switch(gate)
            g = g.astype(sdt, copy=False)
            if inv_scale is not None:
                g = g * inv_scale.astype(sdt)
            if skip is not None and xp is not np:
                self._update_unless(skip, w, g, st, xp)
            else:
                self._update(w, g, st, xp)
            if w is not p.data:
                p.data[...] = w
        flush()
        graph.switch(None)
        self.steps += 1

    def _update_unless(self, skip, w, g, state, xp):
        """``_update``, then every array it changed put back where ``skip`` is set, on the
        device (the unfused optimizers' skip: a copy of the weight and the state per step)."""
        old = {k: v.copy() for k, v in state.items() if hasattr(v, "shape")}
        w_old = w.copy()
        self._update(w, g, state, xp)
        cond = skip != 0
        xp.copyto(w, w_old, where=cond)
        for k, v in state.items():
            if hasattr(v, "shape"):
                if k in old:
                    xp.copyto(v, old[k], where=cond)
                else:  # created by this step: as if never created (zeros start the same)
                    xp.copyto(v, xp.zeros((), v.dtype), where=cond)

    def _update(self, w, g, state, xp):  # pragma: no cover - abstract
        raise NotImplementedError

    # An optimizer whose update is one kernel (raw_kernels/optim.cu) on CuPy arrays defines
    # _fused_many(batch, guard): the updates of a run of parameters of one dtype (Fused tuples),
    # launched through launch_fused; guard is Optimizer.step's (skip flag, inv_scale).
    _fused_many = None
    # Whether _fused_many passes Fused.gate to its kernel: one launch serves gated and ungated
    # parameters alike (SGD: every parameter steps with the same scalars). Adam's step size
    # depends on each parameter's step count, which a skipped unit does not advance: its gated
    # updates stay in their parts.
    _gates_in_kernel = False

    def _fuses(self, p, g):
        return (self._fused_many is not None and g.dtype == p.dtype and p.flags.c_contiguous
                and g.flags.c_contiguous)

    # ---- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """A snapshot (copied arrays, on the parameters' device) that ``load_state_dict``
        restores, so training resumes exactly where it stopped."""
        state = {}
        for i, st in enumerate(self.state):
            if st:
                state[i] = {k: (v.copy() if hasattr(v, "shape") else v) for k, v in st.items()}
        return {"type": type(self).__name__, "lr": self.lr, "steps": self.steps,
                "hyper": self.hyperparams(), "state": state}

    def load_state_dict(self, sd: dict):
        if sd.get("type") != type(self).__name__:
            raise ValueError(f"state_dict is from a {sd.get('type')!r} optimizer, this is a "
                             f"{type(self).__name__!r}")
        new_state = [{} for _ in self.params]
        for key, st in sd["state"].items():
            i = int(key)
            if not 0 <= i < len(self.params):
                raise ValueError(f"state_dict has state for parameter {i}, but this optimizer "
                                 f"holds {len(self.params)} parameters")
            p = self.params[i]
            dev = "gpu" if backend.is_gpu_array(p.data) else "cpu"
            sdt = state_dtype(p.data.dtype)
            for k, v in st.items():
                if hasattr(v, "shape"):
                    if tuple(v.shape) != tuple(p.data.shape):
                        raise ValueError(f"state_dict entry {k!r} of parameter {i} has shape "
                                         f"{tuple(v.shape)}, expected {p.data.shape}")
                    v = backend.to_device(v, dev).astype(sdt, copy=True)
                new_state[i][k] = v
        old = {k: getattr(self, k) for k in self._hyper}
        try:
            for k, v in sd.get("hyper", {}).items():
                if k in self._hyper:
                    setattr(self, k, v)
            self._validate()
            self.lr = sd["lr"]
        except Exception:
            for k, v in old.items():
                setattr(self, k, v)
            raise
        self.state = new_state
        self.steps = int(sd.get("steps", 0))


class Fused(NamedTuple):
    """One parameter's fused update: the parameter, its float32 master copy (16-bit parameters;
    else None), its gradient, its state, and in a captured step the device flag of the gate
    whose unit gives it its gradient (``Gate.flag``; the kernel skips the update where it is
    0), or None."""
    p: object
    master: object
    grad: object
    state: dict
    gate: object = None


_NULL = np.uintp(0)


def null_or(a):
    """A kernel's pointer argument: the array, or null for None."""
    return _NULL if a is None else a


def step_scalar(value):
    """A per-step number as the fused kernels take it: (device pointer or null, value)."""
    if isinstance(value, float):
        return _NULL, np.float64(value)
    return value, np.float64(0.0)


def _device_flag(skip):
    """The skip flag the fused kernels read: a nonzero first word when the device's error
    record holds a failure (a bad label or index earlier in the step: its gradients are
    garbage) or ``skip`` is set; null when neither can be."""
    rec = _checks.error_record(backend.cupy.cuda.runtime.getDevice())
    if skip is None:
        return null_or(rec)
    skip = skip.astype(np.uint64, copy=False)
    return skip if rec is None else backend.cupy.bitwise_or(rec[0], skip)


# optim.cu's cd_multi_table: MULTI parameters' sizes, cumulative block ends, pointers and
# first-step flags, passed by value (CuPy passes a NumPy structured scalar as the struct).
MULTI = 48
_TABLE = np.dtype([("n", "<i8", (MULTI,)), ("block_end", "<i8", (MULTI,)),
                   ("p", "<u8", (MULTI,)), ("master", "<u8", (MULTI,)), ("grad", "<u8", (MULTI,)),
                   ("state1", "<u8", (MULTI,)), ("state2", "<u8", (MULTI,)),
                   ("gate", "<u8", (MULTI,)), ("first", "<i4", (MULTI,))])
# Blocks of 256 threads a parameter at most (larger parameters are strided through).
_MAX_BLOCKS = 8192


class TableEntry(NamedTuple):
    """One parameter of a fused launch: the parameter, its float32 master copy or None, its
    gradient, its state arrays (SGD: momentum buffer or None, None; Adam: m, v), whether the
    first state array is new (SGD's first step with momentum) and its gate's device flag
    (:attr:`Fused.gate`)."""
    p: object
    master: object
    grad: object
    state1: object
    state2: object = None
    first: bool = False
    gate: object = None


def _ptr(a):
    return 0 if a is None else a.data.ptr


def launch_fused(fn, entries, args, guard, *, vector=False):
    """Launch optim.cu's ``fn`` over ``entries`` (:class:`TableEntry`, one dtype), ``MULTI``
    parameters a launch; ``args`` follow the table and the count, then ``guard`` = (skip flag,
    inv_scale) from :meth:`Optimizer.step`: the kernel leaves everything untouched when the flag
    is set, so nothing is half-updated when the host raises a recorded error at its next check
    point or a loss scaler skips an overflowed step. ``vector``: the kernel moves 16 bytes of
    state a thread (SGD), so a parameter needs fewer blocks."""
    entries = [e for e in entries if e.p.size]
    for lo in range(0, len(entries), MULTI):
        chunk = entries[lo:lo + MULTI]
        k = len(chunk)
        table = np.zeros(1, _TABLE)
        row = table[0]
        per_block = [256 * (16 // state_dtype(e.p.dtype).itemsize if vector else 1)
                     for e in chunk]
        row["block_end"][:k] = np.cumsum([min(-(-e.p.size // b), _MAX_BLOCKS)
                                          for e, b in zip(chunk, per_block)])
        row["n"][:k] = [e.p.size for e in chunk]
        for field in ("p", "master", "grad", "state1", "state2", "gate"):
            row[field][:k] = [_ptr(getattr(e, field)) for e in chunk]
        row["first"][:k] = [e.first for e in chunk]
        # --fmad=false: no multiply-add contraction, so the fused update rounds exactly as the
        # unfused CuPy expressions do
        raw_kernels.launch("optim.cu", fn, chunk[0].p.dtype, (int(row["block_end"][k - 1]),),
                           (256,), (row, np.int32(k)) + args + guard, ("--fmad=false",))
