"""Captured CUDA graphs with parts that each launch runs or skips, through the CUDA driver API
of ``cuda-bindings`` (NVIDIA's Python binding, in the ``cuda13`` / ``cuda12`` extras).

Why not CuPy's ``Graph``: a node of an instantiated graph is named by its node in the captured
graph (``cuGraphNodeSetEnabled(exec, node, on)``), and CuPy destroys the captured graph right
after instantiating it. So a step with gated parts ends its capture here, keeps the captured
graph, and switches the parts' nodes on or off before a launch. A disabled node acts as an
empty one (its dependencies still order the rest) and a switch affects only later launches,
so the host sets the next replay's parts while the GPU still runs the previous one.

A part is a list of spans of the capture; a span is what was captured between two points,
each named by the capture's dependency set then (``cuStreamGetCaptureInfo``). Only kernel,
memset and memcpy nodes can be switched (the driver's rule); other nodes of a span (empty join
nodes) do no work anyway.
"""
from __future__ import annotations

try:
    from cuda.bindings import driver as _drv
except ImportError:  # pragma: no cover - depends on the machine
    _drv = None

_SWITCHABLE = () if _drv is None else (
    _drv.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL,
    _drv.CUgraphNodeType.CU_GRAPH_NODE_TYPE_MEMSET,
    _drv.CUgraphNodeType.CU_GRAPH_NODE_TYPE_MEMCPY)


def available() -> bool:
    return _drv is not None


def _call(fn, *args):
    """``fn(*args)``'s results after its CUresult, or RuntimeError naming ``fn``."""
    res = fn(*args)
    err, rest = (res[0], res[1:]) if isinstance(res, tuple) else (res, ())
    if err != _drv.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{fn.__name__} failed: {err.name if hasattr(err, 'name') else err}")
    return rest[0] if len(rest) == 1 else rest


def capture_point(stream_ptr: int) -> tuple:
    """The nodes the next work captured on the stream will depend on (node addresses)."""
    info = _call(_drv.cuStreamGetCaptureInfo, _drv.CUstream(stream_ptr))
    # (status, id, graph, dependencies, [edge data,] count)
    return tuple(int(n) for n in info[3])


def span_nodes(succ: dict, pred: dict, begin: tuple, end: tuple) -> set:
    """The nodes captured between the points ``begin`` and ``end``: those reachable from
    ``begin`` (after it) that reach ``end`` (``end`` included). ``succ`` / ``pred`` map a node
    to its dependents / dependencies. A span in which nothing was captured is empty."""
    if set(end) <= set(begin):
        return set()
    after, stack = set(), list(begin)
    if not begin:  # the span opened the capture: every node before end is in it
        after = None
    while stack:
        for m in succ.get(stack.pop(), ()):
            if m not in after:
                after.add(m)
                stack.append(m)
    upto, stack = set(end), list(end)
    while stack:
        for m in pred.get(stack.pop(), ()):
            if m not in upto:
                upto.add(m)
                stack.append(m)
    return upto if after is None else upto & after


class PartedGraph:
    """The graph a capture on ``stream_ptr`` recorded (the capture is ended here), instantiated,
    with ``parts``: ``{key: [(begin, end), ...]}`` spans from :func:`capture_point`."""

    def __init__(self, stream_ptr: int, parts: dict):
        self.graph = self.exec = None
        self.graph = _call(_drv.cuStreamEndCapture, _drv.CUstream(stream_ptr))
        n = _call(_drv.cuGraphGetNodes, self.graph, 0)[1]
        nodes = _call(_drv.cuGraphGetNodes, self.graph, n)[0]
        m = _call(_drv.cuGraphGetEdges, self.graph, 0)[-1]
        edges = _call(_drv.cuGraphGetEdges, self.graph, m) if m else ([], [])
        succ, pred = {}, {}
        for a, b in zip(edges[0], edges[1]):
            a, b = int(a), int(b)
            succ.setdefault(a, []).append(b)
            pred.setdefault(b, []).append(a)
        handle = {int(v): v for v in nodes}
        self.parts = {}
        for key, spans in parts.items():
            picked = set()
            for begin, end in spans:
                picked |= span_nodes(succ, pred, begin, end)
            self.parts[key] = [handle[a] for a in sorted(picked)
                               if _call(_drv.cuGraphNodeGetType, handle[a]) in _SWITCHABLE]
        self.num_nodes = len(nodes)
        self.exec = _call(_drv.cuGraphInstantiate, self.graph, 0)
        self.enabled = {key: True for key in parts}

    def enable(self, key, on: bool) -> None:
        """Run (``on``) or skip the part ``key`` from the next launch on."""
        on = bool(on)
        if self.enabled[key] != on:
            for node in self.parts[key]:
                _call(_drv.cuGraphNodeSetEnabled, self.exec, node, int(on))
            self.enabled[key] = on

    def launch(self, stream_ptr: int) -> None:
        _call(_drv.cuGraphLaunch, self.exec, _drv.CUstream(stream_ptr))

    def __del__(self):
        if _drv is None:
            return
        if self.exec is not None:
            _drv.cuGraphExecDestroy(self.exec)
        if self.graph is not None:
            _drv.cuGraphDestroy(self.graph)
