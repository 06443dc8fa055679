"""Dense GEMMs on CuPy arrays through cuBLASLt, capturable in CUDA graphs.

CuPy refuses its own cuBLAS calls while a stream is being captured (its wrapper raises
NotImplementedError), so a training step that multiplies through ``cupy.matmul`` cannot be a
CUDA graph. This module calls cuBLASLt through nvmath-python's thin bindings
(``nvmath.bindings.cublasLt``: one C call per Python call, no planning objects): the algorithm is
chosen once per shape, dtype, transposes, epilogue and operand alignment (memoised plans, before
any capture, since capture replays the first call's choice), the workspace is one 32 MiB
buffer per device allocated on first use, and every call runs on CuPy's current stream, so the
same code runs eagerly and inside a capture.

Row-major C (M, N) = A (M, K) B (K, N) is computed as cuBLASLt's column-major
Cᵀ (N, M) = Bᵀ (N, K) Aᵀ (K, M): a C-contiguous operand is its transpose in column-major order
with no copy, and a transposed view (F-contiguous, e.g. ``w.T`` in backward) is passed with
cuBLASLt's transpose flag, also without a copy. Epilogues: ``bias`` (N,) added to every row
(cuBLASLt's BIAS, per row of Cᵀ) and optionally ReLU/GELU after it.

Precision: float32 is exact (CUBLAS_COMPUTE_32F) unless TF32 is asked for with CuPy's own
switch ``CUPY_TF32=1``; float16/bfloat16 accumulate in float32; float64 in float64.
Without nvmath-python (the ``cuda13`` / ``cuda12`` extras install it) :func:`available` is
False and ``functional.matmul`` keeps CuPy's cuBLAS path, which cannot be captured.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend, flops, raw_kernels
from .._memo import Memo, memoize
from ._reduce import sum_leading

try:
    from nvmath.bindings import cublasLt as _lt
except Exception:  # pragma: no cover - nvmath-python missing, or no CUDA libraries
    _lt = None

WORKSPACE_BYTES = 32 << 20  # NVIDIA's recommendation for Hopper
CANDIDATES = 8  # algorithms asked of cuBLASLt's heuristic per problem

# cudaDataType_t and cublasComputeType_t values (library_types.h, cublas_api.h).
_DATA_TYPE = {"float16": 2, "bfloat16": 14, "float32": 0, "float64": 1}
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70
_EPILOGUE = {None: "DEFAULT", "bias": "BIAS", "relu": "RELU", "gelu": "GELU",
             "bias_relu": "RELU_BIAS", "bias_gelu": "GELU_BIAS", "bias_grad": "BGRADA"}


def available() -> bool:
    """True when cuBLASLt can be called (nvmath-python importable with its CUDA libraries)."""
    return _lt is not None




@memoize
def _handle(device_id):
    return _lt.create()


@memoize
def _workspace(device_id):
    return backend.cupy.empty(WORKSPACE_BYTES, np.uint8)


def _set(setter, dtype_of, obj, attr, value):
    buf = np.array(value, dtype=dtype_of(attr))
    setter(obj, attr, buf.ctypes.data, buf.nbytes)


def _alignment(ptr) -> int:
    return min(256, ptr & -ptr) if ptr else 256


class _Plan:
    """cuBLASLt descriptors and the chosen algorithm for one problem; kept for the process
    (``cudrop.clear_caches`` drops them)."""

    def __init__(self, device_id, dtype, n, m, k, trans_a, trans_b, ld_a, ld_b, batch,
                 strides, epilogue, aligns, bias_dtype, tf32):
        lt = _lt
        t = _DATA_TYPE[dtype]
        if dtype == "float64":
            compute, scale = _COMPUTE_64F, _DATA_TYPE["float64"]
        else:
            compute = _COMPUTE_32F_FAST_TF32 if dtype == "float32" and tf32 else _COMPUTE_32F
            scale = _DATA_TYPE["float32"]
        self.scale_dtype = np.float64 if dtype == "float64" else np.float32
        self.alpha = np.ones((), self.scale_dtype)
        self.beta = np.zeros((), self.scale_dtype)
        desc_set = (lt.matmul_desc_set_attribute, lt.get_matmul_desc_attribute_dtype)
        self.desc = lt.matmul_desc_create(compute, scale)
        A = lt.MatmulDescAttribute
        _set(*desc_set, self.desc, A.TRANSA, 1 if trans_a else 0)
        _set(*desc_set, self.desc, A.TRANSB, 1 if trans_b else 0)
        _set(*desc_set, self.desc, A.EPILOGUE, int(getattr(lt.Epilogue, _EPILOGUE[epilogue])))
        if bias_dtype is not None:
            _set(*desc_set, self.desc, A.BIAS_DATA_TYPE, _DATA_TYPE[bias_dtype])
        # Column-major layouts: "A" is Bᵀ (N x K), "B" is Aᵀ (K x M), D is Cᵀ (N x M).
        rows_a, cols_a = (k, n) if trans_a else (n, k)
        rows_b, cols_b = (m, k) if trans_b else (k, m)
        self.layouts = [lt.matrix_layout_create(t, rows_a, cols_a, ld_a),
                        lt.matrix_layout_create(t, rows_b, cols_b, ld_b),
                        lt.matrix_layout_create(t, n, m, n)]
        L = lt.MatrixLayoutAttribute
        if batch > 1:
            for layout, stride in zip(self.layouts, strides):
                _set(lt.matrix_layout_set_attribute, lt.get_matrix_layout_attribute_dtype,
                     layout, L.BATCH_COUNT, batch)
                _set(lt.matrix_layout_set_attribute, lt.get_matrix_layout_attribute_dtype,
                     layout, L.STRIDED_BATCH_OFFSET, stride)
        pref = lt.matmul_preference_create()
        P = lt.MatmulPreferenceAttribute
        pref_set = (lt.matmul_preference_set_attribute, lt.get_matmul_preference_attribute_dtype)
        _set(*pref_set, pref, P.MAX_WORKSPACE_BYTES, WORKSPACE_BYTES - 16)
        for attr, align in zip((P.MIN_ALIGNMENT_A_BYTES, P.MIN_ALIGNMENT_B_BYTES,
                                P.MIN_ALIGNMENT_C_BYTES, P.MIN_ALIGNMENT_D_BYTES), aligns):
            _set(*pref_set, pref, attr, align)
        # cuBLASLt's first heuristic runs; the others are kept for benchmarks/gemm.py, which
        # times them (``choose``) to see what a measured choice would gain.
        self.heuristics = lt.MatmulHeuristicResult(CANDIDATES)
        count = np.zeros(1, np.int32)
        a_l, b_l, d_l = self.layouts
        lt.matmul_algo_get_heuristic(_handle(device_id), self.desc, a_l, b_l, d_l, d_l, pref,
                                     CANDIDATES, self.heuristics.ptr, count.ctypes.data)
        lt.matmul_preference_destroy(pref)
        self.count = int(count[0])
        if self.count == 0:
            raise RuntimeError(f"cuBLASLt found no algorithm for a {dtype} GEMM of "
                               f"(M, N, K) = ({m}, {n}, {k}), epilogue {epilogue}")
        self.choose(0)
        # Per-call arguments as plain ints, so a call does no attribute or ctypes work.
        self.alpha_ptr, self.beta_ptr = self.alpha.ctypes.data, self.beta.ctypes.data
        self.handle, self.ws = _handle(device_id), _workspace(device_id).data.ptr
        self.bias_ptr = np.zeros(1, np.uint64)  # BIAS_POINTER's value, set when it changes
        self.bias_ptr_at = self.bias_ptr.ctypes.data
        self.bias_last = None

    def choose(self, i):
        """Run the ``i``-th of the ``count`` algorithms cuBLASLt's heuristic proposed."""
        if not 0 <= i < self.count:
            raise IndexError(f"choose: i must be in [0, {self.count}), got {i}")
        # the algorithm is the first member of each heuristic result
        self.algo = self.heuristics.ptr + i * _lt.matmul_heuristic_result_dtype.itemsize

    def set_bias(self, ptr):
        if ptr != self.bias_last:
            self.bias_ptr[0] = ptr
            _lt.matmul_desc_set_attribute(self.desc, _lt.MatmulDescAttribute.BIAS_POINTER,
                                          self.bias_ptr_at, 8)
            self.bias_last = ptr

    def __del__(self):  # pragma: no cover - process teardown order is not guaranteed
        try:
            for layout in self.layouts:
                _lt.matrix_layout_destroy(layout)
            _lt.matmul_desc_destroy(self.desc)
        except Exception:
            pass


