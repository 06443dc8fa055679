"""cuBLASLt (functional/_gemm.py, capturable) against ``cupy.matmul`` (CuPy's cuBLAS, not
capturable) on square problems 1024-8192 in every dtype, same process (issue 10 target: >= 0.97x
cupy.matmul's throughput), plus the Linear's bias epilogue against matmul + add. JSON:
$OUT/gemm.json."""
from __future__ import annotations

import numpy as np

from common import time_gpu, write_json

from cudrop import backend
from cudrop.functional import _gemm


def main():
    cp = backend.cupy
    import ml_dtypes
    rows = []
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
        for n in (1024, 2048, 4096, 8192):
            if dtype == "float64" and n > 4096:
                continue
            rng = np.random.default_rng(0)
            sets = [(cp.asarray(rng.standard_normal((n, n), dtype=np.float32)).astype(dt),
                     cp.asarray(rng.standard_normal((n, n), dtype=np.float32)).astype(dt),
                     cp.asarray(rng.standard_normal(n, dtype=np.float32)).astype(dt))
                    for _ in range(3)]
            outs = [cp.empty((n, n), dt) for _ in sets]
            ref = time_gpu(lambda a, b, c, o: cp.matmul(a, b, out=o),
                           [s + (o,) for s, o in zip(sets, outs)])
            lt = time_gpu(lambda a, b, c, o: _gemm.gemm(a, b, out=o),
                          [s + (o,) for s, o in zip(sets, outs)])
            ref_bias = time_gpu(lambda a, b, c, o: cp.add(cp.matmul(a, b, out=o), c, out=o),
                                [s + (o,) for s, o in zip(sets, outs)])
            lt_bias = time_gpu(lambda a, b, c, o: _gemm.gemm(a, b, bias=c, out=o),
                               [s + (o,) for s, o in zip(sets, outs)])
            # What a measured choice among cuBLASLt's other proposals would gain.
            plan = next(c.plan for key, c in _gemm._CALLS.items()
                        if key[0] == (n, n) and key[6] == dt and key[7] is None)
            alts = []
            for i in range(1, plan.count):
                plan.choose(i)
                alts.append(time_gpu(lambda a, b, c, o: _gemm.gemm(a, b, out=o),
                                     [s + (o,) for s, o in zip(sets, outs)]))
            plan.choose(0)
            best = min([lt] + alts)
            flops = 2 * n ** 3
            row = dict(dtype=dtype, n=n, cupy_ms=ref, lt_ms=lt, speed=ref / lt,
                       lt_best_of_proposals_ms=best, best_speed=ref / best,
                       best_index=([lt] + alts).index(best), proposals=plan.count,
                       cupy_bias_ms=ref_bias, lt_bias_ms=lt_bias, bias_speed=ref_bias / lt_bias,
                       lt_tflops=flops / lt / 1e9, target=0.97)
            rows.append(row)
            print(f"{dtype:9s} {n:5d}  cupy.matmul {ref:8.3f} ms  cuBLASLt {lt:8.3f} ms  "
                  f"{ref / lt:5.2f}x (target >= 0.97; best of {plan.count} proposals "
                  f"{ref / best:5.2f}x)   +bias: {ref_bias:8.3f} vs "
                  f"{lt_bias:8.3f} ms  {ref_bias / lt_bias:5.2f}x", flush=True)
    write_json("gemm.json", rows)


if __name__ == "__main__":
    main()
