"""Timing helpers for the GPU benchmarks: CUDA events, warm-up, median of many runs, rotating
input sets so repeated runs do not measure the L2 cache (DESIGN.md §5)."""
from __future__ import annotations

import json
import os
import statistics


def time_gpu(fn, inputs, warmup=5, reps=30, inner=10):
    """Median milliseconds per call of ``fn(*inputs[i % len(inputs)])``, timed with CUDA events
    around ``inner`` back-to-back calls: when the GPU is the bottleneck the queue stays full
    and this is device time; when Python is, it is the host cost per call (also real)."""
    import cupy as cp
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    cp.cuda.Device().synchronize()
    times = []
    for i in range(reps):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for j in range(inner):
            fn(*inputs[(i * inner + j) % len(inputs)])
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / inner)
    return statistics.median(times)


def time_graph(fn, inputs, reps=30, inner=20):
    """Median milliseconds per call of ``fn`` replayed from CUDA graphs (one captured per input
    set, replayed in rotation): the device's time without Python's launch overhead, the method
    for ops made of many small launches (device/METHOD.md). None when ``fn`` cannot be captured
    (it synchronises with the host, or needs fresh device memory inside the capture)."""
    import cupy as cp
    stream = cp.cuda.Stream(non_blocking=True)
    graphs = []
    try:
        with stream:
            for args in inputs:
                fn(*args)  # warm: compiled kernels, pooled memory of the right sizes
            stream.synchronize()
            for args in inputs:
                stream.begin_capture()
                fn(*args)
                graphs.append(stream.end_capture())
    except Exception as e:  # noqa: BLE001 - reported, not fatal: the eager number stands
        print(f"graph capture failed: {type(e).__name__}: {e}")
        return None
    for g in graphs:
        g.launch(stream)
    stream.synchronize()
    times = []
    for i in range(reps):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        for j in range(inner):
            graphs[(i * inner + j) % len(graphs)].launch(stream)
        end.record(stream)
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / inner)
    return statistics.median(times)


def write_json(name, payload):
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path
