"""Kernel choice and launch for the block-sparse GEMMs (``bsmm.py``'s CuPy path).

Five kernels share one contract (``raw_kernels/bsmm.cuh``): ``simple`` (every dtype, any
shape; the float64 path and the fallback), ``ffma`` (exact float32 on the FP32 pipes,
register-tiled; needs the mask's row blocks in multiples of 64 rows), ``mma`` (fp16/bf16 tensor
cores, sm_80+; float32 on TF32 when ``CUPY_TF32=1``, CuPy's switch for the same trade), and on
Hopper (fp16/bf16) ``tma`` (wgmma fed by TMA from a producer warp walking the kept-block list;
needs kept blocks of multiples of 64 along K) and ``sm90`` (wgmma fed by cp.async, any block of
multiples of 8). The fastest kernel whose preconditions hold runs; ``kernel=`` (or
``cudrop.bsmm.use_kernel``) forces one, which tests use to check each against float64 math.
Unforced, a pruned reduction that only ``simple`` would take, or in 16 bits with kept blocks
narrower than the Hopper kernels' 64-wide k-step, runs ``dense``: cuBLASLt on a masked copy of
the pruned operand; so does a 16-bit pruned output without epilogue whose blocks are narrower
than every Hopper tile, then masked (``bsmm._dense``; measured reasons at ``_choose``).
Tiles come from :func:`pick_tile`: the mask's block and the GEMM's tile are independent (block
splitting), except that a tile's rows must lie in one row block of the mask.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend, raw_kernels
from .._memo import Memo
from ..functional import _gemm
from . import tma as tma_mod

#: The CuPy kernel names ``use_kernel`` accepts: 'simple' (any dtype and shape), 'ffma' (exact
#: float32, register-tiled FFMA), 'mma' (fp16/bf16 tensor cores, sm_80+; float32 with
#: ``CUPY_TF32=1``), 'sm90' and 'tma' (Hopper, fp16/bf16). Unforced, the first of tma, sm90, mma,
#: ffma whose preconditions hold runs, else simple; or the dense fallback (see ``_choose``).
KERNELS = ("simple", "ffma", "mma", "sm90", "tma")
_HALF = {"float16": "cd_f16", "bfloat16": "cd_bf16"}
# float32 on TF32: one tile, BK = 16 floats (the 64-byte rows of the 16-bit tiles)
TF32_TILES = ((64, 128, 16, 2, 2, 4),)
# (BM, BN, BK, warps along M, warps along N, stages) of bsmm_mma.cu's instances, in order of
# preference: measured on an H200 (scripts/probe_bsmm.py tiles, fp16 4096³ / 8192³) 64x128 ran
# 229 / 237 TFLOP/s, 128x128x64 203 / 223, 128x128x32 195 / 213.
MMA_TILES = ((64, 128, 32, 2, 2, 4), (128, 128, 64, 2, 4, 3), (128, 128, 32, 2, 4, 4))
# (BM, BN, stages, BK) of bsmm_sm90.cu, in order of preference
SM90_TILES = ((128, 256, 4, 64), (128, 128, 6, 64))
# (BM, BN, stages) of bsmm_tma.cu (BK = 64); 64-row tiles fill the SMs on small problems
TMA_TILES = ((128, 256, 4), (128, 128, 6), (64, 128, 6))
# (BM, BN) of bsmm_ffma.cu (BK = 8, BM * BN / 64 threads, each an 8 x 8 block of the tile), in
# order of preference: 128 x 128 (256 threads, two CTAs per SM at 128 registers) where it gives
# every SM a tile; on small problems (M or N <= 1024) the 64-row tiles give 2x or 4x the CTAs.
# Not yet tuned on a GPU.
FFMA_TILES = ((128, 128), (64, 128), (64, 64))
_NULL = np.uintp(0)


class Pruning(NamedTuple):
    """What a mask prunes of a product as the kernels compute it (``bsmm._pruning`` builds one
    per form): ``lists``, the (count, index) of the kept K-blocks per row block of A, or None;
    ``bits``, the keep bits of the output's blocks, or None; the row block of A and C
    (``rblk``), the K-block (``kblk``) and the output's column block (``cblk``)."""
    lists: tuple | None
    bits: object
    rblk: int
    kblk: int
    cblk: int

    @property
    def masked(self):
        return self.lists is not None or self.bits is not None


#: no pruning: the dense product
DENSE = Pruning(None, None, 1, 1, 1)


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


