"""Whole training steps as CUDA graphs: ``step = cudrop.graph.capture(train_step, model=...,
optimizer=..., schedule=...)``, then ``loss = step(x, y)`` for every batch. ``cudrop train``
(``--graph``, the default on one GPU) and ``cudrop.train.Trainer(capture=True)`` use it.

``train_step(*arrays)`` is ordinary eager code (forward, backward, ``optimizer.step()``, maybe
``schedule.step()``) returning the loss. The first ``warmup`` calls run it eagerly (real
training steps, which also fill a private memory pool); the next call records it once into a
CUDA graph on a side stream, and from then on each call copies the batch into the graph's static
input buffers and replays it: one launch for the whole step, no Python per op.

What changes from step to step without a re-capture:

- masks: a stochastic layer's step reaches the mask kernels as a device scalar
  (``StochasticLayer.next_step(device=True)``), so every replay draws the mask eager mode would
  draw at that step, bit for bit;
- optimizer scalars (learning rate, Adam's bias corrections) are device scalars too, so
  schedules keep working;
- before each replay the host computes all those scalars from its own counters (which it
  advances as the eager step would: layer steps, optimizer steps, schedule position) and copies
  them to the device in one transfer from pinned memory (a ring of buffers, so a copy never
  overwrites values the GPU has not read yet).

SliceOut's Linear layers (``SliceOutLinear``, the MLP models' SliceOut) are captured too:
their slice start is decided on the device from the replay's step (``raw_kernels/slice.cu``),
the slice eager mode draws at that step, and the kept units are gathered into fixed-size
buffers, so every shape in the graph stays fixed. So is element gyro dropout
(``GyroDropout``, the models' ``dropout='gyro'``): one kernel derives the replay's step's
sub-networks and their keep bits, another masks each row by its group's (ragged groups
included; ``raw_kernels/gyro.cu``), as eager mode does at that step; and block-wise gyro dropout
(``BlockwiseDropout``, ``BlockwiseLinear``): each row block's sub-network and the mask's
kept-block lists are drawn on the device from the replay's step, and the block-sparse GEMMs
read those lists.

Depth dropout and stochastic depth (batch mode) are captured with *gates*: their gate is a
pure function of the unit's step, so the host knows each replay's gates without asking the GPU.
A capture records every unit as kept; each gated unit's body -- its forward and its backward
(SGD's fused updates skip a dropped unit's parameters by reading its gate's device flag; the
other optimizers' updates of them are a gated part too) -- is recorded as a gated part of the
step, in one of two ways:

- pieces (the default): the capture is cut at the gated parts' edges and a replay launches the
  pieces in order, skipping the gated ones whose unit the host drops;
- conditional IF nodes (``capture(if_nodes=True)``; ``cudrop._driver``, CUDA 12.4+): one graph
  whose gated parts are IF nodes' bodies, their conditions set by one kernel at the head of the
  graph from the gates' flags uploaded with the replay's scalars: one launch a step.

Either way the GPU runs no dropped body, exactly as eager mode does not. Measured on the H200
(benchmarks/train_step.py, ResNet-56 batch 128, 2 parts a unit): IF nodes cost ~5 µs of GPU time
more per part than a piece boundary (fp32 depth dropout p = 0.25: 12.08 vs 11.76 ms a step,
bf16 8.16 vs 7.86), so pieces are the default; IF nodes save the host the ~110 piece launches a
step. The unit's output and its input gradient select on a device
scalar (the body's scale, or 0 when dropped), so a skipped body's stale buffers are never used;
the counters and optimizer step counts that a dropped body would not have advanced are put
back after the replay. A gated parameter must have optimizer state before it can be
captured (its first update creates it, which a graph cannot repeat), so the capture waits, in
eager steps, until every gated unit has been kept once (at most ``_GATE_WAIT`` more steps).

Layers that decide their structure on the host (the other SliceOut layers, per-sample
stochastic depth) cannot be captured: they raise
:class:`CaptureError` while capturing, and the step falls back to eager mode with one warning
naming the layer, never a wrong result. The same fallback happens for anything else that cannot
be captured (a host read of a device value, CuPy's own cuBLAS without nvmath-python), and for a
batch whose shapes differ from the captured ones (a short last batch runs eagerly).
"""
from __future__ import annotations

