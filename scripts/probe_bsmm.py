"""Development probes for the block-sparse GEMMs on the GPU (benchmarks/bsmm.py is the record):

  python scripts/probe_bsmm.py forms        dsd/sdd/dsd_t over dense cuBLAS, fp16, p 0 and 0.5
  python scripts/probe_bsmm.py tiles        each mma tile, dense fp16 4096³ and 8192³
  python scripts/probe_bsmm.py one KERNEL [TILE]   two launches of one kernel (for ncu)
  python scripts/probe_bsmm.py host         host cost per call at 1024³ (and a cProfile)
  python scripts/probe_bsmm.py mlp          the MLP step's products (1024 x 4096 x 4096 bf16,
                                            SparseDrop's 128 x 128 blocks) in CUDA graphs:
                                            dense cuBLASLt, each form on its chosen kernel
                                            and its kernels (torch.profiler)
  python scripts/probe_bsmm.py apply        masks.apply_block (block_apply) against a plain
                                            copy, 1024 x 4096 bf16, in CUDA graphs
"""
import os
import sys

import numpy as np
import cupy as cp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.common import time_gpu  # noqa: E402
from cudrop import masks  # noqa: E402
from cudrop import bsmm
from cudrop.bsmm import dispatch as bsmm_gpu  # noqa: E402


def _sets(n, k=None):
    k = k or n
    return [(cp.random.standard_normal((n, k), dtype=np.float32).astype(np.float16),
             cp.random.standard_normal((k, n), dtype=np.float32).astype(np.float16),
             cp.empty((n, n), np.float16)) for _ in range(3)]


def forms():
    for n in (1024, 4096, 8192):
        sets = _sets(n)
        dense = time_gpu(lambda a, b, c: cp.matmul(a, b, out=c), sets)
        row = [f"{n} dense {dense * 1e3:6.0f}us"]
        for p in (0.0, 0.5):
            mk = masks.block_mask((n, n), (128, 128), p, seed=0, layer=0, step=0, xp=cp)
            for form, f in (("dsd", lambda a, b, c: bsmm.dsd(a, b, mk, out=c)),
                            ("sdd", lambda a, b, c: bsmm.sdd(a, b, mk, out=c)),
                            ("dsd_t", lambda a, b, c: bsmm.dsd_t(a, b, mk, out=c))):
                row.append(f"{form}@{p} {time_gpu(f, sets) / dense:.2f}x")
        print(" | ".join(row), flush=True)


def tiles():
    for n in (4096, 8192):
        sets = _sets(n)
        dense = time_gpu(lambda a, b, c: cp.matmul(a, b, out=c), sets)
        for tile in bsmm_gpu.MMA_TILES:
            t = time_gpu(lambda a, b, c: bsmm_gpu.launch(a, b, c, kernel="mma", tile=tile),
                         sets)
            print(f"{n} mma {tile}: {t * 1e3:7.1f} us {2 * n**3 / t / 1e9:5.0f} TFLOP/s "
                  f"({t / dense:.2f}x cuBLAS {dense * 1e3:.1f} us)", flush=True)


def one(kernel, tile=None):
    a, b, c = _sets(4096)[0]
    tile = tuple(int(v) for v in tile.split(",")) if tile else None
    for _ in range(2):
        bsmm_gpu.launch(a, b, c, kernel=kernel, tile=tile)
    cp.cuda.Device().synchronize()


def host():
    import cProfile
    import pstats
    import time
    a, b, c = _sets(1024)[0]
    mk = masks.block_mask((1024, 1024), (128, 128), 0.5, seed=0, layer=0, step=0, xp=cp)
    from cudrop.variants import sparsedrop
    calls = {"dsd": lambda: bsmm.dsd(a, b, mk, out=c),
             "matmul": lambda: cp.matmul(a, b, out=c),
             "block_mask": lambda: masks.block_mask((1024, 1024), (128, 128), 0.5, seed=0,
                                                    layer=0, step=1, xp=cp),
             "sparsedrop fwd": lambda: sparsedrop.sparsedrop_linear(a, b, p=0.5, step=3)}
    for name, f in calls.items():
        for _ in range(20):
            f()
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            f()
        t1 = time.perf_counter()
        cp.cuda.Device().synchronize()
        print(f"{name}: {(t1 - t0) / 200 * 1e6:.1f} us host per call", flush=True)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(500):
        bsmm.dsd(a, b, mk, out=c)
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(14)


def mlp():
    import ml_dtypes
    from benchmarks.common import time_graph
    from cudrop.functional import _gemm
    bf16 = ml_dtypes.bfloat16
    rnd = lambda *s: cp.random.standard_normal(s, dtype=np.float32).astype(bf16)  # noqa: E731
    m, k, n = 1024, 4096, 4096
    # dsd: x (m, k) sparse @ w (k, n); sdd: dy (m, n) @ w.T (n, k) masked over (m, k);
    # dsd_t: x (m, k) sparse, transposed, @ dy (m, n) -> (k, n)
    x, w, dy = rnd(m, k), rnd(k, n), rnd(m, n)
    outs = {"dsd": cp.empty((m, n), bf16), "sdd": cp.empty((m, k), bf16),
            "dsd_t": cp.empty((k, n), bf16)}
    dense = {"dsd": lambda: _gemm.gemm(x, w, out=outs["dsd"]),
             "sdd": lambda: _gemm.gemm(dy, w.T, out=outs["sdd"]),
             "dsd_t": lambda: _gemm.gemm(x.T, dy, out=outs["dsd_t"])}
    from benchmarks.profile_step import _profile
    for p in (0.0, 0.5):
        mk = masks.block_mask((m, k), (128, 128), p, seed=0, layer=0, step=0, xp=cp)
        calls = {"dsd": lambda: bsmm.dsd(x, w, mk, out=outs["dsd"]),
                 "sdd": lambda: bsmm.sdd(dy, w.T, mk, out=outs["sdd"]),
                 "dsd_t": lambda: bsmm.dsd_t(x, dy, mk, out=outs["dsd_t"])}
        for form, f in calls.items():
            td = time_graph(lambda: dense[form](), [()])
            bsmm_gpu._PLAN_MEMO.clear()
            t = time_graph(lambda: f(), [()])
            plans = [(pl.kind, pl.grid) for pl in bsmm_gpu._PLANS.values()]
            kernels = _profile(lambda: f(), [()], cp.cuda.Device().synchronize)["kernels"]
            print(f"p={p} {form}: dense {td * 1e3:6.1f}us  {plans} {t * 1e3:6.1f}us  "
                  + "; ".join(f"{r['kernel'][:40]} {r['us_per_step']:.1f}us "
                              f"x{r['launches_per_step']:.0f}" for r in kernels[:3]), flush=True)


def apply():
    import ml_dtypes
    from benchmarks.common import time_graph
    x = cp.random.standard_normal((1024, 4096), dtype=np.float32).astype(ml_dtypes.bfloat16)
    y = cp.empty_like(x)
    for block in ((128, 32), (128, 128)):
        mk = masks.block_mask(x.shape, block, 0.5, seed=0, layer=0, step=0, xp=cp)
        t = time_graph(lambda: masks.apply_block(x, mk, 2.0, out=y), [()])
        print(f"apply_block {block}: {t * 1e3:5.1f}us", flush=True)
    t = time_graph(lambda: cp.copyto(y, x), [()])
    print(f"copy: {t * 1e3:5.1f}us", flush=True)


if __name__ == "__main__":
    probes = {"forms": forms, "tiles": tiles, "one": one, "host": host, "mlp": mlp,
              "apply": apply}
    probes[sys.argv[1]](*sys.argv[2:])