def _contiguous(x, kdim, k_major):
    """A contiguous copy of the 2-D view ``x`` whose innermost axis is the reduction axis
    ``kdim`` (``k_major``) or the other one."""
    cp = backend.cupy
    return cp.ascontiguousarray(x) if (kdim == 1) == k_major else cp.ascontiguousarray(x.T).T


def _operand(x, kdim, copy=None):
    """``(x, layout)``, ``x`` copied first when ``copy`` says so (True: K-major, False: the
    other axis innermost) or when neither axis is contiguous (then K-major)."""
    if copy is None and _major(x, kdim) is None:
        copy = True
    if copy is not None:
        x = _contiguous(x, kdim, copy)
    return x, _major(x, kdim)


def _relayout(a, b, a_lay, b_lay, m, n, k, kblk, lists):
    """``(copy_a, copy_b)`` (None: as it is; True / False: K-major / other-major copy) that
    lets the tensor-core kernels take a 16-bit product whose layout they refuse (an extent not a
    multiple of 8 along a contiguous axis: a 10-class head's N = 10), copying the fewest
    elements; None when no copy helps. A transposing copy reads and writes the operand once,
    against the 16x16 simple kernel at several times the tensor cores' time."""
    options = []
    for ca in (None, True, False):  # a same-major copy still fixes an unaligned view
        for cb in (None, True, False):
            if ca is None and cb is None:
                continue
            # a fresh copy is 256-byte aligned and contiguous: its ld is the inner extent
            la = a_lay if ca is None else (ca, k if ca else m)
            lb = b_lay if cb is None else (cb, k if cb else n)
            fa = a if ca is None else _Aligned(a.dtype)
            fb = b if cb is None else _Aligned(b.dtype)
            if _mma_ok(fa, fb, la, lb, m, n, k, kblk, lists):
                options.append(((ca is not None) * a.size + (cb is not None) * b.size, ca, cb))
    return min(options, key=lambda o: o[0])[1:] if options else None


class _Aligned:
    """What ``_mma_ok`` reads of an operand's fresh copy: its dtype and a 256-byte aligned
    pointer."""

    class _Data:
        ptr = 0

    data = _Data()

    def __init__(self, dtype):
        self.dtype, self.itemsize = dtype, dtype.itemsize


