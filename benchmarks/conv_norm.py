"""conv2d and batch_norm on ResNet-56 layer shapes (batch 128, float32): the GPU kernels against
the portable path (the NumPy-reference code run on CuPy: ``_conv2d_arrays``,
``_batch_norm_arrays``), in one process, plus the conv forward
with a strided-batched GEMM that writes NCHW directly (the column-layout question).

Fusions, new against old ("fused" rows): the 1x1 stride-1 convolution of depth dropout's
shortcut as strided-batched cuBLASLt GEMMs (``conv2d``) against the im2col path
(``_conv2d_cols``), forward and backward, at ResNet-56's shortcut shapes; batch norm with its
ReLU fused (``act='relu'``) against batch norm then ``relu``; ``add_relu`` against ``a + b`` then
``relu`` (forward only: both backwards are the one relu_bwd kernel).

Two numbers per op: host ms (what Python spends enqueueing one call) and device ms (GPU time per
call: the calls are queued behind a spin kernel, so the host is ahead and launch gaps vanish).

Usage: python benchmarks/conv_norm.py   (GPU; JSON to $OUT/conv_norm.json, a table last)
"""
from __future__ import annotations

import sys
import time

import numpy as np

sys.path.insert(0, ".")
from benchmarks.common import write_json  # noqa: E402
from cudrop.functional import _act, _conv as Fconv, _gemm, _norm as Fnorm  # noqa: E402
from cudrop.functional._matmul import matmul  # noqa: E402

N = 128
CONV = [  # (C, O, H, k, stride, padding)
    (16, 16, 32, 3, 1, 1), (32, 32, 16, 3, 1, 1), (64, 64, 8, 3, 1, 1),
    (16, 32, 32, 3, 2, 1), (16, 32, 32, 1, 2, 0), (64, 64, 8, 1, 1, 0)]
BN = [(16, 32), (32, 16), (64, 8)]  # (C, H); also ResNet-56's stride-1 shortcut convs (C = O)
REPS = 20


def timer(cp):
    spin = cp.RawKernel(r'''extern "C" __global__ void spin(long long cycles) {
        long long t0 = clock64(); while (clock64() - t0 < cycles) { } }''', "spin")
    khz = cp.cuda.Device().attributes.get("ClockRate", 2_000_000)  # kHz

    def measure(fn, inputs):
        for i in range(3):
            fn(*inputs[i % len(inputs)])
        cp.cuda.Device().synchronize()
        best_dev, best_host, ahead = [], [], True
        for _ in range(5):
            spin((1,), (1,), (np.int64(khz * 40),))  # 40 ms of device time to hide the host
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            t0 = time.perf_counter()
            for i in range(REPS):
                fn(*inputs[i % len(inputs)])
            host = time.perf_counter() - t0
            end.record()
            end.synchronize()
            ahead &= host < 0.035
            best_dev.append(cp.cuda.get_elapsed_time(start, end) / REPS)
            best_host.append(host * 1e3 / REPS)
        return float(np.median(best_dev)), float(np.median(best_host)), ahead
    return measure


