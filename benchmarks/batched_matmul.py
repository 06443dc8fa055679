"""Batched half-precision matmul: cudrop's cuBLAS strided-batched path against CuPy's
``matmul`` (which casts batched fp16 to fp32, DESIGN.md §4) and PyTorch's ``bmm``.

Usage: python benchmarks/batched_matmul.py   (needs a GPU; JSON to $OUT/batched_matmul.json)
"""
from __future__ import annotations

import sys

import numpy as np

sys.path.insert(0, ".")
from benchmarks.common import time_gpu, write_json  # noqa: E402
from cudrop.functional._matmul import matmul  # noqa: E402

SHAPES = [  # (batch, m, k, n): attention-like and square
    (64, 256, 64, 256), (64, 256, 256, 64), (16, 1024, 1024, 1024), (8, 4096, 128, 4096)]


def dtypes():
    out = [np.dtype(np.float16)]
    try:
        import ml_dtypes
        out.append(np.dtype(ml_dtypes.bfloat16))
    except ImportError:
        pass
    return out


def main():
    import cupy as cp
    try:
        import torch
    except ImportError:
        torch = None
    rows = []
    for dt in dtypes():
        for b, m, k, n in SHAPES:
            sets = [(cp.asarray(np.random.standard_normal((b, m, k)).astype(np.float32)).astype(dt),
                     cp.asarray(np.random.standard_normal((b, k, n)).astype(np.float32)).astype(dt))
                    for _ in range(3)]
            flop = 2.0 * b * m * k * n
            ours = time_gpu(matmul, sets)
            a64 = sets[0][0].astype(cp.float64)
            ref = a64 @ sets[0][1].astype(cp.float64)
            err = float(cp.linalg.norm(matmul(*sets[0]).astype(cp.float64) - ref) / cp.linalg.norm(ref))
            try:
                cupy_ms = time_gpu(cp.matmul, sets)
            except Exception as e:  # CuPy 14 cannot do batched bf16
                cupy_ms = None
            torch_ms = None
            if torch is not None:
                tdt = torch.float16 if dt == np.float16 else torch.bfloat16
                tsets = [(torch.randn(b, m, k, device="cuda", dtype=tdt),
                          torch.randn(b, k, n, device="cuda", dtype=tdt)) for _ in range(3)]
                torch_ms = time_gpu(torch.bmm, tsets)
            rows.append(dict(dtype=dt.name, shape=[b, m, k, n], cudrop_ms=ours,
                             cudrop_tflops=flop / ours / 1e9, rel_err=err,
                             cupy_matmul_ms=cupy_ms, torch_bmm_ms=torch_ms))
    write_json("batched_matmul.json", rows)
    print(f"{'dtype':9s} {'b,m,k,n':22s} {'cudrop ms':>10s} {'TFLOP/s':>8s} {'cupy ms':>9s} "
          f"{'torch ms':>9s} {'rel err':>8s}")
    for r in rows:
        f = lambda v: "   fails" if v is None else f"{v:9.3f}"  # noqa: E731
        print(f"{r['dtype']:9s} {str(r['shape']):22s} {r['cudrop_ms']:10.3f} "
              f"{r['cudrop_tflops']:8.1f} {f(r['cupy_matmul_ms'])} {f(r['torch_bmm_ms'])} "
              f"{r['rel_err']:8.1e}")


if __name__ == "__main__":
    main()
