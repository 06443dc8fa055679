"""A quick look at the block-sparse GEMMs on the GPU: dsd/sdd/dsd_t time against cupy.matmul at
a few sizes (fp16) and two sparsities. For development runs; benchmarks/bsmm.py is the record."""
import os
import sys

import numpy as np
import cupy as cp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cudrop import masks  # noqa: E402
from cudrop.functional import bsmm  # noqa: E402
from benchmarks.common import time_gpu  # noqa: E402

for n in (1024, 4096, 8192):
    sets = [(cp.random.standard_normal((n, n), dtype=np.float32).astype(np.float16),
             cp.random.standard_normal((n, n), dtype=np.float32).astype(np.float16))
            for _ in range(3)]
    t_dense = time_gpu(cp.matmul, sets)
    row = [f"{n} dense {t_dense*1e3:6.0f}us"]
    for p in (0.0, 0.5):
        mk = masks.block_mask((n, n), (128, 128), p, seed=0, layer=0, step=0, xp=cp)
        forms = {"dsd": lambda x, w: bsmm.dsd(x, w, mk), "sdd": lambda x, w: bsmm.sdd(x, w.T, mk),
                 "dsd_t": lambda x, w: bsmm.dsd_t(x, w, mk)}
        for form, f in forms.items():
            t = time_gpu(f, sets)
            row.append(f"{form}@{p} {t/t_dense:.2f}x")
    print(" | ".join(row), flush=True)
