"""conv2d and pooling: forward against loop references, gradients by check_grad, input errors."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import cudrop
from cudrop import backend
from cudrop.autograd import check_grad
from cudrop.functional import _conv as Fconv, _pool as Fpool
from conftest import low_precision_dtype, poison_pool

# ``xp`` is a stateless module: safe to share across hypothesis examples.
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- independent references ----------------------------------------------------------------
def ref_conv2d(x, w, b, stride, padding):
    (sh, sw), (ph, pw) = stride, padding
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, _, hp, wp = xpad.shape
    o, _, kh, kw = w.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    y = np.zeros((n, o, ho, wo))
    for r in range(ho):
        for s in range(wo):
            patch = xpad[:, :, r * sh:r * sh + kh, s * sw:s * sw + kw]
            y[:, :, r, s] = np.einsum("nckl,ockl->no", patch, w)
    if b is not None:
        y += b[None, :, None, None]
    return y


def ref_pool(x, kernel, stride, padding, reduce, fill):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    n, c, hp, wp = xpad.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    y = np.empty((n, c, ho, wo))
    for a in range(n):
        for ch in range(c):
            for r in range(ho):
                for s in range(wo):
                    y[a, ch, r, s] = reduce(xpad[a, ch, r * sh:r * sh + kh, s * sw:s * sw + kw])
    return y


# ---- strategies ----------------------------------------------------------------------------
@st.composite
def conv_case(draw):
    n, c, o = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    kh = draw(st.integers(1, min(4, h + 2 * ph)))
    kw = draw(st.integers(1, min(4, w + 2 * pw)))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(x=(n, c, h, w), w=(o, c, kh, kw), stride=(sh, sw), padding=(ph, pw),
                bias=bias, seed=seed)


@st.composite
def pool_case(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 7))
    w = draw(st.integers(max(1, kw - 2 * pw), 7))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(x=(n, c, h, w), kernel=(kh, kw), stride=stride, padding=(ph, pw), seed=seed)


def conv_inputs(xp, case):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal(case["x"])
    w = rng.standard_normal(case["w"])
    b = rng.standard_normal(case["w"][0]) if case["bias"] else None
    return x, w, b, xp.asarray(x), xp.asarray(w), None if b is None else xp.asarray(b)


def distinct(shape, seed):
    """Values without ties, at least 0.1 apart, so max pooling has a unique argmax."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    return (rng.permutation(size).astype(np.float64) * 0.1 - 0.05 * size).reshape(shape)


# ---- conv2d ----------------------------------------------------------------------------------
@fixture_ok
@given(case=conv_case())
def test_conv2d_forward_matches_loops(xp, case):
    x, w, b, xd, wd, bd = conv_inputs(xp, case)
    y, _ = Fconv.conv2d(xd, wd, bd, case["stride"], case["padding"])
    expect = ref_conv2d(x, w, b, case["stride"], case["padding"])
    assert y.shape == expect.shape and y.dtype == np.float64
    np.testing.assert_allclose(backend.asnumpy(y), expect, rtol=1e-10, atol=1e-10)


@fixture_ok
@given(case=conv_case())
def test_conv2d_gradients(xp, case):
    _, _, _, x, w, b = conv_inputs(xp, case)
    s, p = case["stride"], case["padding"]
    if b is None:
        check_grad(lambda x, w: cudrop.conv2d(x, w, None, s, p), x, w)
    else:
        check_grad(lambda x, w, b: cudrop.conv2d(x, w, b, s, p), x, w, b)


