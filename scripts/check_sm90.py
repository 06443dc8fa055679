"""Build, check and time cudrop/raw_kernels/bsmm_sm90.cu (Hopper wgmma block-sparse GEMM).

Usage (on an sm_90 device):  PYTHONPATH=. python3 scripts/check_sm90.py [--quick] [--no-time]

Correctness: float64 dense reference, random normal inputs, output poisoned with NaN, relative
Frobenius error < 5e-3 (fp16) / 1e-2 (bf16), every output written. Timing: CUDA events, median
of 30+ launches after warm-up, 3 rotating input sets, against cupy.matmul (and torch if present).
"""
from __future__ import annotations

import sys
import time

import numpy as np
import cupy as cp

from cudrop import raw_kernels

NULL = np.uint64(0)
SRC = raw_kernels.source("bsmm_sm90.cu")
CT = {"float16": "cd_f16", "bfloat16": "cd_bf16"}
QUICK = "--quick" in sys.argv
NO_TIME = "--no-time" in sys.argv


def bf16_dtype():
    try:
        import ml_dtypes  # noqa: F401
        return np.dtype("bfloat16")
    except Exception:
        return None


def expr(dt, ak, bk, act, bm, bn, st, bkk=64, ws=False):
    b = lambda x: "true" if x else "false"
    tail = f", {bkk}" if bkk != 64 else ""
    return f"bsmm_sm90{'_ws' if ws else ''}<{CT[dt]}, {b(ak)}, {b(bk)}, {act}, {bm}, {bn}, {st}{tail}>"


_MODS = {}


def get_kernels(exprs, options=()):
    key = (tuple(sorted(set(exprs))), tuple(options))
    if key not in _MODS:
        t0 = time.time()
        mod = cp.RawModule(code=SRC, options=("--std=c++17", "-arch=sm_90a") + tuple(options),
                           name_expressions=list(key[0]))
        ks = {}
        for e in key[0]:
            k = mod.get_function(e)
            _BK_OF[id(k)] = 32 if e.endswith(", 32>") else 64
            if e.startswith("bsmm_sm90_ws"):
                _WS.add(id(k))
            ks[e] = k
        print(f"  compiled {len(key[0])} kernels in {time.time() - t0:.1f}s {options}", flush=True)
        _MODS[key] = ks
    return _MODS[key]


def smem_bytes(bm, bn, st, bkk=64):
    return st * (bm + bn) * bkk * 2 + 1024


# ---- 16-bit storage helpers: we keep inputs as uint16 bit patterns and compute references in f64
def to_bits(x64, dt):
    if dt == "float16":
        return x64.astype(cp.float16).view(cp.uint16)
    f = x64.astype(cp.float32).view(cp.uint32)
    # round to nearest even to bf16
    r = (f + 0x7FFF + ((f >> 16) & 1)) >> 16
    return r.astype(cp.uint16)


def from_bits(u, dt):
    if dt == "float16":
        return u.view(cp.float16).astype(cp.float64)
    return (u.astype(cp.uint32) << 16).view(cp.float32).astype(cp.float64)


def poison(shape, dt):
    # NaN bit pattern in both formats
    return cp.full(shape, 0x7E00 if dt == "float16" else 0x7FC0, dtype=cp.uint16)


_SMEM_SET = set()
_BK_OF = {}
_WS = set()


