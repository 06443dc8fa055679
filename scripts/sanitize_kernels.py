"""Launch every RawKernel on small ragged shapes; run under compute-sanitizer
(memcheck, racecheck) by scripts/device_run.sh."""
import sys

import numpy as np

sys.path.insert(0, ".")
import cupy as cp  # noqa: E402

from cudrop import masks  # noqa: E402
from cudrop.functional import dropout as F  # noqa: E402

for n in (1, 31, 127, 129, 1000, 70000):
    for dt in (np.float16, np.float32, np.float64):
        x = cp.ones(n, dt)
        y, saved = F.dropout(x, 0.3, seed=1, layer=2, step=n)
        F.dropout_backward(y, saved)
for shape, block in [((1, 1), (1, 1)), ((130, 70), (128, 32)), ((700, 300), (1, 1)),
                     ((5, 3000), (2, 3))]:
    masks.block_mask(shape, block, 0.5, seed=0, layer=0, step=0, xp=cp)
cp.cuda.Device().synchronize()
print("sanitize run ok")
