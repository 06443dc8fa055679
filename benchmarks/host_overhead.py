"""Host time per op in eager mode (issue 10 target: <= 10 µs above a bare kernel launch):
small operands so the device is never the bottleneck, 2000 calls timed on the host without a
sync in between. JSON: $OUT/host_overhead.json."""
from __future__ import annotations

import time

import numpy as np

from common import write_json

import cudrop.functional as F
from cudrop import backend, bsmm, masks


def _us(fn, n=2000):
    for _ in range(50):
        fn()
    backend.cupy.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n * 1e6
    backend.cupy.cuda.Device().synchronize()
    return dt


def main():
    cp = backend.cupy
    x = cp.ones((128, 128), np.float32)
    w = cp.ones((128, 128), np.float32)
    b = cp.ones(128, np.float32)
    bare = cp.RawKernel(r'extern "C" __global__ void k(float* p) { }', "k")
    m = masks.block_mask((128, 128), (64, 64), 0.5, seed=0, layer=0, step=0, xp=cp)
    y, saved = F.linear(x, w, b)
    rows = {
        "bare RawKernel launch": _us(lambda: bare((1,), (32,), (x,))),
        "cupy elementwise x + 1": _us(lambda: x + 1),
        "F.linear (cuBLASLt, bias epilogue)": _us(lambda: F.linear(x, w, b)),
        "F.linear_backward": _us(lambda: F.linear_backward(y, saved)),
        "F.dropout": _us(lambda: F.dropout(x, 0.5, seed=0, layer=0, step=1)),
        "bsmm.dsd": _us(lambda: bsmm.dsd(x, w, m, 2.0)),
        "cupy.matmul": _us(lambda: cp.matmul(x, w)),
    }
    base = rows["bare RawKernel launch"]
    out = [dict(op=k, host_us=v, above_bare_us=v - base, target_above_bare_us=10.0)
           for k, v in rows.items()]
    for r in out:
        print(f"{r['op']:38s} {r['host_us']:7.1f} µs  (+{r['above_bare_us']:6.1f} over a bare "
              "launch; target <= 10)")
    write_json("host_overhead.json", out)


if __name__ == "__main__":
    main()
