"""Development probe: one launch of the mma kernel (dense fp16 4096^3), for ncu."""
import sys
import numpy as np
import cupy as cp
sys.path.insert(0, ".")
from cudrop.functional import bsmm_gpu  # noqa: E402

tile = tuple(int(v) for v in sys.argv[1].split(",")) if len(sys.argv) > 1 else None
n = 4096
a = cp.random.standard_normal((n, n), dtype=np.float32).astype(np.float16)
b = a.copy()
c = cp.empty_like(a)
for _ in range(2):
    bsmm_gpu.launch(a, b, c, None, None, 1, 1, 1, 1.0, None, 0, kernel="mma", tile=tile)
cp.cuda.Device().synchronize()
