"""Host side of the TMA block-sparse GEMM (``raw_kernels/bsmm_tma.cu``).

Builds CUDA tensor maps (``CUtensorMap``, 128 opaque bytes) with the driver's
``cuTensorMapEncodeTiled`` through ctypes -- a pure host call that never touches or synchronises
the device -- memoises them per (pointer, shape, stride, box, dtype), and launches ``bsmm_tma``
with the maps passed *by value* as ``const __grid_constant__`` kernel parameters (a NumPy
structured scalar of itemsize 128, which CuPy's RawKernel packs as a by-value struct).

``bsmm_tma_gmem`` (same kernel body, maps read from device global memory through a pointer) is
the fallback for a CuPy that cannot pass structs by value; uploading a map costs one small
host-to-device copy per new map (memoised too).

Enum values below are those of ``cuda.h`` (CUDA 12/13): CU_TENSOR_MAP_DATA_TYPE_FLOAT16 = 6,
BFLOAT16 = 9; INTERLEAVE_NONE = 0; SWIZZLE_128B = 3; L2_PROMOTION_L2_128B = 2, L2_256B = 3;
FLOAT_OOB_FILL_NONE = 0 (out-of-bounds elements read as zeros).
"""
from __future__ import annotations

import ctypes

import numpy as np

DATA_TYPE = {"float16": 6, "bfloat16": 9}
INTERLEAVE_NONE = 0
SWIZZLE_128B = 3
L2_PROMOTION_128B = 2
L2_PROMOTION_256B = 3
OOB_FILL_NONE = 0
BK = 64                        # K extent of one TMA box / pipeline step (128 bytes of 16-bit data)
_TMAP_PLAIN = np.dtype([("v", "<u8", (16,))])   # 128 bytes, passed by value to the kernel
_tmap_dtype = None
_HALF = {"float16": "cd_f16", "bfloat16": "cd_bf16"}
_MAX_MEMO = 512

_encode = None
_memo: dict = {}
_memo_dev: dict = {}


def tmap_dtype():
    """Structured dtype of a by-value CUtensorMap argument (64-byte CUDA alignment attached
    through ``cupy.make_aligned_dtype`` where available)."""
    global _tmap_dtype
    if _tmap_dtype is None:
        try:
            import cupy as cp
            _tmap_dtype = cp.make_aligned_dtype(_TMAP_PLAIN, alignment=64)
        except Exception:  # older CuPy: plain struct
            _tmap_dtype = _TMAP_PLAIN
    return _tmap_dtype


def _driver_encode():
    """``cuTensorMapEncodeTiled`` from ``libcuda.so.1`` with its ctypes signature."""
    global _encode
    if _encode is None:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuTensorMapEncodeTiled
        u64p = ctypes.POINTER(ctypes.c_uint64)
        u32p = ctypes.POINTER(ctypes.c_uint32)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p,
                       u32p, u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
        _encode = fn
    return _encode


def encode_tiled_2d(ptr: int, dtype: str, inner: int, outer: int, ld: int, box_inner: int,
                    box_outer: int, l2_promotion: int = L2_PROMOTION_256B) -> bytes:
    """The 128 bytes of a rank-2 tiled tensor map over the 16-bit matrix ``G[o*ld + i]``
    (``0 <= i < inner``, ``0 <= o < outer``), box ``box_inner x box_outer`` elements,
    128-byte swizzle, zero fill out of bounds. ``ld`` in elements."""
    if dtype not in DATA_TYPE:
        raise ValueError(f"tensor maps here are for float16/bfloat16, not {dtype}")
    if ptr % 16 or (ld * 2) % 16:
        raise ValueError("TMA needs a 16-byte aligned base and a leading dimension of 16 bytes")
    if box_inner * 2 > 128 or not (0 < box_outer <= 256) or ld < inner:
        raise ValueError("bad TMA box")
    buf = ctypes.create_string_buffer(128 + 64)
    base = ctypes.addressof(buf)
    aligned = (base + 63) & ~63                  # CUtensorMap is 64-byte aligned
    dims = (ctypes.c_uint64 * 2)(max(int(inner), 1), max(int(outer), 1))
    strides = (ctypes.c_uint64 * 1)(int(ld) * 2)
    box = (ctypes.c_uint32 * 2)(int(box_inner), int(box_outer))
    estr = (ctypes.c_uint32 * 2)(1, 1)
    rc = _driver_encode()(ctypes.c_void_p(aligned), DATA_TYPE[dtype], 2, ctypes.c_void_p(int(ptr)),
                          dims, strides, box, estr, INTERLEAVE_NONE, SWIZZLE_128B, l2_promotion,
                          OOB_FILL_NONE)
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {rc}) for ptr={ptr:#x} "
                           f"dims=({inner},{outer}) ld={ld} box=({box_inner},{box_outer})")
    return ctypes.string_at(aligned, 128)


