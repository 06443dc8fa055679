"""Kernel choice and launch for the block-sparse GEMMs (``bsmm.py``'s CuPy path).

Four kernels share one contract (``raw_kernels/bsmm.cuh``): ``simple`` (every dtype, any
shape, exact float32), ``mma`` (fp16/bf16 tensor cores, sm_80+; float32 on TF32 when
``CUPY_TF32=1``, CuPy's switch for the same trade), and on Hopper (fp16/bf16) ``tma`` (wgmma fed
by TMA from a producer warp walking the kept-block list; needs kept blocks of multiples of 64
along K) and ``sm90`` (wgmma fed by cp.async, any block of multiples of 8). The
fastest kernel whose preconditions hold runs; ``kernel=`` (or ``CUDROP_BSMM_KERNEL``) forces one,
which tests use to check each against float64 math. Tiles come from :func:`pick_tile`: the
mask's block and the GEMM's tile are independent (block splitting), except that a tile's rows
must lie in one row block of the mask.
"""
from __future__ import annotations

import os

import numpy as np

from .. import backend, raw_kernels
from . import tma as tma_mod

KERNELS = ("simple", "mma", "sm90", "tma")
_HALF = {"float16": "cd_f16", "bfloat16": "cd_bf16"}
# float32 on TF32: one tile, BK = 16 floats (the 64-byte rows of the 16-bit tiles)
TF32_TILES = ((64, 128, 16, 2, 2, 4),)
# (BM, BN, BK, warps along M, warps along N, stages) of bsmm_mma.cu's instances, in order of
# preference: measured on an H200 (scripts/probe_bsmm.py tiles, fp16 4096³ / 8192³) 64x128 ran
# 229 / 237 TFLOP/s, 128x128x64 203 / 223, 128x128x32 195 / 213.
MMA_TILES = ((64, 128, 32, 2, 2, 4), (128, 128, 64, 2, 4, 3), (128, 128, 32, 2, 4, 4))
# (BM, BN, stages, BK) of bsmm_sm90.cu, in order of preference
SM90_TILES = ((128, 256, 4, 64), (128, 128, 6, 64))
# (BM, BN, stages) of bsmm_tma.cu (BK = 64)
TMA_TILES = ((128, 256, 4), (128, 128, 6))
_NULL = np.uintp(0)


