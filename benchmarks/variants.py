"""What the structured variants save before any block-sparse kernel exists (issue 3):

- SliceOut Linear forward+backward on the slices against the dense Linear, keep 0.25/0.5/0.75;
- depth dropout on ResNet-56: training-step time at p = 0, 0.25, 0.5, 0.75 against the plain
  ResNet-56 and the paper's theoretical saving;
- the interim SparseDrop gather path against dense, to show where it stands.

Usage: python benchmarks/variants.py [--device gpu|cpu] [--quick]
JSON to $OUT/variants.json; a table last.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

sys.path.insert(0, ".")
import cudrop as cd  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from cudrop import backend, models, nn, optim  # noqa: E402

# Guo & Gould, ResNet-56 with 3 down-sampling units kept: time saved at p = 0.25 / 0.5 / 0.75.
PAPER_DEPTH_SAVING = {0.25: 0.123, 0.5: 0.346, 0.75: 0.567}


def _timer(xp):
    def sync():
        if xp is not np:
            xp.cuda.Device().synchronize()

    def run(fn, reps, warmup=3):
        for _ in range(warmup):
            fn()
        sync()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return ts
    return run


def bench_sliceout(xp, dtype, sizes, reps):
    """Layer fwd+bwd, timed back to back with CUDA events on the GPU (the device's throughput
    when Python keeps ahead, as in a training loop at these sizes), synchronised on the CPU."""
    from cudrop.nn.sliceout import SliceOutLinear
    if xp is np:
        sync_run = _timer(xp)

        def run(fn, reps):
            return sync_run(fn, reps)
    else:
        from benchmarks.common import time_gpu

        def run(fn, reps):
            return [time_gpu(fn, [()], reps=reps) / 1e3]
    rows = []
    for m, k, n in sizes:
        x = cd.Tensor(xp.asarray(np.random.default_rng(0).standard_normal((m, k)).astype(dtype)),
                      requires_grad=True)
        g = xp.asarray(np.random.default_rng(1).standard_normal((m, n)).astype(dtype))

        def step(layer):
            def f():
                layer.zero_grad()
                x.grad = None
                layer(x).backward(g)
            return f
        dense = nn.Linear(k, n, dtype=dtype).to("gpu" if xp is not np else "cpu")
        t_dense = float(np.median(run(step(dense), reps)))
        for keep in (0.25, 0.5, 0.75):
            for mode, align in (("input", "auto"), ("output", "auto"), ("input", None)):
                layer = SliceOutLinear(k, n, p=1 - keep, mode=mode, align=align, dtype=dtype)
                layer.to("gpu" if xp is not np else "cpu")
                t = float(np.median(run(step(layer), reps)))
                rows.append(dict(shape=[m, k, n], keep=keep, mode=mode, align=layer.align,
                                 ms=t * 1e3, dense_ms=t_dense * 1e3, speedup=t_dense / t,
                                 ideal=1 / keep))
    return rows


def bench_depth(xp, batch, size, reps):
    run = _timer(xp)
    device = "gpu" if xp is not np else "cpu"
    rng = np.random.default_rng(0)
    x = cd.Tensor(xp.asarray(rng.standard_normal((batch, 3, size, size)).astype(np.float32)))
    y = xp.asarray(rng.integers(0, 10, batch))

    def step_time(model):
        model.to(device)
        opt = optim.SGD(model.parameters(), 0.01, momentum=0.9)

        def f():
            loss = cd.cross_entropy(model(x), y)
            model.zero_grad()
            loss.backward()
            opt.step()
        # mean, not median: the per-step work varies by design (units dropped at random)
        return float(np.mean(run(f, reps)))
    base = step_time(models.resnet56(in_channels=3, p=0.0))
    rows = [dict(p=0.0, variant="plain", ms=base * 1e3, saving=0.0, paper=0.0)]
    for p in (0.0, 0.25, 0.5, 0.75):
        model = models.resnet56(in_channels=3, p=0.0, depth_dropout=0.5)
        for unit in model.units:  # p = 0 keeps the architecture (trainable shortcuts) and drops none
            if not unit.downsamples:
                unit.p = p
        t = step_time(model)
        rows.append(dict(p=p, variant="depth_dropout", ms=t * 1e3, saving=1 - t / base,
                         paper=PAPER_DEPTH_SAVING.get(p, None)))
    return rows


def bench_sparsedrop(xp, dtype, size, reps):
    from cudrop.nn.sparsedrop import SparseDropLinear
    run = _timer(xp)
    device = "gpu" if xp is not np else "cpu"
    m = k = n = size
    x = cd.Tensor(xp.asarray(np.random.default_rng(0).standard_normal((m, k)).astype(dtype)),
                  requires_grad=True)
    g = xp.asarray(np.random.default_rng(1).standard_normal((m, n)).astype(dtype))
    dense = nn.Linear(k, n, dtype=dtype).to(device)

    def step(layer):
        def f():
            layer.zero_grad()
            layer(x).backward(g)
        return f
    t_dense = float(np.median(run(step(dense), reps)))
    rows = []
    for p in (0.25, 0.5, 0.75):
        layer = SparseDropLinear(k, n, p, dtype=dtype).to(device)
        t = float(np.median(run(step(layer), reps)))
        rows.append(dict(size=size, p=p, ms=t * 1e3, dense_ms=t_dense * 1e3, speedup=t_dense / t))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    args = ap.parse_args()
    device = backend.resolve_device(args.device)
    xp = backend.xp_for(device)
    if args.quick:
        s_sizes, dtype, batch, size, reps, sd = [(64, 256, 256)], np.float32, 8, 8, 3, 256
    else:
        s_sizes = [(4096, 4096, 4096), (1024, 1024, 1024)]
        dtype = np.float16 if device == "gpu" else np.float32
        batch, size, reps, sd = 128, 32, 30, 4096
    out = dict(device=device, dtype=np.dtype(dtype).name,
               sliceout=bench_sliceout(xp, dtype, s_sizes, reps),
               depth=bench_depth(xp, batch, size, reps),
               sparsedrop_gather=bench_sparsedrop(xp, dtype, sd, reps))
    write_json("variants.json", out)
    print(f"SliceOut Linear fwd+bwd ({out['dtype']}) vs dense")
    print(f"{'M,K,N':18s} {'keep':>5s} {'mode':>6s} {'align':>5s} {'ms':>8s} {'dense':>8s} "
          f"{'speedup':>7s} {'ideal':>6s}")
    for r in out["sliceout"]:
        print(f"{str(r['shape']):18s} {r['keep']:5.2f} {r['mode']:>6s} {str(r['align']):>5s} {r['ms']:8.3f} "
              f"{r['dense_ms']:8.3f} {r['speedup']:7.2f} {r['ideal']:6.2f}")
    print(f"Depth dropout, ResNet-56, batch {batch}, {size}x{size}: step time")
    print(f"{'variant':14s} {'p':>5s} {'ms':>8s} {'saving':>7s} {'paper':>6s}")
    for r in out["depth"]:
        paper = "" if r["paper"] is None else f"{r['paper']:6.3f}"
        print(f"{r['variant']:14s} {r['p']:5.2f} {r['ms']:8.2f} {r['saving']:7.3f} {paper}")
    print("SparseDrop linear fwd+bwd, interim gather path (the kernels replace it)")
    for r in out["sparsedrop_gather"]:
        print(f"  {r['size']}^3 p={r['p']:.2f}: {r['ms']:.3f} ms vs dense {r['dense_ms']:.3f} "
              f"ms ({r['speedup']:.2f}x)")


if __name__ == "__main__":
    main()