def test_conv2d_int_stride_padding_and_no_bias_grads(xp):
    rng = np.random.default_rng(0)
    x = cudrop.Tensor(xp.asarray(rng.standard_normal((2, 3, 5, 5))), requires_grad=True)
    w = cudrop.Tensor(xp.asarray(rng.standard_normal((4, 3, 3, 3))), requires_grad=True)
    y = cudrop.conv2d(x, w, stride=2, padding=1)
    assert y.shape == (2, 4, 3, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    _, gw, gb = Fconv.conv2d_backward(xp.ones(y.shape), Fconv.conv2d(x.data, w.data, None, 2, 1)[1])
    assert gb is None
    np.testing.assert_allclose(backend.asnumpy(gw), backend.asnumpy(w.grad))


def test_conv2d_keeps_float32(xp):
    x = xp.ones((1, 2, 4, 4), dtype=np.float32)
    w = xp.ones((3, 2, 3, 3), dtype=np.float32)
    b = xp.zeros(3, dtype=np.float32)
    y, saved = Fconv.conv2d(x, w, b, padding=1)
    assert y.dtype == np.float32 and y.flags.c_contiguous
    gx, gw, gb = Fconv.conv2d_backward(xp.ones_like(y), saved)
    assert gx.dtype == gw.dtype == gb.dtype == np.float32
    assert float(y[0, 0, 1, 1]) == 18.0 and float(y[0, 0, 0, 0]) == 8.0


# ---- pooling ---------------------------------------------------------------------------------
def _norm(case):
    k = case["kernel"]
    return k, k if case["stride"] is None else case["stride"], case["padding"]


@fixture_ok
@given(case=pool_case())
def test_max_pool2d_forward_matches_loops(xp, case):
    x = np.random.default_rng(case["seed"]).standard_normal(case["x"])
    y, _ = Fpool.max_pool2d(xp.asarray(x), case["kernel"], case["stride"], case["padding"])
    np.testing.assert_array_equal(backend.asnumpy(y),
                                  ref_pool(x, *_norm(case), np.max, -np.inf))


@fixture_ok
@given(case=pool_case())
def test_avg_pool2d_forward_matches_loops(xp, case):
    x = np.random.default_rng(case["seed"]).standard_normal(case["x"])
    y, _ = Fpool.avg_pool2d(xp.asarray(x), case["kernel"], case["stride"], case["padding"])
    np.testing.assert_allclose(backend.asnumpy(y), ref_pool(x, *_norm(case), np.mean, 0.0),
                               rtol=1e-12, atol=1e-12)


@fixture_ok
@given(case=pool_case())
def test_max_pool2d_gradient(xp, case):
    x = xp.asarray(distinct(case["x"], case["seed"]))
    k, s, p = case["kernel"], case["stride"], case["padding"]
    check_grad(lambda x: cudrop.max_pool2d(x, k, s, p), x)


@fixture_ok
@given(case=pool_case())
def test_avg_pool2d_gradient(xp, case):
    x = xp.asarray(np.random.default_rng(case["seed"]).standard_normal(case["x"]))
    k, s, p = case["kernel"], case["stride"], case["padding"]
    check_grad(lambda x: cudrop.avg_pool2d(x, k, s, p), x)


@fixture_ok
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5),
                       st.integers(1, 5)), seed=st.integers(0, 2**31 - 1))