import warnings

import numpy as np

from . import _driver, backend, raw_kernels

__all__ = ["capture", "CapturedStep", "CaptureError", "scalar", "is_capturing",
           "refuse_capture", "gate", "Gate"]

_SLOTS = 4096  # device scalars per graph, per dtype
_RING = 4      # pinned staging buffers in flight
_DTYPES = (np.dtype(np.uint32), np.dtype(np.float32), np.dtype(np.float64))
_GATE_WAIT = 200  # eager steps a capture waits at most for every gated unit to be kept once

_recorder = None  # the capture in progress, or None


class CaptureError(RuntimeError):
    """Something in the step cannot be recorded into a CUDA graph."""


class _NotYet(CaptureError):
    """The step can be captured, but not at this call: gated parameters have no optimizer
    state yet (``missing``: their state dicts); try again once they have."""

    def __init__(self, msg, missing):
        super().__init__(msg)
        self.missing = missing


def is_capturing() -> bool:
    """True while :class:`CapturedStep` records a step."""
    return _recorder is not None


def refuse_capture(what: str, why: str = "") -> None:
    """Raise :class:`CaptureError` naming ``what`` (and ``why``, when given) when called during
    a capture (a layer whose mask structure is decided on the host calls this before
    deciding)."""
    if _recorder is not None:
        why = f" ({why})" if why else ""
        raise CaptureError(f"{what} decides its mask on the host{why}, which a CUDA graph would "
                           "freeze at the captured step")


def scalar(value, provider, dtype):
    """A per-step number: ``value`` itself eagerly; during a capture a 0-d device array of
    ``dtype`` that each replay fills with ``provider()``, evaluated on the host state *before*
    that step's host updates (e.g. a layer's step counter before it advances)."""
    if _recorder is None:
        return value
    return _recorder.slot(provider, np.dtype(dtype))


def gate(decide, name: str) -> "Gate":
    """A part of the step being captured that each replay runs or skips: ``decide()`` (host
    state before the replay's step, like :func:`scalar`'s providers) says whether it runs.
    Work recorded inside ``with gate:`` is the part, and so are the backward ops of the
    autograd functions created there and the optimizer updates of the parameters that only
    they give gradients to. Only during a capture."""
    if _recorder is None:
        raise RuntimeError("cudrop.graph.gate: only while a step is being captured")
    g = Gate(decide, name, _recorder)
    _recorder.gates.append(g)
    return g


class Gate:
    """One gated part of a captured step (see :func:`gate`): the host counters and optimizer
    states its work advances (put back after a replay that skips it)."""

    def __init__(self, decide, name, recorder):
        self.decide, self.name, self._rec = decide, name, recorder
        self.on = True  # this replay's decision (a capture records the part as running)
        self._flag = None
        self.counters = {}  # name -> increment of the module counters the part advances
        self.opt_states = []  # optimizer states whose step count the part's updates advance

    def scalar(self, value: float, dtype):
        """A device scalar: ``value`` rounded to ``dtype`` (as eager mode lifts a Python
        number into an array's dtype) in the replays that run the part, 0 in the others; held
        as float64 for float64, else float32 (which holds every 16-bit value exactly)."""
        dt = np.dtype(dtype)
        v = float(np.asarray(value, dt))
        return self._rec.slot(lambda: v if self.on else 0.0,
                              np.dtype(np.float64 if dt == np.float64 else np.float32))

    def flag(self):
        """``(index, array)``: the part's uint32 device flag among the replay's scalars, 1 in
        the replays that run it, 0 in the others (made on first use). Its IF nodes' condition;
        kernels outside the part read it to skip its work (SGD's fused updates)."""
        if self._flag is None:
            i = len(self._rec.providers[_DTYPES[0]])
            self._flag = (i, self._rec.slot(lambda: 1 if self.on else 0, _DTYPES[0]))
        return self._flag

    def __enter__(self):
        if self._rec.current is not None:
            raise CaptureError(f"{self.name}: gated parts cannot nest "
                               f"(inside {self._rec.current.name})")
        self._counters = self._rec.counters()
        switch(self)
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            switch(None)
        except Exception:  # noqa: BLE001
            if exc_type is None:
                raise
            # The body's error invalidated the capture, so ending its piece failed too: let the
            # body's error through (CapturedStep ends the capture and reports it).
            self._rec.current = None
            return
        after = self._rec.counters()
        for n, v in self._counters.items():
            if after[n] != v:
                self.counters[n] = self.counters.get(n, 0) + after[n] - v

    def undo(self, model) -> None:
        """Put back what a replay that skipped the part advanced on the host."""
        if self.counters:
            for n, m, c in model._named_counters():
                if n in self.counters:
                    object.__setattr__(m, c, getattr(m, c) - self.counters[n])
        for st in self.opt_states:
            st["step"] -= 1