def tensor_map_2d(ptr: int, dtype: str, inner: int, outer: int, ld: int, box_inner: int,
                  box_outer: int) -> np.void:
    """Memoised :func:`encode_tiled_2d` as a NumPy structured scalar (itemsize 128) to pass
    by value as a kernel argument."""
    key = (int(ptr), dtype, int(inner), int(outer), int(ld), int(box_inner), int(box_outer))
    m = _memo.get(key)
    if m is None:
        if len(_memo) >= _MAX_MEMO:
            _memo.clear()
        raw = encode_tiled_2d(*key)
        m = np.frombuffer(raw, dtype=tmap_dtype())[0]
        _memo[key] = m
    return m


def tensor_map_2d_device(ptr: int, dtype: str, inner: int, outer: int, ld: int, box_inner: int,
                         box_outer: int):
    """Fallback: the same map copied once into device memory (a CuPy uint8 array of 128 bytes,
    256-byte aligned by CuPy's allocator); pass its ``.data.ptr`` to ``bsmm_tma_gmem``."""
    import cupy as cp
    key = (int(ptr), dtype, int(inner), int(outer), int(ld), int(box_inner), int(box_outer))
    d = _memo_dev.get(key)
    if d is None:
        if len(_memo_dev) >= _MAX_MEMO:
            _memo_dev.clear()
        raw = encode_tiled_2d(*key)
        d = cp.asarray(np.frombuffer(raw, dtype=np.uint8))
        _memo_dev[key] = d
    return d


def operand_map_args(a_ptr, b_ptr, dtype, m, n, k, lda, ldb, a_kmaj, b_kmaj, bm, bn):
    """``(inner, outer, ld, box_inner, box_outer)`` for A and B as bsmm_tma expects them."""
    a = (k, m, lda, BK, bm) if a_kmaj else (m, k, lda, 64, BK)
    b = (k, n, ldb, BK, bn) if b_kmaj else (n, k, ldb, 64, BK)
    return (a_ptr, dtype) + a, (b_ptr, dtype) + b


def operand_maps(a_ptr, b_ptr, dtype, m, n, k, lda, ldb, a_kmaj, b_kmaj, bm, bn, device=False):
    """Tensor maps of A and B for ``bsmm_tma<.., BM=bm, BN=bn, ..>`` (by-value scalars, or
    device arrays when ``device``)."""
    fa, fb = operand_map_args(a_ptr, b_ptr, dtype, m, n, k, lda, ldb, a_kmaj, b_kmaj, bm, bn)
    f = tensor_map_2d_device if device else tensor_map_2d
    return f(*fa), f(*fb)


def tma_eligible(dtype, a_ptr, b_ptr, lda, ldb, bm, lists, bits, rblk, kblk) -> bool:
    """The extra preconditions of bsmm_tma over bsmm_sm90 (others must use bsmm_sm90)."""
    if dtype not in DATA_TYPE:
        return False
    if a_ptr % 16 or b_ptr % 16 or lda % 8 or ldb % 8:
        return False
    if lists and kblk % BK:
        return False
    if (lists or bits) and rblk % bm:
        return False
    return True


def smem_bytes(bm, bn, stages):
    return stages * (bm + bn) * BK * 2 + 2048


def kernel_name(dtype, a_kmaj, b_kmaj, act, bm, bn, stages, gmem=False):
    b = lambda x: "true" if x else "false"  # noqa: E731
    return (f"bsmm_tma{'_gmem' if gmem else ''}<{_HALF[dtype]}, {b(a_kmaj)}, {b(b_kmaj)}, {act}, "
            f"{bm}, {bn}, {stages}>")


_SMEM_SET = set()


def launch(kernel, dtype, a_kmaj, b_kmaj, bm, bn, stages, A, B, C, bias, M, N, K, lda, ldb, ldc,
           alpha, count, index, index_stride, rblk, kblk, bits, bits_stride, cblk, gmem=False):
    """Launch a compiled ``bsmm_tma`` (or ``bsmm_tma_gmem`` when ``gmem``) on CuPy arrays
    (``A``/``B``/``C`` 16-bit storage; ``bias``/``count``/``index``/``bits`` arrays or None)."""
    smem = smem_bytes(bm, bn, stages)
    if id(kernel) not in _SMEM_SET:
        kernel.max_dynamic_shared_size_bytes = smem
        _SMEM_SET.add(id(kernel))
    ta, tb = operand_maps(A.data.ptr, B.data.ptr, dtype, M, N, K, lda, ldb, a_kmaj, b_kmaj, bm, bn,
                          device=gmem)
    if gmem:
        ta, tb = ta.data.ptr, tb.data.ptr
        ta, tb = np.uintp(ta), np.uintp(tb)
    null = np.uintp(0)
    grid = ((N + bn - 1) // bn, (M + bm - 1) // bm, 1)
    block = ((bm // 64 + 1) * 128, 1, 1)
    kernel(grid, block, (A, B, C, bias if bias is not None else null,
                         np.int32(M), np.int32(N), np.int32(K), np.int64(lda), np.int64(ldb),
                         np.int64(ldc), np.float32(alpha),
                         count if count is not None else null, index if index is not None else null,
                         np.int32(index_stride), np.int32(rblk), np.int32(kblk),
                         bits if bits is not None else null, np.int32(bits_stride), np.int32(cblk),
                         ta, tb),
           shared_mem=smem)
