"""Sums over the leading axis: ``sum_leading`` (raw_kernels/reduce.cu) against ``cupy.sum(axis=0)``
on bias-gradient and layer-norm shapes, and layer norm's two parameter gradients from one pass
against the CuPy composition they replaced (``g`` widened to float32, two sums). Device time
per call from CUDA-graph replay (launch overhead excluded; DESIGN.md §5), eager time beside it,
and the kernel's read bandwidth.

Usage: python benchmarks/colsum.py   (GPU; JSON to $OUT/colsum.json, a table last;
scripts/device_run.sh runs it with BENCHES=colsum)
"""
from __future__ import annotations

import sys

import numpy as np

sys.path.insert(0, ".")
from benchmarks.common import time_gpu, time_graph, write_json  # noqa: E402
from cudrop.functional._reduce import sum_leading  # noqa: E402

SHAPES = [(8192, 1024), (25088, 1024), (131072, 16)]


def main():
    import cupy as cp
    dtypes = [np.dtype(np.float32)]
    try:
        import ml_dtypes
        cp.zeros(1, ml_dtypes.bfloat16)
        dtypes.insert(0, np.dtype(ml_dtypes.bfloat16))
    except Exception as e:  # noqa: BLE001 - the float32 rows still run
        print(f"no bfloat16 rows: {type(e).__name__}: {e}")
    rows = []
    for dt in dtypes:
        for shape in SHAPES:
            rng = np.random.default_rng(0)
            gs = [cp.asarray(rng.standard_normal(shape, np.float32)).astype(dt)
                  for _ in range(3)]
            xs = [cp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(3)]
            cases = {
                "sum": ([(g,) for g in gs], sum_leading, lambda g: cp.sum(g, axis=0),
                        shape[0] * shape[1] * dt.itemsize),
                "ln_both": (list(zip(gs, xs)),
                            lambda g, x: sum_leading(g, 1, x, with_plain=True),
                            lambda g, x: ((g.astype(np.float32) * x).sum(axis=0),
                                          g.astype(np.float32).sum(axis=0)),
                            shape[0] * shape[1] * (dt.itemsize + 4)),
            }
            for case, (inputs, ours, theirs, nbytes) in cases.items():
                # how far the two results are apart (relative to the largest sum), recorded:
                # CuPy's own bf16 accumulation is not known here
                a, b = ours(*inputs[0]), theirs(*inputs[0])
                diff = 0.0
                for u, v in zip(a if isinstance(a, tuple) else (a,),
                                b if isinstance(b, tuple) else (b,)):
                    u64, v64 = (cp.asnumpy(t.astype(np.float64)) for t in (u, v))
                    diff = max(diff, float(np.abs(u64 - v64).max() / np.abs(v64).max()))
                row = dict(case=case, dtype=dt.name, shape=list(shape), max_rel_diff=diff)
                for name, fn in (("kernel", ours), ("cupy", theirs)):
                    row[f"{name}_graph_ms"] = time_graph(fn, inputs)
                    row[f"{name}_eager_ms"] = time_gpu(fn, inputs)
                dev = row["kernel_graph_ms"] or row["kernel_eager_ms"]
                ref = row["cupy_graph_ms"] or row["cupy_eager_ms"]
                row["kernel_read_gbs"] = nbytes / dev / 1e6
                row["speedup"] = ref / dev
                rows.append(row)
    write_json("colsum.json", rows)

    def ms(v):
        return "      -" if v is None else f"{v:7.4f}"

    print(f"{'case':8s} {'dtype':9s} {'shape':14s} {'kern gr':>7s} {'cupy gr':>7s} "
          f"{'kern ea':>7s} {'cupy ea':>7s} {'x':>6s} {'GB/s':>6s} {'diff':>8s}")
    for r in rows:
        print(f"{r['case']:8s} {r['dtype']:9s} {str(r['shape']):14s} {ms(r['kernel_graph_ms'])} "
              f"{ms(r['cupy_graph_ms'])} {ms(r['kernel_eager_ms'])} {ms(r['cupy_eager_ms'])} "
              f"{r['speedup']:6.1f} {r['kernel_read_gbs']:6.0f} {r['max_rel_diff']:8.1e}")


if __name__ == "__main__":
    main()