def test_global_avg_pool2d(xp, shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    y, _ = Fpool.global_avg_pool2d(xp.asarray(x))
    expect = np.array([[x[a, c].sum() / (shape[2] * shape[3]) for c in range(shape[1])]
                       for a in range(shape[0])])
    np.testing.assert_allclose(backend.asnumpy(y), expect, rtol=1e-12)
    check_grad(cudrop.global_avg_pool2d, xp.asarray(x))


def test_max_pool2d_ties_go_to_first_maximum(xp):
    x = xp.asarray(np.array([[[[1.0, 3.0], [3.0, 0.0]]]]))
    y, saved = Fpool.max_pool2d(x, 2)
    gx = Fpool.max_pool2d_backward(xp.ones_like(y), saved)
    np.testing.assert_array_equal(backend.asnumpy(gx), [[[[0.0, 1.0], [0.0, 0.0]]]])


def test_max_pool2d_overlapping_windows_accumulate(xp):
    x = xp.asarray(np.array([[[[0.0, 5.0, 0.0, 1.0]]]]))
    x_t = cudrop.Tensor(x, requires_grad=True)
    cudrop.max_pool2d(x_t, (1, 2), 1).sum().backward()
    np.testing.assert_array_equal(backend.asnumpy(x_t.grad), [[[[0.0, 2.0, 0.0, 1.0]]]])


def test_max_pool2d_propagates_nan(xp):
    x = xp.asarray(np.array([[[[1.0, np.nan], [3.0, 0.0]]]]))
    y, _ = Fpool.max_pool2d(x, 2)
    assert np.isnan(backend.asnumpy(y)).all()


# ---- bad input -------------------------------------------------------------------------------
def _bad_cases(xp):
    f = lambda *s: xp.zeros(s)  # noqa: E731
    x, w = f(2, 3, 5, 5), f(4, 3, 3, 3)
    conv = Fconv.conv2d
    return [
        (lambda: conv(f(3, 5, 5), w), ValueError, r"x must be a 4-D"),
        (lambda: conv(x, f(4, 3, 3)), ValueError, r"w must be a 4-D"),
        (lambda: conv(x, f(4, 2, 3, 3)), ValueError, r"x has 3 channels but w expects 2"),
        (lambda: conv(x, w.astype(np.float32)), TypeError, r"x is float64 but w is float32"),
        (lambda: conv(x, w, f(5)), ValueError, r"b must have shape"),
        (lambda: conv(x, w, f(4).astype(np.float32)), TypeError, r"b is float32"),
        (lambda: conv(x, f(4, 3, 6, 6)), ValueError, r"kernel 6x6 .* larger than the padded"),
        (lambda: conv(x, w, stride=0), ValueError, r"stride must be positive"),
        (lambda: conv(x, w, stride=(1, -1)), ValueError, r"stride must be positive"),
        (lambda: conv(x, w, padding=-1), ValueError, r"padding must be non-negative"),
        (lambda: conv(x, w, stride=1.5), TypeError, r"stride must be an int or a pair"),
        (lambda: conv(x, w, padding=(1, 1, 1)), TypeError, r"padding must be an int or a pair"),
        (lambda: conv([[1.0]], w), TypeError, r"x must be a NumPy or CuPy array"),
        (lambda: Fpool.max_pool2d(f(2, 3), 2), ValueError, r"x must be a 4-D"),
        (lambda: Fpool.max_pool2d(x, 0), ValueError, r"kernel_size must be positive"),
        (lambda: Fpool.max_pool2d(x, 2, stride=0), ValueError, r"stride must be positive"),
        (lambda: Fpool.avg_pool2d(x, 3, padding=-1), ValueError, r"padding must be non-neg"),
        (lambda: Fpool.avg_pool2d(x, 2, padding=2), ValueError, r"padding must be at most half"),
        (lambda: Fpool.max_pool2d(x, 6), ValueError, r"kernel_size 6x6 is larger"),
        (lambda: Fpool.avg_pool2d(x.astype(np.int32), 2), TypeError, r"floating"),
        (lambda: Fpool.global_avg_pool2d(f(2, 3)), ValueError, r"x must be a 4-D"),
    ]


def test_bad_input_names_the_argument(xp):
    for call, exc, match in _bad_cases(xp):
        with pytest.raises(exc, match=match):
            call()


def test_autograd_wrapper_reports_errors(xp):
    x = cudrop.Tensor(xp.zeros((1, 3, 4, 4)))
    w = cudrop.Tensor(xp.zeros((2, 4, 3, 3)))
    with pytest.raises(ValueError, match="x has 3 channels but w expects 4"):
        cudrop.conv2d(x, w)


# ---- fast paths: 1x1 GEMM (NumPy), RawKernels (CuPy) -----------------------------------------
def _relerr(got, want):
    got = backend.asnumpy(got).astype(np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 2), (2, 4, 1, 9)])