def _major(x, kdim):
    """``(k_major, ld)`` of a 2-D view whose reduction axis is ``kdim``, or None when neither
    axis is contiguous."""
    it = x.itemsize
    s = x.strides
    if min(s) < 0:
        return None
    other = 1 - kdim
    if x.shape[kdim] <= 1 or s[kdim] == it:
        if s[other] % it == 0:
            return True, max(s[other] // it, x.shape[kdim], 1)
    if x.shape[other] <= 1 or s[other] == it:
        if s[kdim] % it == 0:
            return False, max(s[kdim] // it, x.shape[other], 1)
    return None


def _operand(x, kdim):
    lay = _major(x, kdim)
    if lay is None:  # neither axis contiguous: one copy, then K-major
        x = backend.cupy.ascontiguousarray(x if kdim == 1 else x.T)
        x = x if kdim == 1 else x.T
        lay = _major(x, kdim)
    return x, lay


def pick_tile(m, n, rblk, masked, sms, tiles=MMA_TILES):
    """The first tile of ``tiles`` (in order of preference) that still gives every SM work,
    among those whose rows fit the mask's row blocks; the last fitting one on small problems."""
    ok = [t for t in tiles if not masked or rblk % t[0] == 0]
    for t in ok:
        if -(-m // t[0]) * -(-n // t[1]) >= sms:
            return t
    return ok[-1] if ok else None


def tf32_enabled():
    """float32 products may use TF32 tensor cores (``CUPY_TF32=1``, read at each call)."""
    return os.environ.get("CUPY_TF32") == "1"


def _mma_ok(a, b, a_lay, b_lay, m, n, k, kblk, lists):
    """The tensor-core kernels' preconditions: every 16-byte chunk of E elements along an
    operand's contiguous axis is wholly in range or out, so it is one cp.async."""
    if not (a.dtype.name in _HALF or (a.dtype.name == "float32" and tf32_enabled())):
        return False
    if not a_lay[0] and b_lay[0]:  # M-major A with K-major B: no instance
        return False
    e = 16 // a.itemsize
    if (a.data.ptr | b.data.ptr) % 16 or a_lay[1] % e or b_lay[1] % e:
        return False
    if (a_lay[0] or b_lay[0]) and k % e:
        return False
    if (not a_lay[0] and m % e) or (not b_lay[0] and n % e):
        return False
    return lists is None or kblk % e == 0


_DEVICE: dict = {}


def _device():
    """(device id, SM count, is sm_90) of the current device, queried once: the attribute
    query costs more host time than a small GEMM."""
    dev = backend.cupy.cuda.runtime.getDevice()
    info = _DEVICE.get(dev)
    if info is None:
        d = backend.cupy.cuda.Device(dev)
        info = _DEVICE[dev] = (dev, d.attributes["MultiProcessorCount"],
                               d.compute_capability == "90")
    return info


def launch(a, b, out, lists, bits, rblk, kblk, cblk, scale, bias, act, kernel=None, tile=None):
    """``out = act(scale · a @ b + bias)`` with the reduction pruned by ``lists`` (count, index)
    and the output by ``bits``; a (M, K) and b (K, N) may be transposed views. ``tile`` (one
    of ``MMA_TILES``) overrides the mma kernel's tile choice, for tuning."""
    tile_override = tile
    cp = backend.cupy
    m, k = a.shape
    n = b.shape[1]
    if out.size == 0:
        return out
    a, a_lay = _operand(a, 1)
    b, b_lay = _operand(b, 0)
    if bias is not None:
        bias = cp.ascontiguousarray(bias)
    it = out.itemsize
    ldcm, ldcn = out.strides[0] // it, out.strides[1] // it
    count, index = lists if lists is not None else (None, None)
    masked = lists is not None or bits is not None
    choice = kernel or "auto"
    if choice not in KERNELS + ("auto",):
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
    tc_ok = _mma_ok(a, b, a_lay, b_lay, m, n, k, kblk, lists)
    dev, sms, is_sm90 = _device()
    hopper = tc_ok and ldcn == 1 and is_sm90 and a.dtype.name in _HALF
    tma = sm90 = None
    if choice in ("auto", "tma") and hopper and tma_mod.available() and (
            lists is None or kblk % tma_mod.BK == 0):
        tma = pick_tile(m, n, rblk, masked, sms, TMA_TILES)
    if choice == "tma" and tma is None:
        raise ValueError("the tma kernel does not take these operands (device, dtype, "
                         "alignment, kept blocks not multiples of 64 along K, or a non-row-major "
                         "output)")
    if tma is None and choice in ("auto", "sm90") and hopper:
        sm90 = pick_tile(m, n, rblk, masked, sms, SM90_TILES)
    if choice == "sm90" and sm90 is None:
        raise ValueError("the sm90 kernel does not take these operands (device, dtype, "
                         "alignment, block size or a non-row-major output)")
    tile = None
    if tma is None and sm90 is None and choice in ("auto", "mma") and tc_ok:
        tiles = MMA_TILES if a.dtype.name in _HALF else TF32_TILES
        tile = tile_override or pick_tile(m, n, rblk, masked, sms, tiles)
    if choice == "mma" and tile is None:
        raise ValueError("the mma kernel does not take these operands (dtype (float32 only "
                         "with CUPY_TF32=1), alignment or block size)")
    args = (a, b, out, _ptr(bias), np.int32(m), np.int32(n), np.int32(k),
            np.int64(a_lay[1]), np.int64(b_lay[1]), np.int64(ldcm), np.int64(ldcn),
            np.float64(scale), np.int32(act), _ptr(count), _ptr(index),
            np.int32(index.shape[1] if index is not None else 0), np.int32(rblk),
            np.int32(kblk), _ptr(bits), np.int32(bits.shape[1] if bits is not None else 0),
            np.int32(cblk))
    if tma is not None:
        bm, bn, stages = tma
        name = (f"bsmm_tma<{_HALF[a.dtype.name]}, {_b(a_lay[0])}, {_b(b_lay[0])}, {act}, "
                f"{bm}, {bn}, {stages}>")
        smem = stages * (bm + bn) * tma_mod.BK * 2 + 2048
        f = _function("bsmm_tma.cu", name, smem, dev)
        maps = tma_mod.operand_maps(a, b, m, n, k, a_lay, b_lay, bm, bn)
        args90 = args[:9] + (np.int64(ldcm), np.float32(scale)) + args[13:] + maps
        tiles = (-(-n // bn)) * (-(-m // bm))
        # dense: a persistent grid (one CTA per SM walks the tiles, the producer prefetching the
        # next tile under the epilogue); pruned: one CTA per tile, as their work differs
        grid = (min(sms, tiles),) if not masked else (-(-n // bn), -(-m // bm))
        f(grid, ((bm // 64 + 1) * 128,), args90, shared_mem=smem)
    elif sm90 is not None:
        bm, bn, stages, bk = sm90
        name = (f"bsmm_sm90<{_HALF[a.dtype.name]}, {_b(a_lay[0])}, {_b(b_lay[0])}, {act}, "
                f"{bm}, {bn}, {stages}, {bk}>")
        smem = stages * (bm + bn) * bk * 2 + 1024
        f = _function("bsmm_sm90.cu", name, smem, dev)
        args90 = args[:9] + (np.int64(ldcm), np.float32(scale)) + args[13:]
        f((-(-n // bn), -(-m // bm)), (bm // 64 * 128,), args90, shared_mem=smem)
    elif tile is not None:
        bm, bn, bk, wm, wn, stages = tile
        name = (f"bsmm_mma<{raw_kernels.cuda_type(a.dtype)}, {_b(a_lay[0])}, {_b(b_lay[0])}, "
                f"{bm}, {bn}, {bk}, {wm}, {wn}, {stages}>")
        smem = stages * (bm + bn) * bk * a.itemsize
        f = _function("bsmm_mma.cu", name, smem, dev)
        grid = (-(-m // bm)) * (-(-n // bn))
        f((grid,), (wm * wn * 32,), args, shared_mem=smem)
    else:
        name = (f"bsmm_simple<{raw_kernels.cuda_type(a.dtype)}, {_b(a_lay[0])}, "
                f"{_b(b_lay[0])}>")
        f = _function("bsmm_simple.cu", name, 0, dev)
        f((-(-n // 16), -(-m // 16)), (16, 16), args)
    return out


def _b(flag):
    return "true" if flag else "false"


def _ptr(x):
    return _NULL if x is None else x


_FUNCS: dict = {}


def _function(source, name, smem, dev):
    """The compiled kernel ``name`` (one NVRTC module per instance, memoised by the loader),
    with its dynamic shared-memory limit raised once where it needs more than 48 KB."""
    key = (source, name, dev)
    f = _FUNCS.get(key)
    if f is None:
        f = raw_kernels.kernel(source, name)
        if smem > 48 * 1024:
            f.max_dynamic_shared_size_bytes = smem
        _FUNCS[key] = f
    return f