def switch(g: "Gate | None") -> None:
    """Record what follows into gate ``g``'s part (None: into every replay). Autograd's
    backward and the optimizers call it per op / per parameter; a no-op eagerly and when ``g``
    is the current part. A part is a piece of its own (the piece being captured ends and the
    next begins), or with ``capture(if_nodes=True)`` the body of an IF node of the one graph."""
    rec = _recorder
    if rec is None or rec.current is g:
        return
    if rec.conditional:
        rec.leave_body()
        if g is not None:
            rec.enter_body(g)
    else:
        rec.pieces.append((rec.current, rec.stream.end_capture()))
        rec.stream.begin_capture(rec.mode)
    rec.current = g


def current_gate() -> "Gate | None":
    """The gate whose part is being recorded, or None (also eagerly)."""
    return None if _recorder is None else _recorder.current


def note_grad(leaf) -> None:
    """A leaf got a gradient inside the current gate (or none): a leaf gets all its gradients
    in one gate, or the part's stale gradient would mix with a running one."""
    rec = _recorder
    if rec is None:
        return
    g = rec.leaf_gates.setdefault(id(leaf), (rec.current, leaf))[0]
    if g is not rec.current:
        where = [x.name if x else "the ungated step" for x in (g, rec.current)]
        raise CaptureError(f"a parameter gets gradients both in {where[0]} and in {where[1]}")


def gate_of(leaf) -> "Gate | None":
    """The gate in which ``leaf`` got its gradient in the step being captured, or None."""
    rec = _recorder
    entry = None if rec is None else rec.leaf_gates.get(id(leaf))
    return None if entry is None else entry[0]


def require_state(optimizer) -> None:
    """_NotYet when a gated parameter has no optimizer state yet (its first update creates the
    state, which a graph would repeat at every replay)."""
    missing = [(g, st) for p, st in zip(optimizer.params, optimizer.state)
               if p.grad is not None and "step" not in st
               for g in (gate_of(p),) if g is not None]
    if missing:
        raise _NotYet(f"{missing[0][0].name} has not been kept in an eager step yet",
                      [st for _, st in missing])


