"""Block-sparse matrix products on raw arrays, the GEMMs that skip dropped blocks.

Three forms, each taking a :class:`cudrop.masks.BlockMask` (its packed bits and kept-block lists,
never a float mask):

- :func:`dsd`   ``act(scale · (a ⊙ m) @ b + bias)``  a (M, K) masked by m over (M, K); a dropped
  K-block of a row block is neither loaded nor multiplied (input pruning, SparseDrop's forward;
  but see the dense fallback below);
- :func:`dsd_t` ``scale · (a ⊙ m)ᵀ @ b``             a (M, K), b (M, N) -> (K, N); each K-block
  of the result sums over its kept row blocks only (the weight gradient);
- :func:`sdd`   ``act(scale · a @ b + bias) ⊙ m``     m over the (M, N) result: only kept blocks
  are computed, dropped ones are exact zeros (output pruning, SparseDrop's dX).

Operands may be transposed views (``w.T``): the kernels read either major order without a copy.
On CuPy arrays they run as CUDA kernels (``raw_kernels/bsmm_*.cu``) walking the lists on the
device, with no host synchronisation; on NumPy arrays as the reference below, which gathers the
kept blocks and runs one GEMM per row block, so its multiply-adds fall with the kept fraction too.
The dispatcher runs the fastest kernel whose preconditions hold; ``with use_kernel(name):``
forces one (tests check each against float64 math; benchmarks compare them). Where no kernel
runs a product fast (blocks narrower than every tile: block-wise gyro's 32-unit blocks; see
``dispatch._choose``) it runs densely instead, cuBLASLt on a masked copy of the pruned operand
(or, for sdd, cuBLASLt then the mask): the dropped blocks are then multiplied as exact zeros,
so a dropped block's values still never reach the result, but an inf or NaN in the *other*
operand (a weight the kernel would not have read there) gives NaN, as dense math does.
"""
from __future__ import annotations

import contextvars

import numpy as np

from .. import backend, flops, masks
from ..functional import _gemm
from ..functional._matmul import matmul
from .dispatch import KERNELS, Pruning

__all__ = ["dsd", "dsd_t", "sdd", "runs_dense", "use_kernel", "ACTIVATIONS", "KERNELS"]

#: The ``act=`` values of ``dsd`` and ``sdd`` (None, 'relu', 'gelu'), mapped to the kernels'
#: activation codes. 'gelu' is the exact erf form, not the tanh approximation of ``cudrop.gelu``.
ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2}
# a ContextVar, not a module flag: each thread and asyncio task sees its own choice
_KERNEL: contextvars.ContextVar = contextvars.ContextVar("cudrop_bsmm_kernel", default=None)


class use_kernel:
    """``with use_kernel(name):`` every ``dsd``/``dsd_t``/``sdd`` on CuPy arrays in the block
    runs kernel ``name`` (one of :data:`KERNELS`), raising ValueError where that kernel does not
    take the operands; ``None`` restores the automatic choice. NumPy arrays always run the
    reference. Nests; the previous choice comes back on exit."""

    __slots__ = ("name", "_token")

    def __init__(self, name):
        if name is not None and name not in KERNELS:
            raise ValueError(f"use_kernel: name must be one of {', '.join(map(repr, KERNELS))} "
                             f"or None, got {name!r}")
        self.name = name
        self._token = None

    def __enter__(self):
        self._token = _KERNEL.set(self.name)
        return self

    def __exit__(self, *exc):
        _KERNEL.reset(self._token)
        return False


def dsd(a, b, mask, scale=1.0, *, bias=None, act=None, out=None):
    """``act(scale · (a ⊙ m) @ b + bias)``: a (M, K), b (K, N), mask over (M, K) -> (M, N).
    Row blocks with every block dropped give ``act(bias)`` (zeros without bias)."""
    _check(a, b, mask, (a.shape[0], a.shape[1]), "dsd", bias)
    return _run("dsd", a, b, mask, scale, bias, act, out)


