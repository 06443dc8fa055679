"""The CUDA driver calls behind conditional graph nodes, which CuPy 14 does not bind (its PR
cupy/cupy#8615 is unmerged): ``ctypes`` over ``libcuda`` (the driver library, present wherever
a GPU is; no toolkit or extra wheel needed). ``cudrop.graph.capture(if_nodes=True)`` records
each gated part of a captured step (a depth-dropout unit's forward or backward) as the body of
an IF node, so that one graph launch runs a step and the GPU skips a dropped body by itself.
Not the default: on the H200 an IF node costs ~5 µs of GPU time more than the boundary between
two separately launched graph pieces (cudrop/graph.py's docstring has the numbers).

Driver API names and signatures as of CUDA 12.4 (the versioned symbols CUDA 13's ``cuda.h``
maps its names to); an older driver lacks some, and :func:`available` says False.
"""
from __future__ import annotations

import ctypes

from ._memo import memoize

__all__ = ["available", "add_if_node", "begin_capture_to_graph", "end_capture"]

_COND_TYPE_IF = 0
_NODE_TYPE_CONDITIONAL = 13
_COND_ASSIGN_DEFAULT = 1
_SET_CAPTURE_DEPENDENCIES = 1
_P, _U, _SZ = ctypes.c_void_p, ctypes.c_uint, ctypes.c_size_t
_SIGNATURES = {  # name -> argtypes (every one returns a CUresult)
    "cuDriverGetVersion": [ctypes.POINTER(ctypes.c_int)],
    "cuCtxGetCurrent": [ctypes.POINTER(_P)],
    "cuStreamGetCaptureInfo_v3": [_P, ctypes.POINTER(ctypes.c_int),
                                  ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(_P),
                                  ctypes.POINTER(_P), ctypes.POINTER(_P), ctypes.POINTER(_SZ)],
    "cuGraphConditionalHandleCreate": [ctypes.POINTER(ctypes.c_uint64), _P, _P, _U, _U],
    "cuGraphAddNode_v2": [ctypes.POINTER(_P), _P, _P, _P, _SZ, _P],
    "cuStreamUpdateCaptureDependencies_v2": [_P, ctypes.POINTER(_P), _P, _SZ, _U],
    "cuStreamBeginCaptureToGraph": [_P, _P, ctypes.POINTER(_P), _P, _SZ, ctypes.c_int],
    "cuStreamEndCapture": [_P, ctypes.POINTER(_P)],
    "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
}
_MIN_DRIVER = 12040  # IF nodes whose bodies may be captured into (cuStreamBeginCaptureToGraph)


class _NodeParams(ctypes.Structure):
    """``CUgraphNodeParams`` (256 bytes) with its union read as ``CUDA_CONDITIONAL_NODE_PARAMS``."""
    _fields_ = [("type", ctypes.c_int), ("reserved0", ctypes.c_int * 3),
                ("handle", ctypes.c_uint64), ("cond_type", ctypes.c_int),
                ("size", ctypes.c_uint), ("graphs_out", ctypes.c_void_p),
                ("ctx", ctypes.c_void_p), ("pad", ctypes.c_char * 200),
                ("reserved2", ctypes.c_longlong)]


assert ctypes.sizeof(_NodeParams) == 256


@memoize
def _lib():
    """libcuda with every call above, or None (no driver, or one older than CUDA 12.4)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    if not all(hasattr(lib, n) for n in _SIGNATURES):
        return None
    for n, args in _SIGNATURES.items():
        f = getattr(lib, n)
        f.restype, f.argtypes = ctypes.c_int, args
    version = ctypes.c_int()
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value < _MIN_DRIVER:
        return None
    return lib


def available() -> bool:
    """Whether the driver has conditional graph nodes (CUDA 12.4+)."""
    return _lib() is not None


def _check(rc: int, what: str) -> None:
    if rc != 0:
        name = ctypes.c_char_p()
        _lib().cuGetErrorName(rc, ctypes.byref(name))
        raise RuntimeError(f"{what} failed: {(name.value or b'?').decode()} ({rc})")


def add_if_node(stream: int) -> tuple[int, int, int, int]:
    """Append an IF node to the graph that ``stream`` (a ``CUstream``) is capturing, after the
    work captured so far, and make it what the capture's next work depends on. Returns
    ``(handle, node, body, graph)``: the node's condition handle (0 at every launch of the
    graph until a kernel sets it), the node, its body graph (to be captured into, see
    :func:`begin_capture_to_graph`) and the graph being captured."""
    lib = _lib()
    s = ctypes.c_void_p(stream)
    status, cap_id, graph = ctypes.c_int(), ctypes.c_uint64(), ctypes.c_void_p()
    deps, edges, ndeps = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_size_t()
    _check(lib.cuStreamGetCaptureInfo_v3(s, ctypes.byref(status), ctypes.byref(cap_id),
                                         ctypes.byref(graph), ctypes.byref(deps),
                                         ctypes.byref(edges), ctypes.byref(ndeps)),
           "cuStreamGetCaptureInfo")
    ctx, handle = ctypes.c_void_p(), ctypes.c_uint64()
    _check(lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    _check(lib.cuGraphConditionalHandleCreate(ctypes.byref(handle), graph, ctx, 0,
                                              _COND_ASSIGN_DEFAULT),
           "cuGraphConditionalHandleCreate")
    p = _NodeParams(type=_NODE_TYPE_CONDITIONAL, handle=handle.value, cond_type=_COND_TYPE_IF,
                    size=1, ctx=ctx)
    node = ctypes.c_void_p()
    _check(lib.cuGraphAddNode_v2(ctypes.byref(node), graph, deps, edges, ndeps,
                                 ctypes.addressof(p)),
           "cuGraphAddNode (conditional)")
    _check(lib.cuStreamUpdateCaptureDependencies_v2(s, ctypes.byref(node), None, 1,
                                                    _SET_CAPTURE_DEPENDENCIES),
           "cuStreamUpdateCaptureDependencies")
    body = ctypes.cast(p.graphs_out, ctypes.POINTER(ctypes.c_void_p))[0]
    return handle.value, node.value, body, graph.value


def begin_capture_to_graph(stream: int, graph: int, mode: int, after: int | None = None) -> None:
    """Capture what ``stream`` runs next into the existing ``graph`` (an IF node's body, or
    the step's graph again), after node ``after`` of it if given."""
    dep = ctypes.c_void_p(after)
    _check(_lib().cuStreamBeginCaptureToGraph(
        ctypes.c_void_p(stream), ctypes.c_void_p(graph),
        None if after is None else ctypes.byref(dep), None, 0 if after is None else 1, mode),
        "cuStreamBeginCaptureToGraph")


def end_capture(stream: int) -> None:
    """End ``stream``'s capture; the graph it captured into stays its owner's (the caller
    holds the step's graph, an IF node holds its body)."""
    out = ctypes.c_void_p()
    _check(_lib().cuStreamEndCapture(ctypes.c_void_p(stream), ctypes.byref(out)),
           "cuStreamEndCapture")
