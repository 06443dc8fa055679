"""cuBLASLt GEMMs (functional/_gemm.py) against float64 NumPy on drawn shapes, ragged edges,
transposed views, broadcast batches, bias/ReLU/GELU epilogues, every dtype; output poisoned
first; and captured in a CUDA graph, replayed on new inputs."""
import numpy as np
import pytest

from cudrop import backend
from cudrop.functional import _gemm
from cudrop.functional._matmul import matmul

from conftest import low_precision_dtype

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.gpu_available(), reason="no usable CUDA GPU"),
              pytest.mark.skipif(not _gemm.available(), reason="nvmath-python not installed")]

TOL = {"float16": 2e-2, "bfloat16": 6e-2, "float32": 1e-5, "float64": 1e-12}


def _ref(a, b, bias=None, act=None):
    y = np.matmul(a.astype(np.float64), b.astype(np.float64))
    if bias is not None:
        y = y + bias.astype(np.float64)
    if act == "relu":
        y = np.maximum(y, 0)
    elif act == "gelu":
        y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    return y


def _close(got, want, dtype):
    got = backend.asnumpy(got).astype(np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def _arrays(cp, dt, *shapes, seed=0):
    rng = np.random.default_rng(seed)
    host = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    return host, [cp.asarray(h).astype(dt) for h in host]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (33, 17, 65), (128, 256, 64), (257, 129, 511)])
