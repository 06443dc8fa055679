"""Block-sparse GEMMs (issue 4) against dense baselines timed in the same process.

1. dsd, sdd, dsd_t at M=N=K in SIZES, fp16 and bf16, sparsity s in SPARSITIES (mask block
   128 x 128), each against cuBLAS dense (``cupy.matmul``) of the same shape; the target is
   time <= 1.1 (1 - s) dense.
2. SparseDrop Linear forward+backward (mask drawing included) against dense forward+backward,
   CuPy naive dropout + matmul, cudrop's fused dropout + cuBLAS and PyTorch ``F.dropout`` +
   matmul with autograd (when PyTorch is importable), all at the same p.
3. The papers' configurations: block-wise dropout forward, batch 256 x 1024 x 1024 (mask block
   128 x 32, the gyro paper's) at drop 10/25/50/75%; SparseDrop forward+backward at 1024³ over
   sparsity 0-0.9.
4. Exact float32 (issue 11): dsd, sdd, dsd_t on the ffma kernel at M x K x N in FP32_SHAPES,
   every block kept and drop 0.5 (mask block 128 x 128), against cuBLAS SGEMM (``cupy.matmul``
   in float32 with TF32 off: CUPY_TF32 is removed from the environment before CuPy's first
   float32 product); the target is >= 0.8x SGEMM's throughput with every block kept. At the
   first shape the simple kernel (the float32 path before ffma) is timed too.

At 1024 and for the block-wise layer, Python's launch overhead (tens of µs per call, for CuPy's
cuBLAS too) exceeds the device time, so those rows also carry graph-replay times: cudrop's ops
captured in CUDA graphs (which also proves they never synchronise with the host), dense cuBLAS
through PyTorch's CUDA graphs (CuPy refuses to capture cuBLAS).

Usage: python benchmarks/bsmm.py [--quick] [--fp32] [--sizes 1024 4096] ; JSON to $OUT/bsmm.json,
a table last. --fp32 runs table 4 only.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, ".")
from benchmarks.common import time_gpu, time_graph, write_json  # noqa: E402
from cudrop import masks  # noqa: E402
from cudrop import bsmm
from cudrop.variants import dropout as Fdrop, sparsedrop as Fsd  # noqa: E402

SIZES = (1024, 4096, 8192)
SPARSITIES = (0.0, 0.25, 0.5, 0.75)
BLOCK = (128, 128)
# (M, K, N) of the float32 table: the MLP layer of issue 11's table, then square
FP32_SHAPES = ((1024, 4096, 4096), (4096, 4096, 4096), (8192, 8192, 8192))


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _sets(cp, shapes, dtype, n=3):
    return [tuple(cp.random.standard_normal(s, dtype=np.float32).astype(dtype) for s in shapes)
            for _ in range(n)]


def _mask(cp, shape, p, block=BLOCK, step=0):
    return masks.block_mask(shape, block, p, seed=1, layer=0, step=step, xp=cp)


def _time(fn, sets, size):
    # fewer back-to-back calls per sample at the large sizes: each call is milliseconds
    return time_gpu(fn, sets, inner=3 if size >= 4096 else 10)


def _graph(fn, sets, size):
    """Graph-replay time where Python's launch overhead could hide the device time."""
    return time_graph(fn, sets) if size <= 1024 else None