def direct_nchw(cp, x, w, stride, padding):
    """im2col kernel, then one strided-batched GEMM writing y[n] = W @ cols[:, n*P:(n+1)*P]
    straight into NCHW (weight stride 0, column blocks with leading dimension N*P)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho, wo = Fconv.out_size(h, kh, stride, padding), Fconv.out_size(wd, kw, stride, padding)
    p, q, k = ho * wo, n * ho * wo, c * kh * kw
    cols = cp.empty((k, q), x.dtype)
    t = Fconv._threads(q)
    Fconv._launch("im2col", x.dtype, (-(-q // t), c), (t,),
                  (x, cols) + Fconv._geometry_args(x.shape, (kh, kw), (stride,) * 2,
                                                   (padding,) * 2, (ho, wo)))
    y = cp.empty((n, o, ho, wo), x.dtype)
    one, zero = np.ones((), np.float32), np.zeros((), np.float32)
    # column-major: y[n]ᵀ (P, O) = cols_nᵀ (P, K; ld Q) @ Wᵀ (K, O; ld K)
    cp.cuda.cublas.gemmStridedBatchedEx(
        cp.cuda.device.get_cublas_handle(), 0, 0, p, o, k, one.ctypes.data,
        cols.data.ptr, 0, q, p, w.data.ptr, 0, k, 0, zero.ctypes.data,
        y.data.ptr, 0, p, o * p, n, 68, -1)
    return y


def main():
    import cupy as cp
    measure = timer(cp)
    rng = np.random.default_rng(0)
    rows = []

    def both(name, kernels, portable, labels=("kernels", "portable"), into=rows):
        """``kernels``, ``portable``: ``(fn, inputs)`` of each path, ``inputs`` a list of argument
        tuples or a function of no arguments that makes them (so that backward gets the
        ``saved`` of its own path's forward); ``labels`` name them in the row."""
        out = {}
        for label, (fn, inputs) in zip(labels, (kernels, portable)):
            out[label] = measure(fn, inputs() if callable(inputs) else inputs)
        into.append(dict(op=name, **{f"{k}_{f}": v[i] for k, v in out.items()
                                     for i, f in enumerate(("device_ms", "host_ms", "ahead"))}))
        return into[-1]

    for c, o, h, k, s, p in CONV:
        xs = [cp.asarray(rng.standard_normal((N, c, h, h), np.float32)) for _ in range(3)]
        w = cp.asarray(rng.standard_normal((o, c, k, k), np.float32))
        name = f"conv {c}->{o} {h}x{h} k{k} s{s} p{p}"
        args = [(x,) for x in xs]
        both(name + " fwd", (lambda x: Fconv.conv2d(x, w, None, s, p), args),
             (lambda x: Fconv._conv2d_arrays(x, w, None, s, p), args))
        ref = Fconv.conv2d(xs[0], w, None, s, p)[0]
        gys = [cp.asarray(rng.standard_normal(ref.shape, np.float32)) for _ in xs]
        both(name + " bwd",
             (Fconv.conv2d_backward,
              lambda: [(g, Fconv.conv2d(x, w, None, s, p)[1]) for g, x in zip(gys, xs)]),
             (Fconv._conv2d_backward_arrays,
              lambda: [(g, Fconv._conv2d_arrays(x, w, None, s, p)[1]) for g, x in zip(gys, xs)]))
        alt = direct_nchw(cp, xs[0], w, s, p)
        err = float(cp.linalg.norm(alt - ref) / cp.linalg.norm(ref))
        dev, host, ahead = measure(lambda x: direct_nchw(cp, x, w, s, p), [(x,) for x in xs])
        rows.append(dict(op=name + " fwd, GEMM into NCHW", kernels_device_ms=dev,
                         kernels_host_ms=host, kernels_ahead=ahead, rel_err=err))

    for c, h in BN:
        xs = [cp.asarray(rng.normal(0.5, 2.0, (N, c, h, h)).astype(np.float32)) for _ in range(3)]
        gamma, beta = cp.ones(c, np.float32), cp.zeros(c, np.float32)
        rm, rv = cp.zeros(c, np.float32), cp.ones(c, np.float32)
        name = f"batch_norm {c}x{h}x{h}"
        args = [(x,) for x in xs]
        both(name + " train fwd", (lambda x: Fnorm.batch_norm(x, gamma, beta, rm, rv, True), args),
             (lambda x: Fnorm._batch_norm_arrays(x, gamma, beta, rm, rv, True), args))
        # backward follows the path of the forward that made its ``saved``
        both(name + " train bwd",
             (Fnorm.batch_norm_backward,
              lambda: [Fnorm.batch_norm(x, gamma, beta, rm, rv, True) for x in xs]),
             (Fnorm.batch_norm_backward,
              lambda: [Fnorm._batch_norm_arrays(x, gamma, beta, rm, rv, True) for x in xs]))
        both(name + " eval fwd", (lambda x: Fnorm.batch_norm(x, gamma, beta, rm, rv, False), args),
             (lambda x: Fnorm._batch_norm_arrays(x, gamma, beta, rm, rv, False), args))
    # host cost of the CuPy primitives the fast paths are made of
    noop = cp.RawKernel(r'''extern "C" __global__ void noop(const float* a, float* b, int c0,
        int c1, int c2, int c3, int c4, int c5, int c6, int c7, int c8, int c9, int c10,
        int c11) { }''', "noop")
    z = cp.empty(16, np.float32)
    ints = tuple(np.int32(i) for i in range(12))
    for name, fn in (("cupy.empty((3, 16))", lambda: cp.empty((3, 16), np.float32)),
                     ("RawKernel launch, 14 args", lambda: noop((1,), (32,), (z, z) + ints)),
                     ("ascontiguousarray (contiguous)", lambda: cp.ascontiguousarray(z))):
        dev, host, ahead = measure(fn, [()])
        rows.append(dict(op="host: " + name, kernels_device_ms=dev, kernels_host_ms=host,
                         kernels_ahead=ahead))
    # the GEMM alone, for scale
    a = cp.asarray(rng.standard_normal((16, 144), np.float32))
    bs = [cp.asarray(rng.standard_normal((144, N * 1024), np.float32)) for _ in range(3)]
    dev, host, ahead = measure(matmul, [(a, b) for b in bs])
    rows.append(dict(op="GEMM (16,144)@(144,131072)", kernels_device_ms=dev, kernels_host_ms=host,
                     kernels_ahead=ahead))
    fused = fusions(cp, rng, both)
    write_json("conv_norm.json", dict(batch=N, reps=REPS, rows=rows, fused=fused,
                                      gemm_available=_gemm.available()))
    print(f"{'op':44s} {'dev ms':>8s} {'host ms':>8s} | {'portable dev':>12s} {'host':>7s}")
    for r in rows:
        pd, ph = r.get("portable_device_ms"), r.get("portable_host_ms")
        flag = "" if r["kernels_ahead"] and r.get("portable_ahead", True) else " (host not ahead)"
        tail = f"{pd:12.4f} {ph:7.4f}" if pd is not None else f"{'':12s} {'':7s}"
        extra = f" rel err {r['rel_err']:.1e}" if "rel_err" in r else ""
        print(f"{r['op']:44s} {r['kernels_device_ms']:8.4f} {r['kernels_host_ms']:8.4f} | "
              f"{tail}{flag}{extra}")
    print(f"\n{'fused (new) vs old':44s} {'new dev':>8s} {'host':>8s} | {'old dev':>12s} "
          f"{'host':>7s} {'old/new dev':>11s}")
    for r in fused:
        flag = "" if r["new_ahead"] and r["old_ahead"] else " (host not ahead)"
        extra = f" rel err {r['rel_err']:.1e}" if "rel_err" in r else ""
        print(f"{r['op']:44s} {r['new_device_ms']:8.4f} {r['new_host_ms']:8.4f} | "
              f"{r['old_device_ms']:12.4f} {r['old_host_ms']:7.4f} "
              f"{r['old_device_ms'] / r['new_device_ms']:11.2f}{flag}{extra}")


def fusions(cp, rng, both):
    """The "fused" rows: each fusion (new) against what it replaces (old), forward and backward
    timed apart, at ResNet-56's shapes (batch 128, float32). Without nvmath-python
    (``gemm_available`` False in the JSON) ``conv2d`` runs im2col too: both 1x1 columns then
    time the same path."""
    rows, labels = [], ("new", "old")
    for c, h in BN:
        xs = [cp.asarray(rng.normal(0.5, 2.0, (N, c, h, h)).astype(np.float32)) for _ in range(3)]
        gs = [cp.asarray(rng.standard_normal((N, c, h, h)).astype(np.float32)) for _ in xs]
        args = [(x,) for x in xs]
        w = cp.asarray(rng.standard_normal((c, c, 1, 1)).astype(np.float32))
        name = f"1x1 conv {c}->{c} {h}x{h}"
        row = both(name + " fwd", (lambda x: Fconv.conv2d(x, w), args),
                   (lambda x: Fconv._conv2d_cols(x, w), args), labels, rows)
        new, old = Fconv.conv2d(xs[0], w)[0], Fconv._conv2d_cols(xs[0], w)[0]
        row["rel_err"] = float(cp.linalg.norm(new - old) / cp.linalg.norm(old))
        both(name + " bwd",
             (Fconv.conv2d_backward, lambda: [(g, Fconv.conv2d(x, w)[1]) for g, x in zip(gs, xs)]),
             (Fconv.conv2d_backward,
              lambda: [(g, Fconv._conv2d_cols(x, w)[1]) for g, x in zip(gs, xs)]), labels, rows)

        gamma = cp.asarray(rng.normal(0.0, 1.0, c).astype(np.float32))  # about half cut
        beta, rm, rv = cp.zeros(c, np.float32), cp.zeros(c, np.float32), cp.ones(c, np.float32)
        name = f"batch_norm + relu {c}x{h}x{h} train"

        def separate(x):
            z, saved = Fnorm.batch_norm(x, gamma, beta, rm, rv, True)
            y, rsaved = _act.relu(z)
            return y, saved, rsaved

        both(name + " fwd",
             (lambda x: Fnorm.batch_norm(x, gamma, beta, rm, rv, True, act="relu"), args),
             (separate, args), labels, rows)
        both(name + " bwd",
             (Fnorm.batch_norm_backward,
              lambda: [(g, Fnorm.batch_norm(x, gamma, beta, rm, rv, True, act="relu")[1])
                       for g, x in zip(gs, xs)]),
             (lambda g, saved, rsaved: Fnorm.batch_norm_backward(_act.relu_backward(g, rsaved),
                                                                 saved),
              lambda: [(g,) + separate(x)[1:] for g, x in zip(gs, xs)]), labels, rows)
        both(f"add + relu {c}x{h}x{h} fwd", (_act.add_relu, list(zip(xs, gs))),
             (lambda a, b: _act.relu(a + b), list(zip(xs, gs))), labels, rows)
    return rows


if __name__ == "__main__":
    main()