def test_gemm_matches_float64(dtype, m, k, n):
    cp = backend.cupy
    dt = low_precision_dtype(cp, dtype)
    (a, b), (da, db) = _arrays(cp, dt, (m, k), (k, n))
    out = cp.full((m, n), np.nan, dt)  # poisoned: every element must be written
    _gemm.gemm(da, db, out=out)
    _close(out, _ref(a.astype(dt), b.astype(dt)), dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_transposed_views_are_read_without_copies(dtype):
    cp = backend.cupy
    dt = low_precision_dtype(cp, dtype)
    (a, b), (da, db) = _arrays(cp, dt, (70, 40), (90, 70))  # a.T (40, 70) @ b.T (70, 90)
    got = matmul(da.T, db.T)
    _close(got, _ref(a.astype(dt).T, b.astype(dt).T), dtype)
    got = matmul(da.T, da)  # the backward's xᵀ g shape pattern
    _close(got, _ref(a.astype(dt).T, a.astype(dt)), dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_batched_and_broadcast(dtype):
    cp = backend.cupy
    dt = low_precision_dtype(cp, dtype)
    (a, b, w), (da, db, dw) = _arrays(cp, dt, (3, 2, 31, 24), (3, 2, 24, 17), (24, 9))
    _close(matmul(da, db), _ref(a.astype(dt), b.astype(dt)), dtype)
    _close(matmul(da, dw), _ref(a.astype(dt), w.astype(dt)), dtype)  # shared matrix, stride 0
    # attention's q kᵀ: a transposed batched view
    _close(matmul(da, da.swapaxes(-1, -2)),
           _ref(a.astype(dt), a.astype(dt).swapaxes(-1, -2)), dtype)
    (c,), (dc,) = _arrays(cp, dt, (1, 2, 24, 5), seed=3)  # partial broadcast of the batch
    _close(matmul(da, dc), _ref(a.astype(dt), c.astype(dt)), dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("n, c, o, hw", [(1, 3, 5, 7), (128, 16, 16, 1024), (9, 33, 17, 1)])
def test_1x1_convolution_products_read_their_operands_in_place(dtype, n, c, o, hw):
    """The 1x1 convolution's three products (functional/_conv.py): W (O, C) @ x (N, C, HW) with
    the weight broadcast, Wᵀ @ gy with a transposed weight view, and gy @ xᵀ per sample with
    transposed batched views: right, and every operand handed to cuBLASLt as it is (the call
    signature is on the direct path: no copy, reshape or broadcast materialised)."""
    cp = backend.cupy
    dt = low_precision_dtype(cp, dtype)
    (w, x, gy), (dw, dx, dgy) = _arrays(cp, dt, (o, c), (n, c, hw), (n, o, hw))
    w, x, gy = (h.astype(dt) for h in (w, x, gy))
    for a, b, da, db in ((w, x, dw, dx), (w.T, gy, dw.T, dgy),
                         (gy, x.swapaxes(1, 2), dgy, dx.swapaxes(1, 2))):
        before = set(_gemm._CALLS)
        got = matmul(da, db)
        _close(got, _ref(a, b), dtype)
        new = [_gemm._CALLS[k] for k in set(_gemm._CALLS) - before]
        assert all(call.direct for call in new), (a.shape, b.shape)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
def test_bias_and_activation_epilogues(dtype, act):
    cp = backend.cupy
    dt = low_precision_dtype(cp, dtype)
    (a, b, bias), (da, db, dbias) = _arrays(cp, dt, (100, 48), (48, 72), (72,))
    got = _gemm.gemm(da, db, bias=dbias, act=act)
    _close(got, _ref(a.astype(dt), b.astype(dt), bias.astype(dt), act), dtype)


def test_gemm_is_captured_and_replayed_on_new_inputs():
    cp = backend.cupy
    (a, b, bias), (da, db, dbias) = _arrays(cp, np.float32, (256, 128), (128, 64), (64,))
    out = cp.empty((256, 64), np.float32)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        _gemm.gemm(da, db, bias=dbias, out=out)  # eager first: the plan is chosen here
        s.begin_capture()
        _gemm.gemm(da, db, bias=dbias, out=out)
        g = s.end_capture()
        for seed in (5, 6):
            (a2,), (da2,) = _arrays(cp, np.float32, (256, 128), seed=seed)
            da[...] = da2
            out.fill(np.nan)
            g.launch(s)
            s.synchronize()
            _close(out, _ref(a2, b, bias), "float32")


def test_fp32_is_exact_not_tf32():
    """Without CUPY_TF32 the float32 product keeps float32 accuracy (TF32 would lose ~3
    decimal digits: this product's relative error would exceed 1e-4)."""
    cp = backend.cupy
    (a, b), (da, db) = _arrays(cp, np.float32, (512, 1024), (1024, 256))
    _close(matmul(da, db), _ref(a, b), "float32")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_repeated_calls_take_the_direct_path_and_stay_right(dtype):
    """After a signature's first call, calls skip planning (one dict probe): new arrays, a
    different bias of the same shape, transposed and batched views must still be right."""
    cp = backend.cupy
    dt = low_precision_dtype(cp, dtype)
    seen = None
    for seed in range(3):
        (a, b, bias, c), (da, db, dbias, dc) = _arrays(cp, dt, (96, 40), (40, 72), (72,),
                                                       (2, 72, 40), seed=seed)
        a, b, bias, c = (h.astype(dt) for h in (a, b, bias, c))
        _close(_gemm.gemm(da, db, bias=dbias, act="relu"), _ref(a, b, bias, "relu"), dtype)
        _close(_gemm.gemm(da, db), _ref(a, b), dtype)
        _close(_gemm.gemm(db.T, da.T), _ref(b.T, a.T), dtype)
        _close(_gemm.gemm(dc, db), _ref(c, b), dtype)
        if seen is None:
            seen = len(_gemm._CALLS)
    assert len(_gemm._CALLS) == seen  # later rounds added no signature


def test_every_proposed_algorithm_gives_the_product():
    """benchmarks/gemm.py times cuBLASLt's other proposals through ``_Plan.choose``: each one
    computes the same product."""
    cp = backend.cupy
    (a, b, bias), (da, db, dbias) = _arrays(cp, np.float16, (512, 384), (384, 256), (256,))
    a, b, bias = (h.astype(np.float16) for h in (a, b, bias))
    _gemm.gemm(da, db, bias=dbias)
    plan = next(c.plan for k, c in _gemm._CALLS.items()
                if k[0] == da.shape and k[3] == db.shape and k[7] is not None)
    assert plan.count >= 1
    try:
        for i in range(plan.count):
            plan.choose(i)
            out = cp.full((512, 256), np.nan, np.float16)
            _close(_gemm.gemm(da, db, bias=dbias, out=out), _ref(a, b, bias), "float16")
    finally:
        plan.choose(0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("m, k, n", [(40, 96, 72), (129, 257, 33), (7, 1, 5)])
def test_bias_gradient_epilogue(dtype, m, k, n):
    """``gemm(xᵀ, g, bias_grad=gb)``: the weight gradient and the bias gradient (column sums of
    g) in one call, as Linear's backward uses it; outputs poisoned first."""
    cp = backend.cupy
    dt = low_precision_dtype(cp, dtype)
    (x, g), (dx, dg) = _arrays(cp, dt, (k, m), (k, n))  # x (rows, in), g (rows, out)
    x, g = x.astype(dt), g.astype(dt)
    gb = cp.full(n, np.nan, dt)
    out = cp.full((m, n), np.nan, dt)
    for _ in range(2):  # planned, then the direct path
        _gemm.gemm(dx.T, dg, bias_grad=gb, out=out)
        _close(out, _ref(x.T, g), dtype)
        _close(gb, g.astype(np.float64).sum(axis=0), dtype)


def test_bias_gradient_checks_its_arguments():
    cp = backend.cupy
    a, b = cp.ones((4, 3), np.float32), cp.ones((3, 5), np.float32)
    with pytest.raises(ValueError, match="bias_grad must be a contiguous \\(5,\\) array"):
        _gemm.gemm(a, b, bias_grad=cp.ones(4, np.float32))
    with pytest.raises(ValueError, match="without bias or act"):
        _gemm.gemm(a, b, act="relu", bias_grad=cp.ones(5, np.float32))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("trans", [False, True])
def test_long_k_products_split_into_chunks_are_right(dtype, trans):
    """A long-K, small-output product (a convolution's weight gradient) runs as chunks of K in
    a strided batch and a sum; both operand layouts, planned and direct calls."""
    cp = backend.cupy
    m, k, n = 16, 16384, 144
    assert _gemm.split_k(m, n, k, np.dtype(dtype)) > 1
    (a, bt), (da, dbt) = _arrays(cp, np.dtype(dtype), (m, k), (n, k))
    db = dbt.T if trans else cp.ascontiguousarray(dbt.T)  # the conv's colsᵀ is a view
    for _ in range(2):
        out = cp.full((m, n), np.nan, dtype)
        _gemm.gemm(da, db, out=out)
        _close(out, _ref(a, bt.T), dtype)