def _torch_graph(shapes, dtype, products):
    """Dense cuBLAS baseline replayed from a CUDA graph, through PyTorch (CuPy refuses to
    capture cuBLAS calls): ``products`` GEMMs of (m, k) @ (k, n) per replay. None without
    PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    td = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype.name]
    (m, k), (_, n) = shapes
    a = [torch.randn(m, k, device="cuda", dtype=td) for _ in range(3)]
    b = [torch.randn(k, n, device="cuda", dtype=td) for _ in range(3)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            torch.mm(a[i], b[i])
    torch.cuda.current_stream().wait_stream(s)
    graphs = []
    for i in range(3):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(products):
                torch.mm(a[i], b[i])
        graphs.append(g)
    times = []
    for r in range(30):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for j in range(20):
            graphs[(r * 20 + j) % 3].replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 20)
    return float(np.median(times))


def bench_kernels(cp, size, dtype, rows):
    sets = _sets(cp, [(size, size)] * 2, dtype)
    dense = _time(cp.matmul, sets, size)
    dense_g = _torch_graph([(size, size)] * 2, dtype, 1) if size <= 1024 else None
    for s in SPARSITIES:
        mk = _mask(cp, (size, size), s)
        kept = float(cp.asnumpy(mk.row_count).sum()) / (mk.grid[0] * mk.grid[1])
        forms = {"dsd": lambda a, b: bsmm.dsd(a, b, mk),
                 "sdd": lambda a, b: bsmm.sdd(a, b.T, mk),
                 "dsd_t": lambda a, b: bsmm.dsd_t(a, b, mk)}
        for form, f in forms.items():
            t = _time(f, sets, size)
            g = _graph(f, sets, size)
            rows.append(dict(table="kernel", form=form, size=size, dtype=dtype.name, sparsity=s,
                             kept=kept, ms=t, dense_ms=dense, ratio=t / dense, graph_ms=g,
                             dense_graph_ms=dense_g,
                             graph_ratio=g / dense_g if g and dense_g else None,
                             target_ratio=1.1 * kept,
                             tflops=2 * size**3 * kept / t / 1e9,
                             dense_tflops=2 * size**3 / dense / 1e9))


def _torch_fwd_bwd(size, dtype, p):
    try:
        import torch
    except ImportError:
        return None
    td = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype.name]
    xs = [torch.randn(size, size, device="cuda", dtype=td, requires_grad=True) for _ in range(3)]
    w = torch.randn(size, size, device="cuda", dtype=td, requires_grad=True)
    dy = torch.randn(size, size, device="cuda", dtype=td)

    def step(i):
        y = torch.nn.functional.dropout(xs[i % 3], p) @ w
        y.backward(dy)

    for i in range(5):
        step(i)
    torch.cuda.synchronize()
    times = []
    for r in range(30):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for j in range(5):
            step(r * 5 + j)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 5)
    return float(np.median(times))


def linear_fwd_bwd(cp, size, dtype, p, rows, table="linear", block=BLOCK, baselines=True):
    sets = _sets(cp, [(size, size), (size, size), (size, size)], dtype)  # x, w, dy
    q = 1.0 - p
    step = [0]

    def sparsedrop(x, w, dy):
        step[0] += 1
        _, saved = Fsd.sparsedrop_linear(x, w, p=p, block=block, seed=0, layer=0, step=step[0])
        Fsd.sparsedrop_linear_backward(dy, saved)

    def dense(x, w, dy):
        cp.matmul(x, w), cp.matmul(dy, w.T), cp.matmul(x.T, dy)

    def naive(x, w, dy):
        keep = cp.random.random_sample(x.shape, dtype=np.float32) < q
        xd = x * keep * x.dtype.type(1 / q)
        cp.matmul(xd, w)
        gx = cp.matmul(dy, w.T) * keep * x.dtype.type(1 / q)
        cp.matmul(xd.T, dy)
        return gx

    def fused(x, w, dy):
        step[0] += 1
        xd, saved = Fdrop.dropout(x, p, seed=0, layer=0, step=step[0])
        cp.matmul(xd, w)
        Fdrop.dropout_backward(cp.matmul(dy, w.T), saved)
        cp.matmul(xd.T, dy)

    row = dict(table=table, size=size, dtype=dtype.name, p=p,
               sparsedrop_ms=_time(sparsedrop, sets, size), dense_ms=_time(dense, sets, size),
               sparsedrop_graph_ms=_graph(sparsedrop, sets, size),
               dense_graph_ms=(_torch_graph([(size, size)] * 2, dtype, 3) if size <= 1024
                               else None))
    if baselines:
        row.update(naive_ms=_time(naive, sets, size), fused_ms=_time(fused, sets, size),
                   torch_ms=_torch_fwd_bwd(size, dtype, p))
    rows.append(row)


def blockwise_forward(cp, rows, dtype):
    """The gyro paper's FC layer: x (256, 1024) @ w (1024, 1024), blocks of 128 rows x 32
    units, input pruning in the GEMM, against the dense GEMM."""
    from cudrop.variants import gyro_schedule as gyro
    sets = _sets(cp, [(256, 1024), (1024, 1024)], dtype)
    dense, dense_g = time_gpu(cp.matmul, sets), _torch_graph([(256, 1024), (1024, 1024)], dtype, 1)
    for p in (0.1, 0.25, 0.5, 0.75):
        mk = gyro.blockwise_mask((256, 1024), p, step=0, block=(128, 32), xp=cp)
        f = lambda x, w: bsmm.dsd(x, w, mk, 1 / (1 - p))  # noqa: E731
        t, g = time_gpu(f, sets), time_graph(f, sets)
        rows.append(dict(table="blockwise", dtype=dtype.name, p=p, ms=t, dense_ms=dense,
                         speedup=dense / t, graph_ms=g, dense_graph_ms=dense_g,
                         graph_speedup=dense_g / g if g and dense_g else None))


def bench_fp32(cp, rows):
    """Exact float32: each form on the ffma kernel against SGEMM of the same product shape
    (M x K) @ (K x N). ``ratio`` is SGEMM's time over the kernel's (with every block kept, the
    kernel's throughput relative to SGEMM's); ``rate_ratio`` the kernel's rate on the kept
    multiply-adds relative to SGEMM's."""
    f32 = np.dtype(np.float32)
    for si, (m, k, n) in enumerate(FP32_SHAPES):
        size = max(m, k, n)
        sgemm = _time(cp.matmul, _sets(cp, [(m, k), (k, n)], f32), size)
        for s in (0.0, 0.5):
            mk, mo, mt = _mask(cp, (m, k), s), _mask(cp, (m, n), s), _mask(cp, (k, m), s)
            forms = {  # operand shapes, the call, its mask
                "dsd": ([(m, k), (k, n)], lambda a, b: bsmm.dsd(a, b, mk), mk),
                "sdd": ([(m, k), (k, n)], lambda a, b: bsmm.sdd(a, b, mo), mo),
                "dsd_t": ([(k, m), (k, n)], lambda a, b: bsmm.dsd_t(a, b, mt), mt)}
            for form, (shapes, f, mask) in forms.items():
                kept = float(cp.asnumpy(mask.row_count).sum()) / (mask.grid[0] * mask.grid[1])
                sets = _sets(cp, shapes, f32)
                # the float32 path before ffma, once, where issue 11 measured it
                kernels = ("ffma", "simple") if (si, s, form) == (0, 0.0, "dsd") else ("ffma",)
                for kernel in kernels:
                    with bsmm.use_kernel(kernel):
                        t = _time(f, sets, size)
                    rows.append(dict(table="fp32", form=form, kernel=kernel, m=m, k=k, n=n,
                                     dtype="float32", sparsity=s, kept=kept, ms=t,
                                     sgemm_ms=sgemm, ratio=sgemm / t, rate_ratio=kept * sgemm / t,
                                     target=0.8 if s == 0.0 else None,
                                     tflops=2 * m * k * n * kept / t / 1e9,
                                     sgemm_tflops=2 * m * k * n / sgemm / 1e9))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4096 fp16 only")
    ap.add_argument("--fp32", action="store_true", help="the exact float32 table only")
    ap.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    args = ap.parse_args()
    if os.environ.pop("CUPY_TF32", "0") != "0":  # CuPy reads it at its first float32 product
        print("CUPY_TF32 removed from the environment: the float32 rows compare with exact SGEMM")
    import cupy as cp
    dtypes = [] if args.fp32 else ["float16"] if args.quick else ["float16", "bfloat16"]
    sizes = [4096] if args.quick else args.sizes
    rows = []
    if not args.quick:
        bench_fp32(cp, rows)
    for name in dtypes:
        dt = _dtype(name)
        for size in sizes:
            bench_kernels(cp, size, dt, rows)
            for p in SPARSITIES:
                linear_fwd_bwd(cp, size, dt, p, rows)
        blockwise_forward(cp, rows, dt)
    for p in (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9) if dtypes else ():
        linear_fwd_bwd(cp, 1024, _dtype("float16"), p, rows, table="sweep1024", baselines=False)
    path = write_json("bsmm.json", dict(device=cp.cuda.runtime.getDeviceProperties(0)["name"]
                                        .decode(), rows=rows))
    print(f"\nJSON: {path}")
    _print(rows)