class _Recorder:
    """Device scalars of one graph: a device buffer per dtype, their providers, and a ring of
    pinned host buffers the values are staged in; its gates, and how their parts are recorded
    (``conditional``: as IF nodes, see :meth:`enter_body`; else as pieces)."""

    def __init__(self, cp, stream=None, mode=None, counters=None, conditional=False):
        self.cp, self.stream, self.mode, self.counters = cp, stream, mode, counters
        self.gates, self.current, self.leaf_gates = [], None, {}
        self.pieces = []  # (gate or None, graph) in capture order
        self.conditional = conditional
        self.conds = []  # (condition handle, index of its gate's uint32 flag) per IF node
        self.body_of = None  # (the step's graph, the IF node) while capturing the node's body
        if conditional:
            # [n, handle_0, flag_0, handle_1, flag_1, ...]: filled once the capture ends
            self.cond_table = cp.zeros(1 + 2 * _SLOTS, np.uint64)
        self.device = {dt: cp.zeros(_SLOTS, dt) for dt in _DTYPES}
        self.providers = {dt: [] for dt in _DTYPES}
        self.ring = [({dt: backend.pinned_empty(_SLOTS, dt) for dt in _DTYPES}, None)
                     for _ in range(_RING)]
        self.next = 0

    def enter_body(self, g):
        """Record what follows as the body of a new IF node whose condition is ``g``'s flag
        for the replay; the step's capture goes on after the node (:meth:`leave_body`). The
        stream stops capturing the step's graph, captures the body, then resumes the step's
        graph after the node: one stream throughout, so one memory pool arena (a second
        stream for the bodies made the captured ResNet-56 step hold ~3x the eager step's
        memory on the H200)."""
        if len(self.conds) == _SLOTS:
            raise CaptureError(f"more than {_SLOTS} gated parts in one step")
        if not self.conds:  # ahead of every IF node: the one kernel that sets their conditions
            raw_kernels.kernel("graph.cu", "set_conditions")(
                (1,), (256,), (self.cond_table, self.device[_DTYPES[0]]))
        s = self.stream.ptr
        handle, node, body, step_graph = _driver.add_if_node(s)
        self.conds.append((handle, g.flag()[0]))
        _driver.end_capture(s)
        self.body_of = (step_graph, node)
        _driver.begin_capture_to_graph(s, body, self.mode)

    def leave_body(self):
        """End the IF node body being captured, if any, and resume the step's graph."""
        if self.body_of is not None:
            (step_graph, node), self.body_of = self.body_of, None
            s = self.stream.ptr
            _driver.end_capture(s)
            _driver.begin_capture_to_graph(s, step_graph, self.mode, after=node)

    def finish(self):
        """After the capture: give the condition kernel its table (handles are fixed now)."""
        if self.conds:
            t = np.zeros(1 + 2 * len(self.conds), np.uint64)
            t[0] = len(self.conds)
            t[1::2], t[2::2] = zip(*self.conds)
            self.cond_table[:t.size].set(t)

    def slot(self, provider, dt):
        if dt not in self.providers:
            raise TypeError(f"cudrop.graph.scalar: dtype must be one of "
                            f"{[d.name for d in _DTYPES]}, got {dt}")
        i = len(self.providers[dt])
        if i == _SLOTS:
            raise CaptureError(f"more than {_SLOTS} {dt} scalars in one step")
        self.providers[dt].append(provider)
        return self.device[dt][i]  # a view: no kernel, nothing recorded

    def upload(self, stream):
        """Stage every provider's value and copy them to the device on ``stream``."""
        host, event = self.ring[self.next]
        if event is not None:
            event.synchronize()  # only waits when the GPU is _RING replays behind
        for dt, fns in self.providers.items():
            if fns:
                buf = host[dt]
                for i, fn in enumerate(fns):
                    buf[i] = fn()
                self.device[dt][:len(fns)].set(buf[:len(fns)], stream=stream)
        event = self.cp.cuda.Event(disable_timing=True)
        event.record(stream)
        self.ring[self.next] = (host, event)
        self.next = (self.next + 1) % _RING


class _HostState:
    """The host counters a step advances: every module counter (layer steps, gyro periods),
    the optimizer's step counts, the schedule's position."""

    def __init__(self, model, optimizer, schedule):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule

    def snapshot(self):
        counters = {n: getattr(m, c) for n, m, c in self.model._named_counters()}
        opt = None
        if self.optimizer is not None:
            opt = (self.optimizer.steps, [st.get("step") for st in self.optimizer.state],
                   self.optimizer.lr)
        sched = None if self.schedule is None else self.schedule.state_dict()
        return counters, opt, sched

    def grads(self):
        """Every parameter with a host copy of its ``.grad`` now (the model's and the
        optimizer's): a capture that does not finish must give them back, or they would keep
        the arrays it recorded but never computed (see :meth:`CapturedStep._capture`). Host
        copies, not the device arrays: holding those would keep a second set of gradients alive
        through the capture (a step frees the old ones when it zeroes them), and the captured
        step's memory would grow by a gradient set."""
        params = {id(p): p for p in self.model.parameters()}
        if self.optimizer is not None:
            params.update((id(p), p) for p in self.optimizer.params)
        return [(p, None if p.grad is None else backend.asnumpy(p.grad))
                for p in params.values()]

    def restore(self, snap):
        counters, opt, sched = snap
        for n, m, c in self.model._named_counters():
            object.__setattr__(m, c, counters[n])
        if sched is not None:
            self.schedule.load_state_dict(sched)  # before the lr below, which it would rewrite
        if opt is not None:
            self.optimizer.steps = opt[0]
            for st, s in zip(self.optimizer.state, opt[1]):
                if s is None:
                    st.pop("step", None)
                else:
                    st["step"] = s
            self.optimizer.lr = opt[2]

    def delta(self, before, after):
        """What one step adds: per-counter increments, optimizer step increments, schedule
        steps."""
        counters = {n: after[0][n] - v for n, v in before[0].items() if after[0][n] != v}
        opt = None
        if before[1] is not None:
            opt = (after[1][0] - before[1][0],
                   [(a or 0) - (b or 0) for a, b in zip(after[1][1], before[1][1])])
        sched = None if before[2] is None else after[2]["last_step"] - before[2]["last_step"]
        return counters, opt, sched

    def advance(self, delta):
        counters, opt, sched = delta
        if counters:
            for n, m, c in self.model._named_counters():
                if n in counters:
                    object.__setattr__(m, c, getattr(m, c) + counters[n])
        if opt is not None:
            self.optimizer.steps += opt[0]
            for st, d in zip(self.optimizer.state, opt[1]):
                if d:
                    st["step"] = st.get("step", 0) + d
        for _ in range(sched or 0):
            self.schedule.step()