_plan = memoize(_Plan)


def _operand(x):
    """``(array, transposed, ld, batch stride)`` of a row-major (batch..., R, C) operand as
    cuBLASLt sees it, without a copy when it is C- or F-contiguous in its last two axes."""
    cp = backend.cupy
    r, c = x.shape[-2:]
    s_r, s_c = (s // x.itemsize for s in x.strides[-2:])
    batch_ok = x.ndim == 2 or all(s % x.itemsize == 0 for s in x.strides[:-2])
    if batch_ok and (s_c == 1 or c == 1) and s_r >= max(c, 1):
        return x, False, s_r
    if batch_ok and (s_r == 1 or r == 1) and s_c >= max(r, 1):
        return x, True, s_c
    x = cp.ascontiguousarray(x)
    return x, False, c


class _Call(NamedTuple):
    """What one call signature (shapes, strides, dtypes, alignments, epilogue) needs: the plan,
    the output's shape, and whether the operands go to cuBLASLt as they are."""
    plan: _Plan
    out_shape: tuple
    direct: bool  # no operand needs a copy, a reshape or a broadcast first
    split: int  # chunks of K (split_k), 1 for none


# Call signatures seen: one dict probe per call instead of the planning below (measured on the
# H200 before this path existed: ~35 µs of host time per 1024² cuBLASLt call, cupy.matmul ~19).
_CALL_MEMO = Memo(maxsize=4096)
_CALLS = _CALL_MEMO.data
# problems for which cuBLASLt proposed no bias-gradient (BGRADA) algorithm
_NO_BIAS_GRAD = Memo().data


def gemm(a, b, *, bias=None, act=None, out=None, bias_grad=None):
    """``act(a @ b + bias)`` on CuPy arrays through cuBLASLt: ``a`` (..., M, K), ``b`` (..., K, N)
    (leading axes broadcast; a broadcast operand is read with batch stride 0), ``bias`` (N,) or
    None, ``act`` None, 'relu' or 'gelu' (tanh form, cuBLASLt's). One dtype throughout.
    ``out``: a C-contiguous (..., M, N) array to write into. ``bias_grad``: a contiguous (N,)
    array that receives the column sums of a 2-D ``b`` in the same call (a Linear's bias
    gradient, with ``a = xᵀ`` and ``b`` the output gradient); not with ``bias`` or ``act``.
    Capturable in a CUDA graph once the same problem has run eagerly (its plan is then
    cached)."""
    if bias_grad is not None:
        if bias is not None or act is not None or b.ndim != 2 or a.ndim != 2:
            raise ValueError("gemm: bias_grad goes with 2-D a and b and without bias or act")
        if bias_grad.shape != (b.shape[1],) or not bias_grad.flags.c_contiguous:
            raise ValueError(f"gemm: bias_grad must be a contiguous ({b.shape[1]},) array, got "
                             f"shape {bias_grad.shape}")
        bias, act = bias_grad, "grad"
    flops.add_product("gemm", a.shape, b.shape)
    key = (a.shape, a.strides, a.data.ptr & 255, b.shape, b.strides, b.data.ptr & 255, a.dtype,
           None if bias is None else (bias.dtype, bias.strides), act,
           None if out is None else (out.shape, out.strides, out.data.ptr & 255),
           backend.cupy.cuda.runtime.getDevice(), backend.tf32_enabled())
    call = _CALLS.get(key)
    if call is None or not call.direct:
        return _gemm_planned(a, b, bias, act, out, key)
    if out is None:
        out = backend.cupy.empty(call.out_shape, a.dtype)
        if out.data.ptr & 255:  # not the pools' 256-byte alignment the plan assumed
            return _gemm_planned(a, b, bias, act, out, None)
    plan = call.plan
    if bias is not None:
        plan.set_bias(bias.data.ptr)
    _run(plan, a, b, out, call.split)
    return out


def _gemm_planned(a, b, bias, act, out, key):
    """The full path: operands prepared (copies where no stride works), the plan found or made,
    and the call signature remembered under ``key`` for :func:`gemm`'s direct path."""
    cp = backend.cupy
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = int(np.prod(lead, dtype=np.int64))
    if out is None:
        out = cp.empty(lead + (m, n), a.dtype)
    if act == "grad" and (out.size == 0 or k == 0):
        sum_leading(b, out=bias)
        out.fill(0)
        return out
    if out.size == 0:
        return out
    if k == 0:
        out.fill(0)
        if bias is not None:
            out += bias
        return cp.maximum(out, 0, out=out) if act == "relu" else out

    def batched(x, rows, cols):
        # One leading batch, or one shared matrix (stride 0); other broadcasts materialise.
        if x.ndim > 2 and int(np.prod(x.shape[:-2], dtype=np.int64)) == 1:
            x = x.reshape(rows, cols)
        if x.ndim == 2:
            arr, tr, ld = _operand(x)
            return arr, tr, ld, 0
        x = cp.broadcast_to(x, lead + (rows, cols)).reshape(batch, rows, cols)
        arr, tr, ld = _operand(x)
        if arr.strides[0] < rows * cols * arr.itemsize:  # overlapping batches: materialise
            arr, tr, ld = cp.ascontiguousarray(arr), False, cols
        return arr, tr, ld, arr.strides[0] // arr.itemsize

    # cuBLASLt's "A" is b (as Bᵀ), its "B" is a (as Aᵀ).
    b_, tr_b, ld_b, sb = batched(b, k, n)
    a_, tr_a, ld_a, sa = batched(a, m, k)
    epilogue = ("bias_" + act if act else "bias") if bias is not None else act
    dev = out.device.id
    aligns = tuple(_alignment(x.data.ptr) for x in (b_, a_, out, out))
    split = split_k(m, n, k, a.dtype) if batch == 1 and epilogue is None else 1
    if split > 1:  # chunks of K as a strided batch (K offsets in each operand's layout)
        kc = k // split
        sb, sa = kc * (1 if tr_b else ld_b), kc * (ld_a if tr_a else 1)
        args = (dev, a.dtype.name, n, m, kc, tr_b, tr_a, ld_b, ld_a, split, (sb, sa, m * n))
    else:
        args = (dev, a.dtype.name, n, m, k, tr_b, tr_a, ld_b, ld_a, batch, (sb, sa, m * n))
    bias_dtype = None if bias is None else bias.dtype.name
    if epilogue == "bias_grad" and (args, aligns) in _NO_BIAS_GRAD:
        plan = None
    else:
        try:
            plan = _plan(*args, epilogue, aligns, bias_dtype, backend.tf32_enabled())
        except RuntimeError:
            if epilogue != "bias_grad":
                raise
            _NO_BIAS_GRAD[(args, aligns)] = True
            plan = None
    if plan is None:  # cuBLASLt has no bias-gradient algorithm here: the GEMM, then a sum
        gemm(a, b, out=out)
        sum_leading(b, out=bias)
        return out
    if key is not None:
        direct = (b_.data.ptr == b.data.ptr and a_.data.ptr == a.data.ptr
                  and (bias is None or bias.flags.c_contiguous) and aligns[2] >= 256)
        _CALL_MEMO.put(key, _Call(plan, out.shape, direct, split))
    if bias is not None:
        plan.set_bias(cp.ascontiguousarray(bias).data.ptr)
    _run(plan, a_, b_, out, split)
    return out


def _run(plan, a, b, out, split):
    """The cuBLASLt call; with ``split`` > 1 into split partial products, then their sum."""
    cp = backend.cupy
    target = out if split == 1 else cp.empty((split,) + out.shape, out.dtype)
    a_l, b_l, d_l = plan.layouts
    _lt.matmul(plan.handle, plan.desc, plan.alpha_ptr, b.data.ptr, a_l, a.data.ptr, b_l,
               plan.beta_ptr, target.data.ptr, d_l, target.data.ptr, d_l, plan.algo, plan.ws,
               WORKSPACE_BYTES, cp.cuda.get_current_stream().ptr)
    if split > 1:
        sum_leading(target, out=out)


def split_k(m, n, k, dtype):
    """Chunks of K to run a long-K, small-output float32/float64 product as (a strided batch,
    then a sum): as many as keep 2 waves of 128 x 128 output tiles on the SMs with >= 1024 of K
    each (power-of-two chunks that divide K). 1: no split. Motivation: the weight gradients of
    ResNet-56's convolutions ((16, 131072) @ (131072, 144) and alike) ran cuBLASLt's own choice
    at ~270 µs a call on the H200, 8 of the step's 22.6 ms of kernels (profile_step.py).
    16-bit types are left to cuBLASLt, whose own split-K reduces in float32."""
    if dtype.itemsize < 4 or k < 8192:
        return 1
    tiles = -(-m // 128) * -(-n // 128)
    sms = raw_kernels.device_facts()[0]
    s = 1
    while k % (2 * s) == 0 and k // (2 * s) >= 1024 and 2 * s * tiles <= 2 * sms:
        s *= 2
    return s