def _print(rows):
    def ms(v):
        return "-" if v is None else f"{v:.3f}"
    def x(v):
        return "-" if v is None else f"{v:.2f}"
    print("\n| form | size | dtype | s | ms | dense ms | ratio | target | TFLOP/s | graph ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["table"] == "kernel":
            print(f"| {r['form']} | {r['size']} | {r['dtype']} | {r['sparsity']} | {ms(r['ms'])} "
                  f"| {ms(r['dense_ms'])} | {r['ratio']:.2f} | {r['target_ratio']:.2f} | "
                  f"{r['tflops']:.0f} | {x(r['graph_ratio'])} |")
    print("\n| SparseDrop Linear fwd+bwd | size | dtype | p | ms | dense | naive | fused+cuBLAS "
          "| torch | vs fused | vs torch | graph ms | dense graph ms |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["table"] in ("linear", "sweep1024"):
            t = r["sparsedrop_ms"]
            vs = lambda k: "-" if r.get(k) is None else f"{r[k] / t:.2f}x"  # noqa: E731
            print(f"| {r['table']} | {r['size']} | {r['dtype']} | {r['p']} | {ms(t)} | "
                  f"{ms(r['dense_ms'])} | {ms(r.get('naive_ms'))} | {ms(r.get('fused_ms'))} | "
                  f"{ms(r.get('torch_ms'))} | {vs('fused_ms')} | {vs('torch_ms')} | "
                  f"{ms(r.get('sparsedrop_graph_ms'))} | {ms(r.get('dense_graph_ms'))} |")
    print("\n| float32 | kernel | M x K x N | drop | ms | SGEMM ms | vs SGEMM | rate vs SGEMM | "
          "target | TFLOP/s | SGEMM TFLOP/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["table"] == "fp32":
            tgt = "-" if r["target"] is None else f">= {r['target']:.1f}x"
            print(f"| {r['form']} | {r['kernel']} | {r['m']}x{r['k']}x{r['n']} | {r['sparsity']} "
                  f"| {ms(r['ms'])} | {ms(r['sgemm_ms'])} | {r['ratio']:.2f}x | "
                  f"{r['rate_ratio']:.2f}x | {tgt} | {r['tflops']:.1f} | {r['sgemm_tflops']:.1f} |")
    print("\n| block-wise fwd 256x1024x1024 | dtype | drop | ms | dense ms | speedup | graph ms "
          "| dense graph ms | graph speedup |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["table"] == "blockwise":
            print(f"| | {r['dtype']} | {r['p']} | {ms(r['ms'])} | {ms(r['dense_ms'])} | "
                  f"{r['speedup']:.2f}x | {ms(r['graph_ms'])} | {ms(r['dense_graph_ms'])} | "
                  f"{x(r['graph_speedup'])} |")


if __name__ == "__main__":
    main()