def test_conv2d_1x1_stride1_is_a_gemm(xp, shape, bias):
    n, c, h, w_ = shape
    rng = np.random.default_rng(sum(shape))
    x, w = rng.standard_normal(shape), rng.standard_normal((3, c, 1, 1))
    b = rng.standard_normal(3) if bias else None
    xd, wd, bd = xp.asarray(x), xp.asarray(w), None if b is None else xp.asarray(b)
    poison_pool(xp)
    y, saved = Fconv.conv2d(xd, wd, bd)
    assert y.shape == (n, 3, h, w_) and y.flags.c_contiguous
    np.testing.assert_allclose(backend.asnumpy(y), ref_conv2d(x, w, b, (1, 1), (0, 0)),
                               rtol=1e-10, atol=1e-10)
    if b is None:
        check_grad(lambda x, w: cudrop.conv2d(x, w), xd, wd)
    else:
        check_grad(lambda x, w, b: cudrop.conv2d(x, w, b), xd, wd, bd)


# (N, C, H, W) x O for the 1x1 paths: one value (HW = 1), N = 1, odd channel and map sizes, and a
# ResNet-56 shortcut shape (16 -> 32 channels at 32x32, batch 8)
ONE_BY_ONE = [((1, 1, 1, 1), 1), ((1, 5, 1, 1), 3), ((3, 7, 5, 9), 5), ((2, 33, 1, 7), 17),
              ((5, 3, 11, 11), 64), ((8, 16, 32, 32), 32)]
ONE_BY_ONE_TOL = {"float16": 2e-3, "bfloat16": 1.5e-2, "float32": 1e-5, "float64": 1e-12}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("case", ONE_BY_ONE)
@pytest.mark.parametrize("bias", [False, True])
def test_conv2d_1x1_paths_match_float64(xp, dtype, case, bias):
    """A 1x1 stride-1 convolution on each path: ``conv2d`` (the strided-batched GEMMs with the
    weight broadcast, on NumPy and on CuPy with cuBLASLt; else im2col), ``_conv2d_cols`` (the
    im2col kernels on CuPy) and ``_conv2d_arrays``: y, gx, gw, gb against float64 math on the
    same rounded inputs, outputs allocated from a NaN-poisoned pool; ``needs`` without x's
    gradient gives the same gw and gb. float32 tolerates TF32 (CUPY_TF32=1): 1e-3."""
    from cudrop.functional import _gemm
    dt = low_precision_dtype(xp, dtype)
    xs, o = case
    rng = np.random.default_rng(xs[1] * 10 + o)
    x, w, b, gy = (rng.standard_normal(sh).astype(np.float32).astype(dt)
                   for sh in (xs, (o, xs[1], 1, 1), (o,), (xs[0], o) + xs[2:]))
    b = b if bias else None
    x64, w64, gy64 = (a.astype(np.float64) for a in (x, w, gy))
    want = {"y": np.einsum("oc,nchw->nohw", w64[:, :, 0, 0], x64),
            "gx": np.einsum("oc,nohw->nchw", w64[:, :, 0, 0], gy64),
            "gw": np.einsum("nohw,nchw->oc", gy64, x64)[:, :, None, None],
            "gb": gy64.sum(axis=(0, 2, 3)) if bias else None}
    if bias:
        want["y"] += b.astype(np.float64)[None, :, None, None]
    tol = ONE_BY_ONE_TOL[dtype] if dtype != "float32" or xp is np else 1e-3
    gemm = xp is np or _gemm.available()
    for fwd, kind in ((Fconv.conv2d, "gemm" if gemm else "cols"),
                      (Fconv._conv2d_cols, "gemm" if xp is np else "cols"),
                      (Fconv._conv2d_arrays, "gemm" if xp is np else "cols")):
        poison_pool(xp)
        y, saved = fwd(xp.asarray(x), xp.asarray(w), None if b is None else xp.asarray(b))
        assert saved.kind == kind, fwd.__name__
        poison_pool(xp)
        grads = Fconv.conv2d_backward(xp.asarray(gy), saved)
        got = dict(zip(("y", "gx", "gw", "gb"), (y,) + grads))
        part = Fconv.conv2d_backward(xp.asarray(gy), saved, needs=(False, True, True))
        assert part[0] is None
        for name, ref in want.items():
            if ref is None:
                assert got[name] is None and part[2] is None
                continue
            a = got[name]
            assert a.dtype == dt and a.shape == ref.shape, (fwd.__name__, name)
            np.testing.assert_allclose(backend.asnumpy(a).astype(np.float64), ref, rtol=tol,
                                       atol=tol * np.abs(ref).max(),
                                       err_msg=f"{fwd.__name__} {name}")
        for a, ref in zip(part[1:], (got["gw"], got["gb"])):
            if ref is not None:
                np.testing.assert_array_equal(backend.asnumpy(a), backend.asnumpy(ref))