class CapturedStep:
    """A training step replayed from a CUDA graph (see the module docstring); built by
    :func:`capture`."""

    def __init__(self, fn, model, optimizer=None, schedule=None, warmup=2, if_nodes=False):
        cp = backend.cupy
        if cp is None or not backend.gpu_available():
            raise RuntimeError("cudrop.graph.capture needs CuPy and a CUDA GPU")
        self.fn, self.warmup = fn, int(warmup)
        self.state = _HostState(model, optimizer, schedule)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.pool = cp.cuda.MemoryPool()
        self.graph = None
        self.failed = None  # why capturing failed: then every call is eager
        # gated parts as IF nodes of one graph when asked; pieces after a capture with IF
        # nodes failed (conditional_error says why)
        self.conditional = bool(if_nodes)
        if self.conditional and not _driver.available():
            raise RuntimeError("cudrop.graph.capture(if_nodes=True): this CUDA driver has no "
                               "conditional graph nodes (CUDA 12.4+)")
        self.conditional_error = None
        self.calls = self.waited = 0
        self.missing = ()  # optimizer states the last capture found missing (see _NotYet)
        self.static_in = self.static_out = self.recorder = self.delta = None

    # ---- running on the side stream with the private pool -------------------------------
    def _on_stream(self, body):
        cp = backend.cupy
        caller = cp.cuda.get_current_stream()
        self.stream.wait_event(caller.record())
        with cp.cuda.using_allocator(self.pool.malloc), self.stream:
            out = body()
        caller.wait_event(self.stream.record())
        return out

    def _shapes(self, inputs):
        return tuple((a.shape, a.dtype) for a in inputs)

    def __call__(self, *inputs):
        self.calls += 1
        if self.failed is not None or self.calls <= self.warmup:
            return self._on_stream(lambda: self.fn(*inputs))
        if self.graph is None:
            if any("step" not in st for st in self.missing):  # no capture can succeed yet
                self.waited += 1
                if self.waited > _GATE_WAIT:
                    self.failed = CaptureError(f"gated units were not all kept in {_GATE_WAIT} "
                                               "eager steps")
                    warnings.warn(f"cudrop.graph: this step cannot be captured: {self.failed}; "
                                  "it runs eagerly from now on", RuntimeWarning, stacklevel=2)
                return self._on_stream(lambda: self.fn(*inputs))
            self._capture(inputs)
            if self.graph is None:  # failed, or gated units not ready yet
                return self._on_stream(lambda: self.fn(*inputs))
        if self._shapes(inputs) != self._shapes(self.static_in):
            return self.fn(*inputs)  # another batch shape: eager, on the default pool
        return self._on_stream(lambda: self._replay(inputs))

    def _capture(self, inputs):
        cp = backend.cupy
        self.static_in = [cp.array(a, copy=True) for a in inputs]
        before = self.state.snapshot()
        grads = self.state.grads()
        model = self.state.model
        mode = getattr(cp.cuda.runtime, "streamCaptureModeRelaxed", 2)
        self.recorder = rec = _Recorder(cp, self.stream, mode, lambda: {
            n: getattr(m, c) for n, m, c in model._named_counters()}, self.conditional)

        def end():
            last = self.stream.end_capture()
            rec.finish()
            return _PiecedGraph(rec.pieces + [(None, last)]) if rec.pieces else last

        def record():
            global _recorder
            if rec.conditional:  # compiled and loaded outside the capture
                raw_kernels.kernel("graph.cu", "set_conditions")
            _recorder = rec
            self.stream.begin_capture(mode)
            try:
                out = self.fn(*self.static_in)
                switch(None)
            except BaseException:
                _recorder = None
                try:  # end the (possibly invalidated) capture; the step's own error is the report
                    rec.leave_body()
                except Exception:  # noqa: BLE001
                    pass
                try:
                    self.stream.end_capture()
                except Exception:  # noqa: BLE001
                    pass
                raise
            _recorder = None
            return out, end()

        def abandon():
            # The attempt recorded work that never ran: put back the host counters it advanced
            # and the parameters' .grad, which would otherwise hold its never-computed arrays
            # (the eager step that follows would add its gradients to them, or update a dropped
            # unit's parameters with them, when it zeroes gradients after the update).
            self.state.restore(before)
            for p, g in grads:
                p.grad = None if g is None else backend.to_device(g, "gpu")

        try:
            self.static_out, self.graph = self._on_stream(record)
        except _NotYet as e:  # the next calls run eagerly until the missing states exist
            abandon()
            self.graph, self.recorder, self.missing = None, None, e.missing
            return
        except Exception as e:  # noqa: BLE001 - any failure means: run eagerly
            abandon()
            self.graph = None
            if self.conditional:  # the next call captures again, gated parts as pieces
                self.conditional, self.conditional_error = False, e
                warnings.warn(f"cudrop.graph: capturing with IF nodes failed "
                              f"({type(e).__name__}: {e}); trying again with gated parts as "
                              "separate pieces", RuntimeWarning, stacklevel=3)
                return
            self.failed = e
            warnings.warn(f"cudrop.graph: this step cannot be captured ({type(e).__name__}: "
                          f"{e}); it runs eagerly from now on", RuntimeWarning, stacklevel=3)
            return
        after = self.state.snapshot()
        self.delta = self.state.delta(before, after)
        self.state.restore(before)
        # The step's working memory lives in the private pool from now on, so the default pool's
        # free cached blocks (the model set-up's temporaries, which eager steps would reuse)
        # would sit idle beside it: released (H200, MLP bf16: 96 MB, a captured step held 1.17x
        # the eager step's memory).
        cp.get_default_memory_pool().free_all_blocks()

    def _replay(self, inputs):
        for dst, src in zip(self.static_in, inputs):
            dst[...] = src
        gates = self.recorder.gates
        for g in gates:  # on the host state before the step, as the scalars' providers
            g.on = bool(g.decide())
        self.recorder.upload(self.stream)
        self.graph.launch(self.stream)
        self.state.advance(self.delta)
        for g in gates:
            if not g.on:
                g.undo(self.state.model)
        return self.static_out


