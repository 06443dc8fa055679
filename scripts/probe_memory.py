"""Where a captured step's memory goes (development probe; train_step.py's memory column is the
record): for each case, the default pool and the capture's private pool, bytes held (total)
and in use (used), after eager steps and after captured steps.

  python scripts/probe_memory.py mlp-none:bfloat16 mlp-sliceout:bfloat16
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import cupy as cp  # noqa: E402

from benchmarks import train_step as ts  # noqa: E402
from cudrop import graph  # noqa: E402

MB = 2 ** 20


def probe(case):
    pool = cp.get_default_memory_pool()
    for captured in (False, True):
        pool.free_all_blocks()
        model, opt, step, batches = ts.cudrop_step(case)
        base = pool.used_bytes()
        run = graph.capture(step, model=model, optimizer=opt) if captured else step
        for i in range(8):
            run(*batches[i % 3])
        cp.cuda.Device().synchronize()
        line = (f"{case.name}:{case.dtype.name} {'captured' if captured else 'eager   '} "
                f"model+batches {base / MB:7.1f} MB  default pool used "
                f"{pool.used_bytes() / MB:7.1f} total {pool.total_bytes() / MB:7.1f}")
        if captured:
            line += (f"  private pool used {run.pool.used_bytes() / MB:7.1f} total "
                     f"{run.pool.total_bytes() / MB:7.1f}  graph {type(run.graph).__name__}")
        print(line, flush=True)
        del model, opt, run, batches, step


if __name__ == "__main__":
    for c in ts._cases():
        if any(ts.selected(c, [w]) for w in sys.argv[1:]):
            probe(c)
