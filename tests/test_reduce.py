"""Sums over leading axes (functional/_reduce.py; raw_kernels/reduce.cu on CuPy) against float64
NumPy sums of the same rounded inputs: ragged R and C (1, 7, 33, 1000, 70001), every dtype,
plain sums, sums of products, both from one pass, outputs poisoned first; row chunks forced
ragged on the GPU; the host's chunk rule; the callers that route through it (broadcast
gradients, layer norm's gamma/beta gradients)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from cudrop import backend
from cudrop.autograd.math import sum_to
from cudrop.functional import _norm as Fnorm, _reduce as R
from conftest import low_precision_dtype, poison_pool

# relative to the column's sum of |terms|: the output's rounding dominates for 16-bit results
TOL = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-12}
# (shape, lead): R x C = prod(shape[:lead]) x prod(shape[lead:])
SHAPES = [((1, 1), 1), ((1, 70001), 1), ((70001, 1), 1), ((7, 33), 1), ((33, 7), 1),
          ((1000, 1000), 1), ((70001, 7), 1), ((5, 7, 33), 2), ((3, 4, 1000), 1),
          ((33,), 0), ((1000,), 1)]


def _inputs(xp, dtype, shape, seed=0):
    """g in ``dtype``, x in g's compute dtype (as layer norm keeps xhat), and their float64
    values."""
    rng = np.random.default_rng(seed)
    g = xp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
    x = xp.asarray(rng.standard_normal(shape)).astype(R.compute_dtype(dtype))
    return g, x, backend.asnumpy(g).astype(np.float64), backend.asnumpy(x).astype(np.float64)


def _check(got, terms, lead, dtype, tol_dtype, what):
    axes = tuple(range(lead))
    want, scale = terms.sum(axis=axes), np.abs(terms).sum(axis=axes)
    got = np.asarray(backend.asnumpy(got))
    assert got.shape == want.shape and got.dtype == dtype, what
    assert np.isfinite(got).all(), what
    err = np.abs(got.astype(np.float64) - want)
    # plus float16's subnormal spacing: a tiny sum rounds to it absolutely, not relatively
    bound = TOL[tol_dtype] * scale + (2.0 ** -24 if got.dtype == np.float16 else 1e-300)
    assert (err <= bound).all(), (what, float((err / bound).max()))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("shape, lead", SHAPES)
@pytest.mark.parametrize("mode", ["g", "gx", "both"])
def test_sum_leading_matches_float64(xp, dtype, shape, lead, mode):
    """Each mode, results in g's dtype, from a NaN-poisoned pool; two calls give the same
    bits."""
    dt = low_precision_dtype(xp, dtype)
    g, x, g64, x64 = _inputs(xp, dt, shape)
    runs = []
    for _ in range(2):
        poison_pool(xp)
        if mode == "g":
            runs.append((R.sum_leading(g, lead),))
        elif mode == "gx":
            runs.append((R.sum_leading(g, lead, x),))
        else:
            runs.append(R.sum_leading(g, lead, x, with_plain=True))
    terms = {"g": [g64], "gx": [g64 * x64], "both": [g64 * x64, g64]}[mode]
    for a, b, t in zip(*runs, terms):
        _check(a, t, lead, dt, dtype, mode)
        np.testing.assert_array_equal(backend.asnumpy(a), backend.asnumpy(b))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("shape, lead", [((1, 1), 1), ((70001, 7), 1), ((33, 1000), 1),
                                         ((5, 7, 33), 2)])
def test_sum_leading_into_poisoned_out(xp, dtype, shape, lead):
    """``out=`` of g's dtype, of the accumulation dtype (written by the kernel directly), of
    float64 (a cast) and a strided view (written through a copy): every element written."""
    dt = low_precision_dtype(xp, dtype)
    g, x, g64, x64 = _inputs(xp, dt, shape, seed=1)
    rshape = shape[lead:]
    for odt in (dt, R.compute_dtype(dt), np.dtype(np.float64)):
        out = xp.full(rshape, np.nan, odt)
        assert R.sum_leading(g, lead, out=out) is out
        _check(out, g64, lead, odt, dtype, f"out {odt}")
        out = xp.full(rshape, np.nan, odt)
        assert R.sum_leading(g, lead, x, out=out) is out
        _check(out, g64 * x64, lead, odt, dtype, f"out {odt}, g * x")
    wide = xp.full(rshape[:-1] + (2 * rshape[-1],), np.nan, dt)
    R.sum_leading(g, lead, out=wide[..., ::2])
    _check(wide[..., ::2], g64, lead, dt, dtype, "strided out")
    assert np.isnan(backend.asnumpy(wide[..., 1::2]).astype(np.float64)).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_sum_leading_result_dtypes_and_x_dtypes(xp, dtype):
    """``dtype=`` the accumulation dtype (bf16 activations with float32 parameters) and
    float64; an x in g's own dtype is converted (16-bit) and gives the same sums; strided g
    (the array library's path) matches."""
    dt = low_precision_dtype(xp, dtype)
    g, x, g64, x64 = _inputs(xp, dt, (70001, 7), seed=2)
    acc = R.compute_dtype(dt)
    for odt in (acc, np.dtype(np.float64)):
        s, p = R.sum_leading(g, 1, x, with_plain=True, dtype=odt)
        _check(s, g64 * x64, 1, odt, dtype, f"{odt} g * x")
        _check(p, g64, 1, odt, dtype, f"{odt} g")
    xg = x.astype(dt)
    _check(R.sum_leading(g, 1, xg), g64 * backend.asnumpy(xg).astype(np.float64), 1, dt, dtype,
           "x in g's dtype")
    gt = g.T  # (7, 70001) F-ordered: summing its 7 rows reads strided memory
    _check(R.sum_leading(gt, 1), g64.T, 1, dt, dtype, "strided g")


@pytest.mark.parametrize("shape", [(70001, 7), (1000, 33), (37, 1), (5, 3), (2, 70001)])
@pytest.mark.parametrize("split", [3, 1000])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_sum_leading_forced_row_chunks(xp, monkeypatch, shape, split, dtype):
    """Row chunks forced ragged: S = min(split, R) chunks of ceil(R / S) rows (R = 70001 over 3:
    the last is shorter; split 1000 gives 1-row chunks on the small shapes and a merge over
    more rows than a merging thread's unrolled group): both outputs, deterministic."""
    if xp is np:
        pytest.skip("the row chunks exist only on the GPU kernel's path")
    dt = low_precision_dtype(xp, dtype)

    def forced(r, c, bx):
        s = min(split, r)
        rows = -(-r // s)
        return -(-r // rows), rows

    monkeypatch.setattr(R, "_row_chunks", forced)
    g, x, g64, x64 = _inputs(xp, dt, shape, seed=3)
    runs = []
    for _ in range(2):
        poison_pool(xp)
        runs.append(R.sum_leading(g, 1, x, with_plain=True))
    for a, b, t in zip(*runs, (g64 * x64, g64)):
        _check(a, t, 1, dt, dtype, f"split {split}")
        np.testing.assert_array_equal(backend.asnumpy(a), backend.asnumpy(b))


def test_row_chunk_rule(monkeypatch):
    """S for an H200's 132 SMs (host arithmetic: runs without a GPU): 8 blocks per SM
    together, capped by one unrolled group of rows per thread and 4 per merging thread."""
    monkeypatch.setattr(R, "device_facts", lambda: (132, True))
    for (r, c), want in [((8192, 1024), (66, 125)), ((25088, 1024), (66, 381)),
                         ((131072, 16), (512, 256)), ((1, 5), (1, 1)), ((4, 1 << 20), (1, 4)),
                         ((70001, 1), (35, 2001)), ((100, 7), (1, 100))]:
        assert R._row_chunks(r, c, R._tile_width(c)) == want, (r, c)
    assert [R._tile_width(c) for c in (1, 2, 7, 32, 33, 64, 1000)] == [1, 2, 8, 32, 64, 64, 64]


@given(r=st.integers(1, 10**6), c=st.integers(1, 10**5), sms=st.integers(1, 200))
def test_row_chunks_cover_the_rows_without_empty_chunks(monkeypatch, r, c, sms):
    monkeypatch.setattr(R, "device_facts", lambda: (sms, True))
    s, rows = R._row_chunks(r, c, R._tile_width(c))
    assert 1 <= s <= 65535 and s * rows >= r and (s - 1) * rows < r


def test_sum_leading_bad_arguments(xp):
    g = xp.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="lead"):
        R.sum_leading(g, 3)
    with pytest.raises(ValueError, match="x must have"):
        R.sum_leading(g, 1, xp.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match="with_plain"):
        R.sum_leading(g, 1, with_plain=True)
    with pytest.raises(ValueError, match="out must have"):
        R.sum_leading(g, 1, out=xp.empty(3, np.float32))


def test_sum_leading_empty_and_integer_input(xp):
    """R = 0 gives zeros, C = 0 an empty result; integers (the array library's sum) keep
    g's dtype, as the result dtype does by default."""
    assert (backend.asnumpy(R.sum_leading(xp.ones((0, 5), np.float32))) == 0).all()
    assert R.sum_leading(xp.ones((4, 0), np.float32)).shape == (0,)
    s = R.sum_leading(xp.arange(12, dtype=np.int32).reshape(4, 3))
    assert backend.asnumpy(s).tolist() == [18, 22, 26] and s.dtype == np.int32


@pytest.mark.parametrize("gshape, shape", [((6, 5, 7), (7,)), ((6, 5, 7), (1, 5, 7)),
                                           ((6, 5, 7), (1, 1, 7)), ((1, 5, 7), (1, 1, 7)),
                                           ((6, 1, 7), (1, 1, 7)), ((6, 5, 7), (6, 1, 7)),
                                           ((6, 5, 7), (6, 5, 1)), ((6, 5, 7), ()),
                                           ((6, 5, 7), (5, 1))])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sum_to_matches_numpy(xp, gshape, shape, dtype):
    """Broadcast gradients: leading-axis sums (size-1 axes aside) and the others."""
    g = xp.asarray(np.random.default_rng(4).standard_normal(gshape)).astype(dtype)
    want = backend.asnumpy(g).astype(np.float64)
    lead = len(gshape) - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape)
                                      if n == 1 and gshape[i + lead] != 1)
    want = want.sum(axis=axes, keepdims=True).reshape(shape)
    got = sum_to(g, shape)
    assert got.shape == shape and got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(backend.asnumpy(got), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(7, 1), (33, 1000), (3, 5, 33), (4096 * 8 + 3, 4)])
