"""Fused counter-based dropout against CuPy's naive "random, compare, multiply" and PyTorch's
F.dropout, with bandwidth against the device-to-device copy rate (DESIGN.md §5).

Usage: python benchmarks/dropout.py   (GPU; JSON to $OUT/dropout.json, a table last)
"""
from __future__ import annotations

import sys

import numpy as np

sys.path.insert(0, ".")
from benchmarks.common import time_gpu, write_json  # noqa: E402
from cudrop.variants import dropout as F  # noqa: E402

SIZES = [(4096, 4096), (8192, 8192)]
P = 0.5


def main():
    import cupy as cp
    try:
        import torch
    except ImportError:
        torch = None
    rows = []
    for dtype in (np.float16, np.float32):
        for shape in SIZES:
            n = shape[0] * shape[1]
            item = np.dtype(dtype).itemsize
            xs = [cp.asarray(np.random.default_rng(i).standard_normal(shape, np.float32)).astype(dtype)
                  for i in range(3)]
            ys = [cp.empty_like(x) for x in xs]
            copy_ms = time_gpu(lambda x, y: y.__setitem__(Ellipsis, x), list(zip(xs, ys)))
            copy_gbs = 2 * n * item / copy_ms / 1e6
            step = iter(range(10 ** 9))

            def fused(x):
                return F.dropout(x, P, seed=1, layer=0, step=next(step))

            def naive(x):
                mask = cp.random.random(x.shape, dtype=cp.float32) >= P
                return x * mask / x.dtype.type(1 - P), mask

            fused_ms = time_gpu(fused, [(x,) for x in xs])
            naive_ms = time_gpu(naive, [(x,) for x in xs])
            saved = [fused(x)[1] for x in xs]
            gs = [(x, s) for x, s in zip(xs, saved)]
            fused_bwd_ms = time_gpu(F.dropout_backward, gs)
            masks_ = [naive(x)[1] for x in xs]
            naive_bwd_ms = time_gpu(lambda g, m: g * m / g.dtype.type(1 - P), list(zip(xs, masks_)))
            torch_ms = None
            if torch is not None:
                tx = [torch.randn(shape, device="cuda", dtype=torch.float16 if dtype == np.float16
                                  else torch.float32) for _ in range(3)]
                torch_ms = time_gpu(lambda t: torch.nn.functional.dropout(t, P, training=True),
                                    [(t,) for t in tx])
            fwd_bytes = 2 * n * item + n / 8
            rows.append(dict(dtype=np.dtype(dtype).name, shape=list(shape), p=P,
                             fused_fwd_ms=fused_ms, naive_fwd_ms=naive_ms,
                             fused_bwd_ms=fused_bwd_ms, naive_bwd_ms=naive_bwd_ms,
                             torch_fwd_ms=torch_ms, copy_ms=copy_ms, copy_gbs=copy_gbs,
                             fused_fwd_gbs=fwd_bytes / fused_ms / 1e6,
                             speedup_vs_naive=naive_ms / fused_ms))
    write_json("dropout.json", rows)
    print(f"{'dtype':8s} {'shape':13s} {'fused':>7s} {'naive':>7s} {'x':>5s} {'torch':>7s} "
          f"{'bwd':>7s} {'nbwd':>7s} {'GB/s':>6s} {'copy GB/s':>9s}")
    for r in rows:
        t = "   -" if r["torch_fwd_ms"] is None else f"{r['torch_fwd_ms']:7.3f}"
        print(f"{r['dtype']:8s} {str(r['shape']):13s} {r['fused_fwd_ms']:7.3f} {r['naive_fwd_ms']:7.3f} "
              f"{r['speedup_vs_naive']:5.1f} {t} {r['fused_bwd_ms']:7.3f} {r['naive_bwd_ms']:7.3f} "
              f"{r['fused_fwd_gbs']:6.0f} {r['copy_gbs']:9.0f}")


if __name__ == "__main__":
    main()
