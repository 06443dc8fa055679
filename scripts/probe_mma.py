"""Development probe: dense fp16 time of each mma tile at 4096^3 and 8192^3 against cupy.matmul."""
import sys
import numpy as np
import cupy as cp
sys.path.insert(0, ".")
from benchmarks.common import time_gpu  # noqa: E402
from cudrop.functional import bsmm_gpu  # noqa: E402

for n in (4096, 8192):
    sets = [(cp.random.standard_normal((n, n), dtype=np.float32).astype(np.float16),
             cp.random.standard_normal((n, n), dtype=np.float32).astype(np.float16),
             cp.empty((n, n), np.float16)) for _ in range(3)]
    dense = time_gpu(lambda a, b, c: cp.matmul(a, b, out=c), sets)
    for tile in bsmm_gpu.MMA_TILES:
        for bt in (False, True):
            f = lambda a, b, c: bsmm_gpu.launch(a, b.T if bt else b, c, None, None, 1, 1, 1, 1.0,
                                                None, 0, kernel="mma", tile=tile)
            t = time_gpu(f, sets)
            print(f"{n} tile {tile} b_kmajor={bt}: {t*1e3:7.1f} us  {2*n**3/t/1e9:5.0f} TFLOP/s "
                  f" cuBLAS {dense*1e3:6.1f} us ({t/dense:.2f}x)", flush=True)