@pytest.mark.parametrize("gamma_on, beta_on, pdtype", [(True, True, None), (True, False, None),
                                                       (False, True, None),
                                                       (True, True, "float32")])
def test_layer_norm_parameter_grads_match_float64(xp, dtype, shape, gamma_on, beta_on, pdtype):
    """ggamma = sum g * xhat and gbeta = sum g over the leading axes (one pass for both, or
    either alone) against float64, in the parameters' dtype (x's, or float32 parameters of a
    16-bit x); outputs from a NaN-poisoned pool."""
    dt = low_precision_dtype(xp, dtype)
    pdt = dt if pdtype is None else np.dtype(pdtype)
    rng = np.random.default_rng(shape[-1])
    d = shape[-1]
    x = xp.asarray((2 * rng.standard_normal(shape) + 1).astype(np.float32)).astype(dt)
    g = xp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dt)
    gamma = xp.asarray(rng.standard_normal(d).astype(np.float32)).astype(pdt) if gamma_on else None
    beta = xp.asarray(rng.standard_normal(d).astype(np.float32)).astype(pdt) if beta_on else None
    x64, g64 = backend.asnumpy(x).astype(np.float64), backend.asnumpy(g).astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    xhat = (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    lead = len(shape) - 1
    poison_pool(xp)
    _, saved = Fnorm.layer_norm(x, gamma, beta)
    poison_pool(xp)
    _, ggamma, gbeta = Fnorm.layer_norm_backward(g, saved)
    # the tolerance of the parameters' dtype; xhat is float32 for 16-bit x, its rounding
    # well inside that
    tol = dtype if pdtype is None else pdtype
    for got, on, terms in ((ggamma, gamma_on, g64 * xhat), (gbeta, beta_on, g64)):
        if not on:
            assert got is None
            continue
        _check(got, terms, lead, pdt, tol, "parameter grad")
