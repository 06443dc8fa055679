"""Matrix product on raw arrays. On CuPy it goes through cuBLASLt (``_gemm``: capturable in
CUDA graphs) when nvmath-python is installed; otherwise through CuPy, with a tensor-core batched
path for fp16/bf16.

CuPy 14 computes batched (>2-D) float16 matmul by casting to float32 and fails for bfloat16
(DESIGN.md §4); attention needs batched half-precision products, so batched fp16/bf16 goes
straight to cuBLAS ``gemmStridedBatchedEx`` with float32 accumulation.
"""
from __future__ import annotations

import numpy as np

from .. import backend, flops
from . import _gemm

_CUDA_R = {"float16": 2, "bfloat16": 14}  # cudaDataType_t
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_GEMM_DEFAULT = -1
_ONE = np.ones((), np.float32)
_ZERO = np.zeros((), np.float32)


def matmul(a, b):
    """``a @ b`` for arrays of ndim >= 2 with NumPy broadcasting of the leading dimensions."""
    xp = backend.get_array_module(a, b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul needs arrays of at least 2 dimensions, got shapes {a.shape} "
                         f"and {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul shapes {a.shape} and {b.shape} do not align: "
                         f"{a.shape[-1]} != {b.shape[-2]}")
    if a.dtype != b.dtype:
        raise TypeError(f"matmul dtypes differ: {a.dtype} and {b.dtype}")
    if xp is not np and _gemm.available():
        return _gemm.gemm(a, b)  # counts its FLOPs itself
    flops.add_product("matmul", a.shape, b.shape)
    if xp is np or (a.ndim == 2 and b.ndim == 2) or a.dtype.name not in _CUDA_R:
        return xp.matmul(a, b).astype(a.dtype, copy=False)  # NumPy's bfloat16 gives float32
    return _batched_half(xp, a, b)


def _batched_half(cp, a, b):
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = int(np.prod(lead, dtype=np.int64))
    out = cp.empty(lead + (m, n), a.dtype)
    if out.size == 0:
        return out
    if k == 0:
        out.fill(0)
        return out

    def operand(x, rows, cols):
        # A batch that is broadcast as a whole is read with stride 0; any other broadcast is
        # materialised (rare: attention masks and weights broadcast whole batches).
        if int(np.prod(x.shape[:-2], dtype=np.int64)) == 1:
            return cp.ascontiguousarray(x.reshape(rows, cols)), 0
        x = cp.ascontiguousarray(cp.broadcast_to(x, lead + (rows, cols)))
        return x, rows * cols

    a_, sa = operand(a, m, k)
    b_, sb = operand(b, k, n)
    handle = cp.cuda.device.get_cublas_handle()
    t = _CUDA_R[a.dtype.name]
    # Row-major C = A B is column-major Cᵀ = Bᵀ Aᵀ: pass B first, no transposes.
    cp.cuda.cublas.gemmStridedBatchedEx(
        handle, 0, 0, n, m, k,
        _ONE.ctypes.data, b_.data.ptr, t, n, sb,
        a_.data.ptr, t, k, sa,
        _ZERO.ctypes.data, out.data.ptr, t, n, m * n,
        batch, _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)
    return out
