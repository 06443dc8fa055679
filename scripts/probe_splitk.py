"""Is splitting K worth it for long-K, small-output float32 GEMMs (the weight gradients of
ResNet-56's convolutions, batch 128)? Times functional/_gemm.py with its split_k rule against
the same call with the split turned off (cuBLASLt's own choice), both through CUDA graphs so the
host does not count. Prints one line per shape and JSON to $OUT/probe_splitk.json."""
from __future__ import annotations

import sys

import numpy as np

sys.path.insert(0, "benchmarks")
from common import time_graph, write_json  # noqa: E402

from cudrop import backend  # noqa: E402
from cudrop.functional import _gemm  # noqa: E402

# (O, N*H*W, C*kh*kw): gw = gy2 (O, Q) @ colsᵀ (Q, C*9) per stage; 1x1 shortcuts; the stem
SHAPES = [(16, 131072, 144), (32, 32768, 288), (64, 8192, 576), (32, 32768, 16),
          (64, 8192, 32), (16, 131072, 27)]


def main():
    cp = backend.cupy
    rule = _gemm.split_k
    rows = []
    for m, k, n in SHAPES:
        rng = np.random.default_rng(0)
        sets = [(cp.asarray(rng.standard_normal((m, k), dtype=np.float32)),
                 cp.asarray(rng.standard_normal((n, k), dtype=np.float32)).T,
                 cp.empty((m, n), np.float32)) for _ in range(3)]
        times = {}
        for name, fn in (("split", rule), ("cublaslt", lambda *a: 1)):
            _gemm.split_k = fn
            _gemm._CALLS.clear()
            for a, b, o in sets:  # plan eagerly before the capture
                _gemm.gemm(a, b, out=o)
            times[name] = time_graph(lambda a, b, o: _gemm.gemm(a, b, out=o), sets)
        _gemm.split_k = rule
        row = dict(m=m, k=k, n=n, split=rule(m, n, k, np.dtype(np.float32)),
                   split_ms=times["split"], cublaslt_ms=times["cublaslt"])
        rows.append(row)
        print(f"({m}, {k}) @ ({k}, {n}): split {row['split']:3d} {row['split_ms']:.4f} ms, "
              f"cuBLASLt alone {row['cublaslt_ms']:.4f} ms", flush=True)
    write_json("probe_splitk.json", rows)


if __name__ == "__main__":
    main()