def dsd_t(a, b, mask, scale=1.0, *, out=None):
    """``scale · (a ⊙ m)ᵀ @ b``: a (M, K), b (M, N), mask over (M, K) -> (K, N)."""
    _check(a.T, b, mask, (a.shape[0], a.shape[1]), "dsd_t", None)
    return _run("dsd_t", a.T, b, mask, scale, None, None, out)


def sdd(a, b, mask, scale=1.0, *, bias=None, act=None, out=None):
    """``act(scale · a @ b + bias) ⊙ m``: a (M, K), b (K, N), mask over (M, N) -> (M, N)."""
    _check(a, b, mask, (a.shape[0], b.shape[1]), "sdd", bias)
    return _run("sdd", a, b, mask, scale, bias, act, out)


def runs_dense(form, a, b, mask, scale=1.0, *, bias=None, act=None):
    """Whether ``form`` ('dsd', 'dsd_t', 'sdd'; the arguments as that function takes them)
    runs as the dense fallback into a fresh output: cuBLASLt on a masked copy of the pruned
    operand, where no block-sparse kernel runs the product fast (``dispatch._choose``). False on
    NumPy arrays and under ``use_kernel``. An op whose forward runs densely can keep that copy
    for its backward instead of masking the operand again (``functional._block_linear``)."""
    if backend.get_array_module(a, b) is np or _KERNEL.get() is not None:
        return False
    from . import dispatch as bsmm_gpu
    a = a.T if form == "dsd_t" else a
    epilogue = bsmm_gpu.Epilogue(scale, ACTIVATIONS[act], bias is not None)
    return bsmm_gpu.planned_kind(a, b, _pruning(form, mask), epilogue) == "dense"


def _pruning(form, mask):
    """The kernels' view of ``form``'s mask (``dispatch.Pruning``); ``dsd_t`` walks the
    transposed lists."""
    (mb, kb) = mask.block
    if form == "dsd":
        return Pruning((mask.row_count, mask.row_index), None, mb, kb, 1)
    if form == "dsd_t":
        return Pruning((mask.col_count, mask.col_index), None, kb, mb, 1)
    return Pruning(None, mask.bits, mb, 1, kb)


# ---- checks ----------------------------------------------------------------------------------

def _check(a, b, mask, masked_shape, name, bias):
    if not isinstance(mask, masks.BlockMask):
        raise TypeError(f"{name}: mask must be a cudrop.masks.BlockMask, got "
                        f"{type(mask).__name__}")
    for arg, x in (("a", a), ("b", b)):
        if getattr(x, "ndim", None) != 2:
            raise ValueError(f"{name}: {arg} must be a 2-D array, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"{name}: shapes of a and b do not align for the product "
                         f"({a.shape} @ {b.shape} after the form's transposes)")
    if a.dtype != b.dtype or (bias is not None and bias.dtype != a.dtype):
        raise TypeError(f"{name}: operand dtypes differ (a {a.dtype}, b {b.dtype}"
                        + (f", bias {bias.dtype}" if bias is not None else "") + ")")
    if a.dtype.name not in ("float16", "bfloat16", "float32", "float64"):
        raise TypeError(f"{name}: a must be float16, bfloat16, float32 or float64, got {a.dtype}")
    if tuple(mask.shape) != tuple(masked_shape):
        raise ValueError(f"{name}: mask covers {tuple(mask.shape)} but the masked operand is "
                         f"{tuple(masked_shape)}")
    if bias is not None and bias.shape != (b.shape[1],):
        raise ValueError(f"{name}: bias must have shape ({b.shape[1]},), got {bias.shape}")
    backend.get_array_module(a, b, bias, mask.bits)  # raises on mixed NumPy/CuPy


