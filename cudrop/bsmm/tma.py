"""Tensor maps for the TMA block-sparse GEMM (``raw_kernels/bsmm_tma.cu``).

A ``CUtensorMap`` (128 opaque bytes) is built by the driver's ``cuTensorMapEncodeTiled``
through ctypes: a host-only call that neither touches nor synchronises the device. Maps are
memoised per (pointer, shape, stride, box, dtype) and passed to the kernel *by value* as
``const __grid_constant__`` parameters, as a NumPy structured scalar of 128 bytes with CUDA's
64-byte alignment (``cupy.make_aligned_dtype``), which CuPy's RawKernel packs as a struct.
A map keyed by a pointer that was freed and reused for an array of the same layout describes
that array exactly, so a memo hit is always right.

Enum values are those of CUDA 12/13 ``cuda.h``: CU_TENSOR_MAP_DATA_TYPE_FLOAT16 = 6,
BFLOAT16 = 9; INTERLEAVE_NONE = 0; SWIZZLE_128B = 3; L2_PROMOTION_L2_256B = 3;
FLOAT_OOB_FILL_NONE = 0 (out-of-bounds elements read as zeros: the M/N/K edges).
"""
from __future__ import annotations

import ctypes

import numpy as np

from .._memo import Memo, memoize

DATA_TYPE = {"float16": 6, "bfloat16": 9}
_INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_NONE = 0, 3, 3, 0
BK = 64  # the K extent of one box, one pipeline step (128 bytes of 16-bit data)

_MAPS = Memo(maxsize=512)
_maps = _MAPS.data  # the plain dict, probed twice per TMA launch


def available():
    """Whether this CuPy can pass a 64-byte aligned struct by value (``make_aligned_dtype``)."""
    from .. import backend
    return hasattr(backend.cupy, "make_aligned_dtype")


@memoize
def _driver_encode():
    fn = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
    u64p, u32p = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p,
                   u32p, u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@memoize
def _map_dtype():
    """The by-value parameter type: 128 bytes with CUDA's 64-byte alignment."""
    from .. import backend
    return backend.cupy.make_aligned_dtype([("v", "<u8", (16,))], alignment=64)


def encode_tiled_2d(ptr, dtype, inner, outer, ld, box_inner, box_outer) -> bytes:
    """The 128 bytes of a rank-2 tiled map over the 16-bit matrix ``G[o*ld + i]`` (``i < inner``,
    ``o < outer``), box ``box_inner x box_outer`` elements, 128-byte swizzle, zero fill."""
    buf = ctypes.create_string_buffer(128 + 64)
    aligned = (ctypes.addressof(buf) + 63) & ~63  # CUtensorMap is 64-byte aligned
    dims = (ctypes.c_uint64 * 2)(max(int(inner), 1), max(int(outer), 1))
    strides = (ctypes.c_uint64 * 1)(int(ld) * 2)
    box = (ctypes.c_uint32 * 2)(int(box_inner), int(box_outer))
    estr = (ctypes.c_uint32 * 2)(1, 1)
    rc = _driver_encode()(ctypes.c_void_p(aligned), DATA_TYPE[dtype], 2, ctypes.c_void_p(int(ptr)),
                          dims, strides, box, estr, _INTERLEAVE_NONE, _SWIZZLE_128B,
                          _L2_PROMOTION_256B, _OOB_FILL_NONE)
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {rc}) for ptr={ptr:#x} "
                           f"dims=({inner},{outer}) ld={ld} box=({box_inner},{box_outer})")
    return ctypes.string_at(aligned, 128)


def _map(*key):
    m = _maps.get(key)
    if m is None:
        m = _MAPS.put(key, np.frombuffer(encode_tiled_2d(*key), dtype=_map_dtype())[0])
    return m


def operand_maps(a, b, m, n, k, a_lay, b_lay, bm, bn):
    """By-value maps of A (M, K) and B (K, N) for ``bsmm_tma<.., BM=bm, BN=bn, ..>``:
    a K-major operand is one box of 64 k by BM (BN) rows; an M/N-major one, 64 x 64 boxes."""
    dt = a.dtype.name
    ka = (k, m, a_lay[1], BK, bm) if a_lay[0] else (m, k, a_lay[1], 64, BK)
    kb = (k, n, b_lay[1], BK, bn) if b_lay[0] else (n, k, b_lay[1], 64, BK)
    return _map(a.data.ptr, dt, *ka), _map(b.data.ptr, dt, *kb)