# float32 allows for TF32 GEMMs (CUPY_TF32=1); an indexing error is O(1).
LOW_TOL = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 4e-2}


# The 3x3 cases reach conv.cu's unrolled paths (3x3 stride 1, 3x3 any stride) on ragged maps.
CONV_PATHS = [((3, 5, 7, 9), (6, 5, 3, 2), (2, 1), (1, 2)),
              ((2, 3, 8, 8), (4, 3, 3, 3), (1, 1), (1, 1)),
              ((3, 2, 5, 7), (3, 2, 3, 3), (1, 1), (0, 1)),
              ((2, 3, 7, 5), (4, 3, 3, 3), (2, 2), (1, 1)),
              ((2, 3, 5, 6), (2, 3, 1, 1), (1, 1), (0, 0))]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", CONV_PATHS)
def test_conv2d_low_precision_matches_float64(xp, dtype, case):
    dt = low_precision_dtype(xp, dtype)
    xs, ws, stride, padding = case
    rng = np.random.default_rng(len(dtype))
    x, w, b = (rng.standard_normal(s).astype(dt) for s in (xs, ws, ws[:1]))
    x64, w64, b64 = (a.astype(np.float64) for a in (x, w, b))
    y64, saved64 = Fconv.conv2d(x64, w64, b64, stride, padding)
    gy = rng.standard_normal(y64.shape).astype(dt)
    want = (y64,) + Fconv.conv2d_backward(gy.astype(np.float64), saved64)
    poison_pool(xp)
    y, saved = Fconv.conv2d(xp.asarray(x), xp.asarray(w), xp.asarray(b), stride, padding)
    poison_pool(xp)
    got = (y,) + Fconv.conv2d_backward(xp.asarray(gy), saved)
    for name, g, ref in zip(("y", "gx", "gw", "gb"), got, want):
        assert g.dtype == dt and g.shape == ref.shape, name
        assert _relerr(g, ref) < LOW_TOL[dtype], (name, _relerr(g, ref))


@pytest.mark.parametrize("xs, ws", [((300, 220, 2, 2), (250, 220, 2, 2)),
                                    ((1, 65600, 1, 1), (2, 65600, 1, 1))])
def test_conv2d_beyond_one_grid_row_per_channel(xp, xs, ws):
    """More (n, c) rows, channels or (n, o) rows than a grid's 65535 y-blocks: the loops over y."""
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
    gy_shape = (xs[0], ws[0], xs[2] + 2 - ws[2] + 1, xs[3] + 2 - ws[3] + 1)
    gy = rng.standard_normal(gy_shape).astype(np.float32)
    y64, s64 = Fconv.conv2d(x.astype(np.float64), w.astype(np.float64), None, 1, 1)
    want = (y64,) + Fconv.conv2d_backward(gy.astype(np.float64), s64)[:2]
    poison_pool(xp)
    y, saved = Fconv.conv2d(xp.asarray(x), xp.asarray(w), None, 1, 1)
    got = (y,) + Fconv.conv2d_backward(xp.asarray(gy), saved)[:2]
    for name, g, ref in zip(("y", "gx", "gw"), got, want):
        assert _relerr(g, ref) < 1e-3, (name, _relerr(g, ref))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", CONV_PATHS)