class _PiecedGraph:
    """A captured step cut into pieces at its gated parts' edges: ``launch`` runs them in
    order and skips a gated piece whose gate is off for this replay."""

    def __init__(self, pieces):
        self.pieces = pieces

    def launch(self, stream):
        for g, piece in self.pieces:
            if g is None or g.on:
                piece.launch(stream)


def capture(fn, *, model, optimizer=None, schedule=None, warmup=2, if_nodes=False):
    """Wrap ``fn(*arrays) -> loss`` (one eager training step of ``model`` with ``optimizer``
    and ``schedule``) so that after ``warmup`` eager calls it is recorded once into a CUDA graph
    and replayed for every later batch of the same shapes. Returns a :class:`CapturedStep`;
    calling it returns ``fn``'s output (from the replay: a buffer that the next call
    overwrites; copy it to keep it). Masks, learning rates and optimizer state evolve exactly as
    in eager mode. Falls back to eager mode, with one warning, when the step cannot be captured.
    ``if_nodes``: record gated parts (depth dropout's units) as conditional IF nodes of one
    graph (True: one launch a step, the least host time), or as pieces of their own (False, the
    default: the faster GPU step, see the module docstring).
    """
    return CapturedStep(fn, model, optimizer, schedule, warmup, if_nodes)