def _run(form, a, b, mask, scale, bias, act, out):
    if act not in ACTIVATIONS:
        raise ValueError(f"{form}: act must be one of {list(ACTIVATIONS)}, got {act!r}")
    m, n = a.shape[0], b.shape[1]
    xp = backend.get_array_module(a, b)
    if out is None:
        out = xp.empty((m, n), a.dtype)
    elif out.shape != (m, n) or out.dtype != a.dtype or backend.get_array_module(out) is not xp:
        raise ValueError(f"{form}: out must be a ({m}, {n}) {a.dtype} array on the operands' "
                         f"device, got {out.shape} {out.dtype}")
    if xp is np:
        _reference(form, a, b, mask, scale, bias, act, out)
    else:
        from . import dispatch as bsmm_gpu
        ran = bsmm_gpu.launch(a, b, out, _pruning(form, mask), scale=scale, bias=bias,
                              act=ACTIVATIONS[act], kernel=_KERNEL.get())
        if ran == "dense":  # no kernel runs this product fast: cuBLASLt does (and counts it)
            _dense(form, a, b, mask, scale, bias, act, out)
        elif flops.active():  # the kept elements of the masked operand (sdd: of the output)
            kept = int(backend.asnumpy(mask.to_dense()).sum())
            flops.add(form, 2 * kept * (a.shape[1] if form == "sdd" else n))
    return out


# ---- the dense fallback on CuPy ---------------------------------------------------------------

def _dense(form, a, b, mask, scale, bias, act, out):
    """``dsd`` / ``dsd_t`` as cuBLASLt (``functional._gemm``, capturable) on a copy of the pruned
    operand with the mask and ``scale`` applied (one pass, ``masks.apply_block``); ``sdd``
    (no bias, no activation) as cuBLASLt, then the mask and ``scale`` applied to the result: the
    dispatcher's choice where no block-sparse kernel runs the product fast (``dispatch._choose``).
    The dropped blocks are multiplied as zeros here: the work is the dense product's."""
    if form == "sdd":
        masks.apply_block(_gemm.gemm(a, b), mask, scale, out=out)
    elif form == "dsd":
        _gemm_into(masks.apply_block(a, mask, scale), b, bias, act, out)
    else:  # dsd_t: ``a`` is the (K, M) view of the masked (M, K) operand
        masked = masks.apply_block(a.T, mask, scale)
        if not out.flags.c_contiguous and out.T.flags.c_contiguous:
            _gemm.gemm(b.T, masked, out=out.T)  # outᵀ = bᵀ (a ⊙ m): no copy of the result
        else:
            _gemm_into(masked.T, b, None, None, out)


def _gemm_into(a, b, bias, act, out):
    if out.flags.c_contiguous:
        _gemm.gemm(a, b, bias=bias, act=act, out=out)
    else:
        out[...] = _gemm.gemm(a, b, bias=bias, act=act)


# ---- the NumPy reference ---------------------------------------------------------------------

def _reference(form, a, b, mask, scale, bias, act, out):
    """Gather the kept blocks and run one GEMM per row block of the mask (per K-block for
    ``dsd_t``): the multiply-adds are the kept elements times the free dimension."""
    (mb, kb) = mask.block
    keep = mask.keep_blocks()
    rows_b, cols_b = (kb, mb) if form == "dsd_t" else (mb, kb)
    keep = keep.T if form == "dsd_t" else keep
    extent = b.shape[1] if form == "sdd" else a.shape[1]
    offs = np.arange(cols_b)
    if form == "sdd":
        out[...] = 0
    for r, row in enumerate(keep):
        rows = slice(r * rows_b, min((r + 1) * rows_b, a.shape[0]))
        blocks = np.flatnonzero(row)
        idx = (blocks[:, None] * cols_b + offs).ravel()
        idx = idx[idx < extent]
        if form == "sdd":
            if idx.size:
                out[rows, idx] = _epilogue(matmul(a[rows], b[:, idx]), scale,
                                           None if bias is None else bias[idx], act)
        elif idx.size:
            out[rows] = _epilogue(matmul(a[rows][:, idx], b[idx]), scale, bias, act)
        else:
            out[rows] = _epilogue(np.zeros((rows.stop - rows.start, b.shape[1]), a.dtype),
                                  scale, bias, act)


def _epilogue(acc, scale, bias, act):
    y = acc * acc.dtype.type(scale) if scale != 1.0 else acc
    if bias is not None:
        y = y + bias
    if act == "relu":
        y = np.maximum(y, 0)
    elif act == "gelu":
        from scipy.special import erf
        y = (0.5 * y * (1 + erf(y / np.sqrt(2)))).astype(y.dtype)
    return y