def pick_tile(m, n, rblk, masked, sms, tiles=MMA_TILES, cblk=None):
    """The first tile of ``tiles`` (in order of preference) that gives every SM work, among
    those whose rows fit the mask's row blocks; on small problems the one with the most CTAs.
    Under an output mask (``cblk``) only tiles whose columns fit its column blocks are
    considered when there are any, so that a dropped block is a skipped tile."""
    ok = [t for t in tiles if not masked or rblk % t[0] == 0]
    if cblk is not None:
        ok = [t for t in ok if cblk % t[1] == 0] or ok
    ctas = lambda t: -(-m // t[0]) * -(-n // t[1])  # noqa: E731
    for t in ok:
        if ctas(t) >= sms:
            return t
    return max(ok, key=ctas) if ok else None


def _mma_ok(a, b, a_lay, b_lay, m, n, k, kblk, lists):
    """The tensor-core kernels' preconditions: every 16-byte chunk of E elements along an
    operand's contiguous axis is wholly in range or out, so it is one cp.async."""
    if not (a.dtype.name in _HALF or (a.dtype.name == "float32" and backend.tf32_enabled())):
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


def _ffma_vec(a_ptr, b_ptr, a_lay, b_lay, m, n, k, kblk, lists):
    """The ffma kernel's float4 loads are safe: every 4-float chunk along an operand's contiguous
    axis is 16-byte aligned and wholly inside or outside the matrix and each k-step (else it
    loads one float at a time)."""
    if (a_ptr | b_ptr) % 16 or a_lay[1] % 4 or b_lay[1] % 4:
        return False
    if (a_lay[0] or b_lay[0]) and (k % 4 or (lists is not None and kblk % 4)):
        return False
    return not ((not a_lay[0] and m % 4) or (not b_lay[0] and n % 4))


class _Plan:
    """Everything about a launch that follows from the call's signature (shapes, strides,
    dtype, alignment, mask geometry, epilogue): the kernel, its grid and the scalar arguments.
    Memoised, so a repeated call (every training step) costs a dict lookup and the launch."""

    __slots__ = ("kind", "f", "grid", "block", "smem", "copy_a", "copy_b", "mid", "mid2",
                 "tail", "tma")


# shapes that keep changing: start over at 4096 plans rather than grow
_PLAN_MEMO = Memo(maxsize=4096)
_PLANS = _PLAN_MEMO.data  # the plain dict, probed per launch


_NEEDS = {
    "tma": "an sm_90 GPU, float16/bfloat16, 16-byte aligned operands, kept blocks of multiples "
           "of 64 along K, rows of the tile inside one row block, a row-major 4-byte aligned "
           "output",
    "sm90": "an sm_90 GPU, float16/bfloat16, 16-byte aligned operands, rows of the tile inside "
            "one row block, a row-major 4-byte aligned output",
    "mma": "float16/bfloat16 (float32 with CUPY_TF32=1), 16-byte aligned operands, rows of the "
           "tile inside one row block",
    "ffma": "float32, rows of the tile inside one row block (the mask's row blocks in multiples "
            "of 64 rows)",
}


def _choose(choice, a, b, a_lay, b_lay, pr, *, c_row_major, act, has_bias=False,
            tile_override=None):
    """(kind, tile): the fastest kernel whose preconditions hold for a (M, K) @ b (K, N) under
    the pruning ``pr``, or the forced one; 'dense' (tile None) for the dense fallback
    (``launch``). ``c_row_major``: the output is row-major and 4-byte aligned."""
    if choice not in KERNELS + ("auto",):
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {choice!r}")
    (m, k), n = a.shape, b.shape[1]
    lists, bits, rblk, kblk, cblk = pr
    tc_ok = _mma_ok(a, b, a_lay, b_lay, m, n, k, kblk, lists)
    sms, is_sm90 = raw_kernels.device_facts()
    half = a.dtype.name in _HALF
    # the Hopper kernels store rows of C in 4-byte pairs: row-major, 4-byte aligned C
    hopper = tc_ok and half and is_sm90 and c_row_major
    # A pruned reduction (dsd, dsd_t) in float16/bfloat16/float32 can always run as cuBLASLt on
    # a masked copy of the pruned operand; its epilogues are bias and ReLU (its GELU is the tanh
    # form, bsmm's the erf form). A pruned output (sdd) without an epilogue can run as cuBLASLt,
    # then the mask applied to the result.
    fallback = choice == "auto" and a.dtype.name != "float64" and _gemm.available()
    dense = fallback and lists is not None and bits is None and act in (0, 1)
    dense_sdd = fallback and lists is None and bits is not None and act == 0 and not has_bias
    candidates = (
        # Output blocks narrower than every Hopper tile's columns (128 or 256) skip no tile: the
        # kernels compute the whole product, and cuBLAS does that faster (H200, block-wise
        # gyro's 32-unit blocks, bf16 1024 x 4096 x 4096: tma 57 µs, cuBLAS ~33 + the mask
        # pass)
        ("dense", None, dense_sdd and hopper and cblk % 128 != 0),
        ("tma", TMA_TILES, hopper and tma_mod.available()
         and (lists is None or kblk % tma_mod.BK == 0)),
        # Kept blocks narrower than the Hopper kernels' 64-wide k-step leave it part empty:
        # measured on the H200 (block-wise gyro's 128 x 32 blocks, bf16 1024 x 4096 x 4096 at
        # half the blocks kept), sm90 took 114 µs a product where cuBLAS takes ~42 µs dense.
        ("dense", None, dense and hopper and kblk % tma_mod.BK != 0),
        ("sm90", SM90_TILES, hopper),
        ("mma", MMA_TILES if half else TF32_TILES, tc_ok),
        # exact float32; also where TF32 is allowed but the mma kernel cannot take the operands
        ("ffma", FFMA_TILES, a.dtype.name == "float32"),
        # where only the 16x16 simple kernel would take the operands (a pruned output-row block
        # narrower than every tile: dsd_t under 32-unit blocks)
        ("dense", None, dense or dense_sdd),
    )
    for kind, tiles, ok in candidates:
        if kind == "dense":
            if ok:
                return kind, None
            continue
        if choice not in ("auto", kind):
            continue
        tile = None
        if ok:
            tile = (tile_override if kind in ("mma", "ffma") and tile_override else
                    pick_tile(m, n, rblk, pr.masked, sms, tiles,
                              cblk if bits is not None else None))
        if tile:
            return kind, tile
        if choice == kind:
            raise ValueError(f"the {kind} kernel does not take these operands; it needs "
                             f"{_NEEDS[kind]}")
    return "simple", None


def _plan(a, b, c_layout, pr, epi, choice, tile_override):
    m, k = a.shape
    n = b.shape[1]
    lists, bits, rblk, kblk, cblk = pr
    pl = _Plan()
    pl.copy_a = True if _major(a, 1) is None else None
    pl.copy_b = True if _major(b, 0) is None else None
    a, a_lay = _operand(a, 1, pl.copy_a)
    b, b_lay = _operand(b, 0, pl.copy_b)
    if (choice == "auto" and a.dtype.name in _HALF
            and not _mma_ok(a, b, a_lay, b_lay, m, n, k, kblk, lists)):
        fix = _relayout(a, b, a_lay, b_lay, m, n, k, kblk, lists)
        if fix is not None:
            if fix[0] is not None:
                pl.copy_a = fix[0]
                a, a_lay = _operand(a, 1, fix[0])
            if fix[1] is not None:
                pl.copy_b = fix[1]
                b, b_lay = _operand(b, 0, fix[1])
    (c_strides, c_align), it = c_layout, a.itemsize
    ldcm, ldcn = c_strides[0] // it, c_strides[1] // it
    scale, act = epi.scale, epi.act
    pl.kind, tile = _choose(choice, a, b, a_lay, b_lay, pr,
                            c_row_major=ldcn == 1 and c_align % 4 == 0, act=act,
                            has_bias=epi.has_bias, tile_override=tile_override)
    if pl.kind == "dense":
        return pl
    dims = (np.int32(m), np.int32(n), np.int32(k), np.int64(a_lay[1]), np.int64(b_lay[1]))
    pl.mid2 = (np.int32(lists[1].shape[1] if lists is not None else 0), np.int32(rblk),
               np.int32(kblk))
    pl.tail = (np.int32(bits.shape[1] if bits is not None else 0), np.int32(cblk))
    pl.tma = None
    cdim = lambda bm, bn: (-(-n // bn), -(-m // bm))  # noqa: E731
    if pl.kind in ("tma", "sm90"):  # Hopper kernels: row-major C, float alpha, ACT a template
        pl.mid = dims + (np.int64(ldcm), np.float32(scale))
        half = _HALF[a.dtype.name]
        if pl.kind == "tma":
            bm, bn, stages = tile
            name = f"bsmm_tma<{half}, {_b(a_lay[0])}, {_b(b_lay[0])}, {act}, {bm}, {bn}, {stages}>"
            pl.smem = stages * (bm + bn) * tma_mod.BK * 2 + 2048
            pl.block = ((bm // 64 + 1) * 128,)
            # a persistent grid (one CTA per SM walks the tiles, the producer fetching the next
            # tile under the epilogue), pruned products too: on the H200 at 1024 x 4096 x 4096
            # bf16 under 128 x 128 blocks, half kept, dsd 39.6 -> 33.3 µs and dsd_t 61.2 -> 55.8
            # against one CTA a tile, whose uneven work the hardware would balance
            tiles = cdim(bm, bn)
            pl.grid = (min(raw_kernels.device_facts()[0], tiles[0] * tiles[1]),)
            pl.tma = (m, n, k, a_lay, b_lay, bm, bn)
            src = "bsmm_tma.cu"
        else:
            bm, bn, stages, bk = tile
            name = (f"bsmm_sm90<{half}, {_b(a_lay[0])}, {_b(b_lay[0])}, {act}, {bm}, {bn}, "
                    f"{stages}, {bk}>")
            pl.smem = stages * (bm + bn) * bk * 2 + 1024
            pl.block, pl.grid, src = (bm // 64 * 128,), cdim(bm, bn), "bsmm_sm90.cu"
    else:
        pl.mid = dims + (np.int64(ldcm), np.int64(ldcn), np.float64(scale), np.int32(act))
        t = raw_kernels.cuda_type(a.dtype)
        if pl.kind == "ffma":
            bm, bn = tile
            vec = _ffma_vec(a.data.ptr, b.data.ptr, a_lay, b_lay, m, n, k, kblk, lists)
            name = f"bsmm_ffma<{_b(a_lay[0])}, {_b(b_lay[0])}, {bm}, {bn}, {_b(vec)}>"
            tiles = cdim(bm, bn)
            pl.smem, pl.block, pl.grid = 0, (bm * bn // 64,), (tiles[0] * tiles[1],)
            src = "bsmm_ffma.cu"
        elif pl.kind == "mma":
            bm, bn, bk, wm, wn, stages = tile
            name = (f"bsmm_mma<{t}, {_b(a_lay[0])}, {_b(b_lay[0])}, {bm}, {bn}, {bk}, {wm}, "
                    f"{wn}, {stages}>")
            pl.smem = stages * (bm + bn) * bk * a.itemsize
            tiles = cdim(bm, bn)
            pl.block, pl.grid, src = (wm * wn * 32,), (tiles[0] * tiles[1],), "bsmm_mma.cu"
        else:
            name = f"bsmm_simple<{t}, {_b(a_lay[0])}, {_b(b_lay[0])}>"
            pl.smem, pl.block, pl.grid, src = 0, (16, 16), cdim(16, 16), "bsmm_simple.cu"
    pl.f = _function(src, name, pl.smem)
    return pl


class Epilogue(NamedTuple):
    """``act(scale · acc + bias)``: the scale, the activation's code (``bsmm.ACTIVATIONS``), and
    whether a bias is added."""
    scale: float
    act: int
    has_bias: bool


def launch(a, b, out, pruning=DENSE, *, scale=1.0, bias=None, act=0, kernel=None, tile=None):
    """``out = act(scale · a @ b + bias)`` with the reduction and the output pruned as
    ``pruning`` says (a :class:`Pruning`; ``DENSE``: none); a (M, K) and b (K, N) may be
    transposed views; ``act`` an activation code. ``kernel`` forces one of :data:`KERNELS`;
    ``tile`` (one of ``MMA_TILES`` or ``FFMA_TILES``) overrides the mma or ffma kernel's tile
    choice, for tuning and tests (unchecked: under a mask, the mask's row blocks must be
    multiples of its rows). Returns the kind that ran, or 'dense' without running anything where
    the choice is the dense fallback (see ``_choose``): the caller then computes the product
    densely (``bsmm._dense``)."""
    if out.size == 0:
        return None
    pl = _planned(a, b, (out.strides, out.data.ptr % 4), pruning,
                  Epilogue(scale, act, bias is not None), kernel or "auto", tile)
    if pl.kind == "dense":
        return "dense"
    if pl.copy_a is not None:
        a = _contiguous(a, 1, pl.copy_a)
    if pl.copy_b is not None:
        b = _contiguous(b, 0, pl.copy_b)
    if bias is not None and not bias.flags.c_contiguous:
        bias = backend.cupy.ascontiguousarray(bias)
    count, index = pruning.lists if pruning.lists is not None else (None, None)
    args = ((a, b, out, _ptr(bias)) + pl.mid + (_ptr(count), _ptr(index)) + pl.mid2
            + (_ptr(pruning.bits),) + pl.tail)
    if pl.tma is not None:
        args += tma_mod.operand_maps(a, b, *pl.tma)
    pl.f(pl.grid, pl.block, args, shared_mem=pl.smem)
    return pl.kind


def planned_kind(a, b, pruning, epilogue):
    """The kind :func:`launch` runs (unforced) for these operands into a fresh C-contiguous
    output, 'dense' for the dense fallback; the plan is memoised for that launch."""
    it = a.itemsize
    return _planned(a, b, ((b.shape[1] * it, it), 0), pruning, epilogue, "auto", None).kind


def _planned(a, b, c_layout, pr, epi, choice, tile):
    """The memoised plan; ``c_layout`` is the output's (strides, address mod 4)."""
    key = (a.shape, a.strides, b.shape, b.strides, c_layout, a.dtype, a.data.ptr % 16,
           b.data.ptr % 16, None if pr.lists is None else pr.lists[1].shape,
           None if pr.bits is None else pr.bits.shape, pr.rblk, pr.kblk, pr.cblk, epi, choice,
           tile, backend.cupy.cuda.runtime.getDevice(), backend.tf32_enabled())
    pl = _PLANS.get(key)
    if pl is None:
        pl = _PLAN_MEMO.put(key, _plan(a, b, c_layout, pr, epi, choice, tile))
    return pl


def _b(flag):
    return "true" if flag else "false"


def _ptr(x):
    return _NULL if x is None else x


def _function(source, name, smem):
    """The compiled kernel ``name`` (one NVRTC module per instance and device, memoised by the
    loader), its dynamic shared-memory limit raised where it needs more than 48 KB. Called once
    per plan."""
    f = raw_kernels.kernel(source, name)
    if smem > 48 * 1024:
        f.max_dynamic_shared_size_bytes = smem
    return f