def launch(k, bm, bn, st, A, B, C, bias, M, N, K, lda, ldb, ldc, alpha, count, index, istride,
           rblk, kblk, bits, bstride, cblk):
    bkk = _BK_OF.get(id(k), 64)
    ws = id(k) in _WS
    smem = smem_bytes(bm, bn, st, bkk) + (1024 if ws else 0)
    if id(k) not in _SMEM_SET:
        k.max_dynamic_shared_size_bytes = smem
        _SMEM_SET.add(id(k))
    grid = ((N + bn - 1) // bn, (M + bm - 1) // bm, 1)
    block = ((bm // 64 + (1 if ws else 0)) * 128, 1, 1)
    k(grid, block, (A, B, C, bias if bias is not None else NULL,
                    np.int32(M), np.int32(N), np.int32(K), np.int64(lda), np.int64(ldb),
                    np.int64(ldc), np.float32(alpha),
                    count if count is not None else NULL, index if index is not None else NULL,
                    np.int32(istride), np.int32(rblk), np.int32(kblk),
                    bits if bits is not None else NULL, np.int32(bstride), np.int32(cblk)),
      shared_mem=smem)


def run_case(kernels, dt, ak, bk, act, bm, bn, st, M, N, K, bkk=64, ws=False, sparse=None, kblk=128, pk=0.5,
             outmask=None, cblk=64, pc=0.5, use_bias=False, alpha=1.0, rng=None, options=()):
    rng = rng or np.random.default_rng()
    k = kernels[expr(dt, ak, bk, act, bm, bn, st, bkk, ws)]
    # stored operands (padded leading dims, multiples of 8)
    a64 = cp.asarray(rng.standard_normal((M, K)))
    b64 = cp.asarray(rng.standard_normal((K, N)))
    if ak:
        lda = K + 8
        As = cp.zeros((M, lda), cp.uint16); As[:, :K] = to_bits(a64, dt)
    else:
        lda = M + 8
        As = cp.zeros((K, lda), cp.uint16); As[:, :M] = to_bits(a64.T, dt)
    if bk:
        ldb = K
        Bs = to_bits(cp.ascontiguousarray(b64.T), dt)
    else:
        ldb = N + 16
        Bs = cp.zeros((K, ldb), cp.uint16); Bs[:, :N] = to_bits(b64, dt)
    a = from_bits(to_bits(a64, dt), dt)
    b = from_bits(to_bits(b64, dt), dt)
    rblk = 128 if bm <= 128 else bm
    nrb = (M + rblk - 1) // rblk
    count = index = None
    istride = 0
    ref = cp.zeros((M, N))
    if sparse:
        nkb = (K + kblk - 1) // kblk
        lists = []
        for r in range(nrb):
            p = 0.0 if r == 1 else (1.0 if r == 2 else pk)
            keep = np.nonzero(rng.random(nkb) < p)[0]
            lists.append(keep)
        istride = nkb
        idx = np.zeros((nrb, nkb), np.int32)
        cnt = np.zeros(nrb, np.int32)
        for r, l in enumerate(lists):
            cnt[r] = len(l); idx[r, :len(l)] = l
        count, index = cp.asarray(cnt), cp.asarray(idx)
        for r, l in enumerate(lists):
            km = cp.zeros(K)
            for j in l:
                km[j * kblk:min((j + 1) * kblk, K)] = 1
            rs = slice(r * rblk, min((r + 1) * rblk, M))
            ref[rs] = (a[rs] * km[None, :]) @ b
    else:
        ref = a @ b
    ref = alpha * ref
    bias = None
    if use_bias:
        b_ = to_bits(cp.asarray(rng.standard_normal(N)), dt)
        bias = b_
        ref = ref + from_bits(b_, dt)[None, :]
    if act == 1:
        ref = cp.maximum(ref, 0)
    elif act == 2:
        from cupyx.scipy.special import erf
        ref = 0.5 * ref * (1 + erf(ref / np.sqrt(2)))
    bits = None
    bstride = 0
    dropped = None
    if outmask:
        ncb = (N + cblk - 1) // cblk
        bstride = (ncb + 63) // 64
        keepc = rng.random((nrb, ncb)) < pc
        keepc[min(1, nrb - 1), :] = False        # one fully dropped row block
        words = np.zeros((nrb, bstride), np.uint64)
        for r in range(nrb):
            for c in range(ncb):
                if keepc[r, c]:
                    words[r, c // 64] |= np.uint64(1) << np.uint64(c % 64)
        bits = cp.asarray(words)
        colkeep = np.repeat(keepc, cblk, axis=1)[:, :N]
        rowkeep = np.repeat(colkeep, rblk, axis=0)[:M]
        ref = ref * cp.asarray(rowkeep)
        dropped = cp.asarray(~rowkeep)
    ldc = N + 2 if N % 2 == 0 else N
    Cs = poison((M, ldc), dt)
    launch(k, bm, bn, st, As, Bs, Cs, bias, M, N, K, lda, ldb, ldc, alpha, count, index, istride,
           rblk, kblk, bits, bstride, cblk)
    cp.cuda.Device().synchronize()
    out = from_bits(Cs[:, :N], dt)
    pad_ok = bool(cp.all(Cs[:, N:] == (0x7E00 if dt == "float16" else 0x7FC0))) if ldc > N else True
    nan = int(cp.isnan(out).sum())
    err = float(cp.linalg.norm(out - ref) / max(float(cp.linalg.norm(ref)), 1e-30)) if nan == 0 else float("nan")
    tol = 5e-3 if dt == "float16" else 1e-2
    if outmask:  # dropped elements must be exact zeros
        exact = bool(cp.all(out[dropped] == 0)) if nan == 0 else False
    else:
        exact = True
    ok = nan == 0 and err < tol and pad_ok and exact
    return ok, err, nan, pad_ok


def correctness(options=(), only_mn=False):
    rng = np.random.default_rng(1234)
    cases = []
    combos = [(True, False), (True, True), (False, False), (False, True)]
    for dt in ("float16", "bfloat16"):
        for ak, bk in combos:
            if only_mn and ak and bk:
                continue
            cases.append(dict(dt=dt, ak=ak, bk=bk, act=0, bm=128, bn=256, st=4, M=200, N=136, K=264))
            cases.append(dict(dt=dt, ak=ak, bk=bk, act=0, bm=128, bn=256, st=8, bkk=32, M=1000,
                              N=1000, K=1000, sparse=True, kblk=40, pk=0.5))
            cases.append(dict(dt=dt, ak=ak, bk=bk, act=0, bm=128, bn=256, st=4, ws=True, M=1000,
                              N=1000, K=1000, sparse=True, kblk=40, pk=0.5, outmask=True, cblk=64))
            cases.append(dict(dt=dt, ak=ak, bk=bk, act=0, bm=128, bn=256, st=8, bkk=32, ws=True,
                              M=200, N=136, K=264))
            cases.append(dict(dt=dt, ak=ak, bk=bk, act=0, bm=128, bn=256, st=4, M=1000, N=1000,
                              K=1000, sparse=True, kblk=128, pk=0.5))
            cases.append(dict(dt=dt, ak=ak, bk=bk, act=0, bm=128, bn=128, st=6, M=1000, N=520,
                              K=1000, sparse=True, kblk=32, pk=0.5, alpha=0.5))
            if dt == "float16":
                cases.append(dict(dt=dt, ak=ak, bk=bk, act=0, bm=128, bn=256, st=4, M=640, N=1000,
                                  K=1000, outmask=True, cblk=64, pc=0.5))
    cases += [
        dict(dt="float16", ak=True, bk=True, act=0, bm=128, bn=256, st=4, M=1000, N=999, K=520,
             outmask=True, cblk=300, pc=0.5, use_bias=True),
        dict(dt="bfloat16", ak=True, bk=True, act=0, bm=128, bn=128, st=6, M=384, N=777, K=264,
             outmask=True, cblk=24, pc=0.5, sparse=True, kblk=40, pk=0.6),
        dict(dt="float16", ak=True, bk=False, act=1, bm=128, bn=256, st=4, M=1000, N=1000, K=1000,
             use_bias=True, outmask=True, cblk=128, sparse=True, kblk=128),
        dict(dt="bfloat16", ak=True, bk=False, act=1, bm=128, bn=128, st=6, M=300, N=264, K=136,
             use_bias=True),
        dict(dt="float16", ak=True, bk=False, act=2, bm=128, bn=128, st=6, M=256, N=512, K=512,
             use_bias=True, alpha=0.25),
        dict(dt="bfloat16", ak=True, bk=False, act=2, bm=128, bn=256, st=4, M=1000, N=1000, K=1000,
             use_bias=True, sparse=True, kblk=64),
        dict(dt="float16", ak=True, bk=False, act=0, bm=64, bn=256, st=4, M=1000, N=1000, K=1000,
             sparse=True, kblk=128),
        dict(dt="float16", ak=True, bk=False, act=0, bm=128, bn=256, st=4, M=2048, N=2048, K=4096),
        dict(dt="float16", ak=True, bk=False, act=0, bm=192, bn=256, st=4, M=1000, N=1000, K=1000),
        dict(dt="float16", ak=False, bk=False, act=0, bm=192, bn=256, st=4, M=1000, N=1000, K=1000,
             sparse=True, kblk=32),
        dict(dt="bfloat16", ak=True, bk=True, act=1, bm=192, bn=256, st=4, M=1000, N=1000, K=1000,
             sparse=True, kblk=128, outmask=True, cblk=64, use_bias=True),
        dict(dt="bfloat16", ak=True, bk=False, act=0, bm=192, bn=256, st=4, M=2048, N=2048, K=2048),
        dict(dt="float16", ak=True, bk=False, act=0, bm=192, bn=256, st=8, bkk=32, M=1000, N=1000,
             K=1000, sparse=True, kblk=64),
        dict(dt="float16", ak=True, bk=True, act=0, bm=128, bn=256, st=8, bkk=32, M=1000, N=999,
             K=520, outmask=True, cblk=300, use_bias=True),
    ]
    if only_mn:
        cases = [c for c in cases if not (c["ak"] and c["bk"])]
    exprs = [expr(c["dt"], c["ak"], c["bk"], c["act"], c["bm"], c["bn"], c["st"], c.get("bkk", 64),
                  c.get("ws", False)) for c in cases]
    kernels = get_kernels(exprs, options)
    results = []
    for c in cases:
        c = dict(c)
        name = (f"{c['dt'][:4]} A{'K' if c['ak'] else 'M'}B{'K' if c['bk'] else 'N'} act{c['act']} "
                f"{c['bm']}x{c['bn']}s{c['st']}k{c.get('bkk', 64)}{'ws' if c.get('ws') else ''} "
                f"{c['M']}x{c['N']}x{c['K']}"
                + (f" dsd(kblk={c.get('kblk')})" if c.get("sparse") else "")
                + (f" mask(cblk={c.get('cblk')})" if c.get("outmask") else "")
                + (" bias" if c.get("use_bias") else ""))
        try:
            ok, err, nan, pad_ok = run_case(kernels, rng=rng, **c)
        except Exception as e:  # noqa: BLE001
            print(f"  FAIL {name}: {type(e).__name__}: {e}", flush=True)
            results.append((name, False))
            if "illegal" in str(e).lower() or "launch" in str(e).lower():
                raise
            continue
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: relerr={err:.2e} nan={nan} pad_ok={pad_ok}",
              flush=True)
        results.append((name, ok, c["ak"], c["bk"]))
    return results


def bench(fn, sets, iters=30, warm=5):
    for i in range(warm):
        fn(*sets[i % len(sets)])
    ev = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(iters)]
    for i in range(iters):
        ev[i][0].record()
        fn(*sets[i % len(sets)])
        ev[i][1].record()
    ev[-1][1].synchronize()
    return float(np.median([cp.cuda.get_elapsed_time(a, b) for a, b in ev])) * 1e-3


def timing():
    rows = []
    sizes = [4096, 8192]
    cfgs = [(128, 256, 4, 64, False), (192, 256, 8, 32, False), (128, 256, 4, 64, True),
            (128, 256, 8, 32, True)]
    exprs = [expr(dt, True, False, 0, *c) for dt in CT for c in cfgs]
    kernels = get_kernels(exprs)
    try:
        import torch
    except Exception:
        torch = None
    for S in sizes:
        for dt in ("float16", "bfloat16"):
            M = N = K = S
            flops = 2.0 * M * N * K
            sets = []
            for _ in range(3):
                a = cp.random.standard_normal((M, K), dtype=cp.float32)
                b = cp.random.standard_normal((K, N), dtype=cp.float32)
                sets.append((to_bits(a, dt), to_bits(b, dt), cp.empty((M, N), cp.uint16)))
                del a, b
            # cuBLAS through cupy.matmul (fp16 only: cupy has no bf16 dtype) and torch
            ref_t = None
            if dt == "float16":
                hs = [(x.view(cp.float16), y.view(cp.float16)) for x, y, _ in sets]
                t = bench(lambda x, y: cp.matmul(x, y), hs)
                rows.append((f"{S}^3 {dt}", "cupy.matmul", t, flops / t / 1e12, 1.0))
                ref_t = t
            if torch is not None:
                tdt = torch.float16 if dt == "float16" else torch.bfloat16
                ts = [(torch.randn(M, K, device="cuda", dtype=tdt),
                       torch.randn(K, N, device="cuda", dtype=tdt)) for _ in range(3)]
                t = bench(lambda x, y: torch.matmul(x, y), ts)
                rows.append((f"{S}^3 {dt}", "torch.matmul", t, flops / t / 1e12,
                             (ref_t / t) if ref_t else 1.0))
                if ref_t is None:
                    ref_t = t
                del ts
                torch.cuda.empty_cache()
            for bm, bn, st, bkk, ws in cfgs:
                k = kernels[expr(dt, True, False, 0, bm, bn, st, bkk, ws)]
                f = lambda A, B, C, k=k, bm=bm, bn=bn, st=st: launch(
                    k, bm, bn, st, A, B, C, None, M, N, K, K, N, N, 1.0, None, None, 0, 128, 128,
                    None, 0, 64)
                t = bench(f, sets)
                rows.append((f"{S}^3 {dt}", f"sm90 {bm}x{bn}s{st}k{bkk}{'ws' if ws else ''} dense", t, flops / t / 1e12,
                             ref_t / t))
            if S == 4096:
                # 50%-kept dsd, rblk=128, kblk=128
                rng = np.random.default_rng(0)
                nkb = K // 128
                for bm, bn, st, bkk, ws in cfgs:
                    rblk = 384 if bm == 192 else 128
                    nrb = (M + rblk - 1) // rblk
                    idx = np.zeros((nrb, nkb), np.int32)
                    cnt = np.zeros(nrb, np.int32)
                    for r in range(nrb):
                        keep = np.sort(rng.permutation(nkb)[: nkb // 2])
                        cnt[r] = len(keep); idx[r, :len(keep)] = keep
                    dc, di = cp.asarray(cnt), cp.asarray(idx)
                    k = kernels[expr(dt, True, False, 0, bm, bn, st, bkk, ws)]
                    f = lambda A, B, C, k=k, bm=bm, bn=bn, st=st: launch(
                        k, bm, bn, st, A, B, C, None, M, N, K, K, N, N, 1.0, dc, di, nkb, rblk, 128,
                        None, 0, 64)
                    t = bench(f, sets)
                    rows.append((f"{S}^3 {dt}", f"sm90 {bm}x{bn}s{st}k{bkk}{'ws' if ws else ''} dsd50%", t,
                                 flops * 0.5 / t / 1e12, ref_t / t))
            del sets
            cp.get_default_memory_pool().free_all_blocks()
    return rows


def profile():
    """Two launches each of dense and 50%-dsd 4096^3 fp16 (for ncu)."""
    M = N = K = 4096
    cfgs = [(128, 256, 4, 64), (128, 256, 8, 32)]
    kernels = get_kernels([expr("float16", True, False, 0, *c) for c in cfgs])
    A = to_bits(cp.random.standard_normal((M, K), dtype=cp.float32), "float16")
    B = to_bits(cp.random.standard_normal((K, N), dtype=cp.float32), "float16")
    C = cp.empty((M, N), cp.uint16)
    rng = np.random.default_rng(0)
    nkb = K // 128
    idx = np.zeros((M // 128, nkb), np.int32)
    for r in range(M // 128):
        idx[r, :nkb // 2] = np.sort(rng.permutation(nkb)[:nkb // 2])
    dc, di = cp.asarray(np.full(M // 128, nkb // 2, np.int32)), cp.asarray(idx)
    for c in cfgs:
        k = kernels[expr("float16", True, False, 0, *c)]
        for _ in range(2):
            launch(k, c[0], c[1], c[2], A, B, C, None, M, N, K, K, N, N, 1.0, None, None, 0, 128, 128,
                   None, 0, 64)
        for _ in range(2):
            launch(k, c[0], c[1], c[2], A, B, C, None, M, N, K, K, N, N, 1.0, dc, di, nkb, 128, 128,
                   None, 0, 64)
    cp.cuda.Device().synchronize()


def main():
    if "--profile" in sys.argv:
        profile()
        return
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    print(f"device: {props['name'].decode()} cc={dev.compute_capability}", flush=True)
    res = correctness()
    bad = [r for r in res if not r[1]]
    mn_bad = [r for r in bad if len(r) > 2 and (not r[2] or not r[3])]
    if mn_bad and not QUICK:
        print("MN-major failures: retrying with -DBSMM90_MN_SWAP=1", flush=True)
        res2 = correctness(("-DBSMM90_MN_SWAP=1",), only_mn=True)
        print(f"  with swap: {sum(r[1] for r in res2)}/{len(res2)} ok", flush=True)
    rows = [] if NO_TIME else timing()
    print(f"\ncorrectness: {len(res) - len(bad)}/{len(res)} ok", flush=True)
    for r in bad:
        print(f"  FAILED: {r[0]}")
    if rows:
        print(f"\n{'shape':18s} {'impl':28s} {'time_us':>9s} {'TFLOP/s':>8s} {'x cuBLAS':>8s}")
        for s, impl, t, tf, ratio in rows:
            print(f"{s:18s} {impl:28s} {t * 1e6:9.1f} {tf:8.1f} {ratio:8.3f}")


if __name__ == "__main__":
    main()