def test_conv2d_kernels_match_the_array_path(xp, case, bias):
    """The path is chosen by calling it, not by a module switch: on CuPy ``conv2d`` runs the
    kernels and ``_conv2d_arrays`` the array ops on the same device (float64: no TF32)."""
    xs, ws, stride, padding = case
    rng = np.random.default_rng(5)
    x, w = xp.asarray(rng.standard_normal(xs)), xp.asarray(rng.standard_normal(ws))
    b = xp.asarray(rng.standard_normal(ws[:1])) if bias else None
    y, saved = Fconv.conv2d(x, w, b, stride, padding)
    ya, saved_a = Fconv._conv2d_arrays(x, w, b, stride, padding)
    assert isinstance(saved, Fconv.Conv2dSaved) and isinstance(saved_a, Fconv.Conv2dSaved)
    gy = xp.asarray(rng.standard_normal(y.shape))
    got = (y,) + Fconv.conv2d_backward(gy, saved)
    want = (ya,) + Fconv._conv2d_backward_arrays(gy, saved_a)
    assert (got[3] is None) == (want[3] is None) == (b is None)  # (gx, gw, gb): gb None sans b
    for name, g, ref in zip(("y", "gx", "gw", "gb"), got, want):
        if ref is not None:
            assert g.shape == ref.shape and _relerr(g, backend.asnumpy(ref)) < 1e-12, name


def test_pool_saved_are_named_tuples_and_backward_is_one_array(xp):
    x = xp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 4)))
    for fwd, bwd, cls, args in ((Fpool.max_pool2d, Fpool.max_pool2d_backward,
                                 Fpool.MaxPool2dSaved, (2,)),
                                (Fpool.avg_pool2d, Fpool.avg_pool2d_backward,
                                 Fpool.AvgPool2dSaved, (3, 1, 1)),
                                (Fpool.global_avg_pool2d, Fpool.global_avg_pool2d_backward,
                                 Fpool.GlobalAvgPool2dSaved, ())):
        y, saved = fwd(x, *args)
        assert isinstance(saved, cls) and saved.x_shape == x.shape
        gx = bwd(xp.ones_like(y), saved)
        assert gx.shape == x.shape  # one array input: a single array, not a tuple


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pooling_takes_16_bit_floats(xp, dtype):
    """bfloat16 (NumPy kind 'V' through ml_dtypes) is a floating dtype for the pools, so a bf16
    ResNet runs; the global mean sums in float32 and rounds once."""
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
        if xp is np:
            import ml_dtypes
            dt = np.dtype(ml_dtypes.bfloat16)
        else:
            dt = low_precision_dtype(xp, dtype)
    else:
        dt = np.dtype(dtype)
    x0 = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    x = xp.asarray(x0.astype(dt))
    y, _ = Fpool.global_avg_pool2d(x)
    assert y.dtype == dt
    want = x0.astype(dt).astype(np.float64).mean(axis=(2, 3))
    ulp = 2.0 ** (-8 if dtype == "bfloat16" else -11)  # one rounding to the 16-bit type
    np.testing.assert_allclose(backend.asnumpy(y).astype(np.float64), want, rtol=ulp,
                               atol=ulp)
    m, _ = Fpool.max_pool2d(x, 2)
    np.testing.assert_array_equal(
        backend.asnumpy(m).astype(np.float64),
        x0.astype(dt).astype(np.float64).reshape(2, 3, 4, 2, 4, 2).max(axis=(3, 5)))
    a, _ = Fpool.avg_pool2d(x, 2)
    assert a.dtype == dt
