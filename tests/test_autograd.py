"""Autograd core: gradient checks and forward values for every op, and the engine's contract
(accumulation, graph freeing, no_grad, dtype/device of lifted scalars, mode switches).

Every test takes the ``xp`` fixture, so it runs on NumPy and, on a GPU machine, on CuPy.
Values come from a NumPy generator seeded by hypothesis (cheaper than drawing arrays element by
element) and are moved to ``xp``; references are computed with NumPy on the host.
"""
import math
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes

import cudrop
import cudrop.functional as F
from cudrop import backend
from cudrop.autograd import (Function, Tensor, check_grad, concat, enable_grad, eval_mode,
                             getitem, is_grad_enabled, is_training, log_softmax, no_grad,
                             set_training, softmax, stack, tensor, train_mode)
from cudrop.functional import _matmul as fmatmul

# ``xp`` is a function-scoped fixture but holds no state (it is a module), so reusing it across
# hypothesis examples is safe.
hyp = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
seeds = st.integers(0, 2**32 - 1)
shapes = array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4)
nonscalar_shapes = array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)
pair_shapes = mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, min_side=1,
                                            max_side=4)

host = backend.asnumpy


def normal(xp, rng, shape):
    return xp.asarray(rng.standard_normal(shape))


def positive(xp, rng, shape, low=0.5, high=2.0):
    return xp.asarray(rng.uniform(low, high, shape))


def away_from_zero(xp, rng, shape, low=0.2, high=2.0):
    """Values with |x| >= low: no kink of relu/division blow-up within a finite-difference step."""
    mag = rng.uniform(low, high, shape)
    return xp.asarray(np.where(rng.random(shape) < 0.5, -mag, mag))


def distinct(xp, rng, shape, gap=0.1):
    """Values at least ``gap`` apart: no ties for max."""
    n = int(np.prod(shape, dtype=np.int64))
    v = (rng.permutation(n) - n / 2) * gap + rng.uniform(0, gap / 10, n)
    return xp.asarray(v.reshape(shape))


@st.composite
def axes_for(draw, ndim):
    """None, an int or a tuple of distinct axes, each possibly written negatively."""
    kind = draw(st.sampled_from(["none", "int", "tuple"]) if ndim else st.just("none"))
    if kind == "none":
        return None
    picked = draw(st.lists(st.integers(0, ndim - 1), min_size=1 if kind == "int" else 0,
                           max_size=1 if kind == "int" else ndim, unique=True))
    signed = [a - ndim if draw(st.booleans()) else a for a in picked]
    return signed[0] if kind == "int" else tuple(signed)


def close(actual, expected, rtol=1e-10, atol=1e-12):
    a = actual.data if isinstance(actual, Tensor) else actual
    np.testing.assert_allclose(host(a), np.asarray(expected), rtol=rtol, atol=atol)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------------------------------------
# element-wise binary ops, with broadcasting
# ---------------------------------------------------------------------------------------------
BINARY = {
    "add": (lambda a, b: a + b, np.add),
    "sub": (lambda a, b: a - b, np.subtract),
    "mul": (lambda a, b: a * b, np.multiply),
    "div": (lambda a, b: a / b, np.divide),
    "add_fn": (cudrop.add, np.add),
    "sub_fn": (cudrop.sub, np.subtract),
    "mul_fn": (cudrop.mul, np.multiply),
    "div_fn": (cudrop.div, np.divide),
}


@pytest.mark.parametrize("name", sorted(BINARY))
@hyp
@given(shp=pair_shapes, seed=seeds)
def test_binary_grad_and_forward(xp, name, shp, seed):
    fn, ref = BINARY[name]
    rng = np.random.default_rng(seed)
    sa, sb = shp.input_shapes
    a = normal(xp, rng, sa)
    b = away_from_zero(xp, rng, sb) if name.startswith("div") else normal(xp, rng, sb)
    out = fn(Tensor(a), Tensor(b))
    assert out.shape == shp.result_shape
    close(out, ref(host(a), host(b)))
    check_grad(fn, a, b)


@pytest.mark.parametrize("name", ["add", "sub", "mul", "div"])
@hyp
@given(shape=shapes, seed=seeds, c=st.floats(0.5, 3.0))
def test_binary_with_python_scalar_both_sides(xp, name, shape, seed, c):
    fn, ref = BINARY[name]
    rng = np.random.default_rng(seed)
    a = away_from_zero(xp, rng, shape)
    close(fn(Tensor(a), c), ref(host(a), c))
    close(fn(c, Tensor(a)), ref(c, host(a)))
    check_grad(lambda t: fn(t, c), a)
    check_grad(lambda t: fn(c, t), a)


@hyp
@given(shape=shapes, seed=seeds)
def test_neg(xp, shape, seed):
    a = normal(xp, np.random.default_rng(seed), shape)
    close(-Tensor(a), -host(a))
    close(cudrop.neg(Tensor(a)), -host(a))
    check_grad(lambda t: -t, a)


@hyp
@given(shape=shapes, seed=seeds, c=st.sampled_from([0, 1, 2, 3, -1, 0.5, 1.5, -0.5, 2.7]))
def test_pow_constant_exponent(xp, shape, seed, c):
    a = positive(xp, np.random.default_rng(seed), shape)  # fractional powers need a > 0
    close(Tensor(a) ** c, host(a) ** c)
    close(cudrop.pow(Tensor(a), c), host(a) ** c)
    check_grad(lambda t: t ** c, a)


def test_pow_rejects_tensor_exponent(xp):
    t = Tensor(xp.ones(3))
    with pytest.raises(TypeError, match="exponent"):
        cudrop.pow(t, t)


# ---------------------------------------------------------------------------------------------
# matmul
# ---------------------------------------------------------------------------------------------
matmul_shapes = mutually_broadcastable_shapes(signature="(m,k),(k,n)->(m,n)",
                                              min_dims=0, max_dims=2, min_side=1, max_side=4)


@hyp
@given(shp=matmul_shapes, seed=seeds)
def test_matmul_grad_and_forward(xp, shp, seed):
    rng = np.random.default_rng(seed)
    sa, sb = shp.input_shapes
    a, b = normal(xp, rng, sa), normal(xp, rng, sb)
    out = Tensor(a) @ Tensor(b)
    assert out.shape == shp.result_shape
    close(out, np.matmul(host(a), host(b)))
    close(cudrop.matmul(Tensor(a), Tensor(b)), np.matmul(host(a), host(b)))
    check_grad(lambda x, y: x @ y, a, b)


@pytest.mark.parametrize("sa,sb", [((3, 4), (4, 2)), ((2, 3, 4), (4, 5)), ((4, 3), (2, 3, 2)),
                                   ((2, 1, 3, 4), (1, 3, 4, 2)), ((5, 2, 3), (5, 3, 1)),
                                   ((1, 2, 3), (4, 3, 2))])
def test_matmul_batched_broadcast_cases(xp, sa, sb):
    rng = np.random.default_rng(1)
    a, b = normal(xp, rng, sa), normal(xp, rng, sb)
    close(Tensor(a) @ Tensor(b), np.matmul(host(a), host(b)))
    check_grad(lambda x, y: x @ y, a, b)


def test_matmul_with_raw_array_either_side(xp):
    rng = np.random.default_rng(2)
    a, b = normal(xp, rng, (2, 3)), normal(xp, rng, (3, 4))
    close(Tensor(a) @ b, host(a) @ host(b))
    out = a @ Tensor(b)  # __array_priority__ routes to Tensor.__rmatmul__
    assert isinstance(out, Tensor)
    close(out, host(a) @ host(b))


def test_matmul_errors(xp):
    with pytest.raises(ValueError, match="at least 2"):
        fmatmul.matmul(xp.ones(3), xp.ones((3, 2)))
    with pytest.raises(ValueError, match="align"):
        fmatmul.matmul(xp.ones((2, 3)), xp.ones((2, 2)))
    with pytest.raises(TypeError, match="dtypes"):
        fmatmul.matmul(xp.ones((2, 3), xp.float32), xp.ones((3, 2)))


HALF_CASES = [((3, 16, 32), (3, 32, 8)), ((2, 1, 5, 7), (1, 3, 7, 9)), ((16, 8), (4, 8, 16)),
              ((2, 3, 4, 8), (8, 5)), ((1, 4, 4), (2, 4, 4)), ((4, 64, 64), (4, 64, 64)),
              ((0, 3, 4), (4, 5)), ((2, 3, 0), (2, 0, 4))]


@pytest.mark.parametrize("sa,sb", HALF_CASES)
def test_batched_fp16_matmul_matches_float64(xp, sa, sb):
    """On CuPy this goes through cuBLAS gemmStridedBatchedEx (fp32 accumulation), whose only
    error is the final rounding to fp16. NumPy accumulates in fp16, so there only the shape, the
    dtype and loose values are checked."""
    rng = np.random.default_rng(3)
    a16 = rng.standard_normal(sa).astype(np.float16)
    b16 = rng.standard_normal(sb).astype(np.float16)
    out = fmatmul.matmul(xp.asarray(a16), xp.asarray(b16))
    ref = np.matmul(a16.astype(np.float64), b16.astype(np.float64))
    assert out.dtype == np.float16 and out.shape == ref.shape
    assert backend.get_array_module(out) is xp
    k = sa[-1]
    if xp is np:
        np.testing.assert_allclose(host(out).astype(np.float64), ref, rtol=0,
                                   atol=2e-3 * k * max(1.0, float(np.abs(ref).max(initial=0))))
    else:
        np.testing.assert_allclose(host(out).astype(np.float64), ref, rtol=2e-3, atol=2e-3)


def test_batched_fp16_matmul_non_contiguous_operands(xp):
    """MatMul.backward feeds transposed views: the batched half path must not assume C order."""
    rng = np.random.default_rng(4)
    a16 = rng.standard_normal((3, 8, 6)).astype(np.float16)
    b16 = rng.standard_normal((3, 5, 8)).astype(np.float16)
    a, b = xp.asarray(a16), xp.asarray(b16)
    out = fmatmul.matmul(a.swapaxes(-1, -2), b.swapaxes(-1, -2))
    ref = np.matmul(a16.astype(np.float64).swapaxes(-1, -2), b16.astype(np.float64).swapaxes(-1, -2))
    tol = 2e-3 if xp is not np else 5e-2
    np.testing.assert_allclose(host(out).astype(np.float64), ref, rtol=tol, atol=tol)


def test_fp16_matmul_autograd_matches_float64(xp):
    rng = np.random.default_rng(5)
    a16 = rng.standard_normal((2, 3, 8, 16)).astype(np.float16)
    b16 = rng.standard_normal((3, 16, 4)).astype(np.float16)
    g16 = rng.standard_normal((2, 3, 8, 4)).astype(np.float16)
    x, w = Tensor(xp.asarray(a16), requires_grad=True), Tensor(xp.asarray(b16), requires_grad=True)
    (x @ w).backward(xp.asarray(g16))
    a64, b64, g64 = (v.astype(np.float64) for v in (a16, b16, g16))
    ga = g64 @ b64.swapaxes(-1, -2)
    gb = (a64.swapaxes(-1, -2) @ g64).sum(axis=0)
    assert x.grad.dtype == np.float16 and w.grad.dtype == np.float16
    tol = 5e-3 if xp is not np else 5e-2
    np.testing.assert_allclose(host(x.grad).astype(np.float64), ga, rtol=tol, atol=tol)
    np.testing.assert_allclose(host(w.grad).astype(np.float64), gb, rtol=tol, atol=tol * 4)


def test_batched_bf16_matmul_matches_float64(xp):
    if xp is np:
        pytest.skip("the bfloat16 path is CuPy-only")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(6)
    a = rng.standard_normal((3, 8, 16)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal((3, 16, 4)).astype(ml_dtypes.bfloat16)
    try:
        da, db = xp.asarray(a), xp.asarray(b)
    except Exception as e:  # CuPy builds without bfloat16 support
        pytest.skip(f"CuPy cannot hold bfloat16 arrays here: {e}")
    out = fmatmul.matmul(da, db)
    ref = np.matmul(a.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(host(out).astype(np.float64), ref, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# element-wise unary ops
# ---------------------------------------------------------------------------------------------
UNARY = {
    "exp": (cudrop.exp, np.exp, normal),
    "log": (cudrop.log, np.log, positive),
    "tanh": (cudrop.tanh, np.tanh, normal),
    "sigmoid": (cudrop.sigmoid, _sigmoid, normal),
    "relu": (cudrop.relu, lambda x: np.maximum(x, 0), away_from_zero),
    "gelu": (cudrop.gelu, _gelu, normal),
}


@pytest.mark.parametrize("name", sorted(UNARY))
@hyp
@given(shape=shapes, seed=seeds)
def test_unary_grad_and_forward(xp, name, shape, seed):
    fn, ref, draw = UNARY[name]
    a = draw(xp, np.random.default_rng(seed), shape)
    close(fn(Tensor(a)), ref(host(a)))
    check_grad(fn, a)


@pytest.mark.parametrize("name", ["exp", "log", "tanh", "sigmoid", "relu"])
def test_unary_tensor_methods(xp, name):
    fn, ref, draw = UNARY[name]
    a = draw(xp, np.random.default_rng(7), (3, 2))
    close(getattr(Tensor(a), name)(), ref(host(a)))


def test_sigmoid_extreme_inputs_finite(xp):
    a = xp.asarray([-1000.0, -50.0, 0.0, 50.0, 1000.0])
    close(cudrop.sigmoid(Tensor(a)), _sigmoid(np.clip(host(a), -700, 700)), atol=1e-15)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gelu_grad_finite_for_large_half_inputs(xp, dtype):
    """In float16 ``a * a`` overflows for |a| > 256; the tail of GELU's derivative is 0 / 1
    exactly there, so the gradient must not become 0 * inf = nan."""
    x = Tensor(xp.asarray([1000.0, -1000.0, 300.0, -300.0, 1.0], dtype=dtype), requires_grad=True)
    with np.errstate(over="ignore"):
        cudrop.gelu(x).backward(xp.ones(5, dtype=dtype))
    g = host(x.grad).astype(np.float64)
    assert np.isfinite(g).all(), g
    np.testing.assert_allclose(g[:4], [1, 0, 1, 0], atol=1e-3)


def test_relu_gradient_mask(xp):
    x = Tensor(xp.asarray([-2.0, -0.5, 0.5, 3.0]), requires_grad=True)
    cudrop.relu(x).sum().backward()
    close(x.grad, [0, 0, 1, 1])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(), (1,), (37, 9), (4096 * 9 + 5,)])
def test_relu_forward_matches_maximum_bit_for_bit(xp, dtype, shape):
    """The ReLU forward (one 16-byte-vectorised kernel on the GPU: act.cu's relu_fwd) against
    NumPy's ``maximum(x, 0)`` on the same rounded input: NaN kept, infinities, -0 (equal to 0;
    NumPy's own float16 maximum keeps its sign, its float64 one does not); a transposed view as
    input; the output from a NaN-poisoned pool."""
    from conftest import low_precision_dtype, poison_pool
    dt = low_precision_dtype(xp, dtype)
    x0 = np.random.default_rng(sum(shape) + 1).standard_normal(shape).astype(np.float32)
    if x0.size >= 4:
        x0.reshape(-1)[:4] = [np.nan, -0.0, np.inf, -np.inf]
    x = xp.asarray(x0).astype(dt)
    if len(shape) == 2:
        x = xp.asarray(x0.T.copy()).astype(dt).T  # the same values, transposed view
    xh = host(x).astype(np.float64)
    poison_pool(xp)
    y, saved = F.relu(x)
    assert y.dtype == dt and y.shape == shape and saved.y is y
    want = np.maximum(xh, 0)
    np.testing.assert_array_equal(host(y).astype(np.float64), want)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_relu_backward_keeps_dtype_and_shape(xp, dtype):
    """One pass on the GPU (raw_kernels/act.cu): the gradient in the input's dtype (bfloat16
    gradients once came back float32), non-contiguous and odd-sized inputs included."""
    from conftest import low_precision_dtype
    dt = low_precision_dtype(xp, dtype)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((37, 9)).astype(np.float32)
    g0 = rng.standard_normal((9, 37)).astype(np.float32)
    x = xp.asarray(x0).astype(dt)
    g = xp.asarray(g0).astype(dt).T  # a transposed view
    y, saved = F.relu(x)
    gx = F.relu_backward(g, saved)
    assert gx.dtype == dt and gx.shape == (37, 9)
    want = np.where(x0.astype(dt).astype(np.float64) > 0, g0.T.astype(dt).astype(np.float64), 0)
    np.testing.assert_array_equal(host(gx).astype(np.float64), want)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(), (1,), (7, 1), (3, 5, 7), (2, 16, 9, 9), (4096 * 9 + 5,)])
def test_add_relu_pair_is_relu_of_the_sum(xp, dtype, shape):
    """``add_relu`` (one kernel each way on the GPU: act.cu's add_relu_fwd, then relu_bwd)
    against float64 math on the same rounded inputs, and bit for bit against ``relu(a + b)``
    in two ops; a transposed view as an operand; both gradients are the masked output gradient
    (the same array); outputs allocated from a NaN-poisoned pool."""
    from conftest import low_precision_dtype, poison_pool
    dt = low_precision_dtype(xp, dtype)
    rng = np.random.default_rng(len(shape) + sum(shape))
    a, b, g = (xp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dt)
               for _ in range(3))
    if len(shape) == 3:
        b = xp.asarray(rng.standard_normal(shape[::-1]).astype(np.float32)).astype(dt).T
    a64, b64, g64 = (host(v).astype(np.float64) for v in (a, b, g))
    poison_pool(xp)
    y, saved = F.add_relu(a, b)
    poison_pool(xp)
    ga, gb = F.add_relu_backward(g, saved)
    assert ga is gb and y.dtype == ga.dtype == dt and y.shape == ga.shape == shape
    tol = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-7, "float64": 1e-15}[dtype]
    s64 = a64 + b64
    np.testing.assert_allclose(host(y).astype(np.float64), np.maximum(s64, 0), rtol=tol,
                               atol=tol)
    yh = host(y).astype(np.float64)
    np.testing.assert_array_equal(host(ga).astype(np.float64), np.where(yh > 0, g64, 0))
    y2, saved2 = F.relu(a + b)
    np.testing.assert_array_equal(host(y).astype(np.float64), host(y2).astype(np.float64))
    np.testing.assert_array_equal(host(ga).astype(np.float64),
                                  host(F.relu_backward(g, saved2)).astype(np.float64))


def test_add_relu_keeps_nan_and_checks_its_operands(xp):
    a = xp.asarray([np.nan, -1.0, 2.0, -0.5])
    y, _ = F.add_relu(a, xp.asarray([0.0, 0.5, -3.0, 1.0]))
    np.testing.assert_array_equal(host(y), [np.nan, 0.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="one shape and dtype"):
        F.add_relu(a, a[:2])
    with pytest.raises(ValueError, match="one shape and dtype"):
        F.add_relu(a, a.astype(np.float32))


@given(shape=nonscalar_shapes, seed=seeds)
@hyp
def test_add_relu_grad(xp, shape, seed):
    rng = np.random.default_rng(seed)
    check_grad(cudrop.add_relu, normal(xp, rng, shape), normal(xp, rng, shape), seed=seed)


def test_astype_roundtrip_grad(xp):
    x = Tensor(xp.asarray([1.0, 2.0, 3.0], dtype=xp.float32), requires_grad=True)
    y = x.astype(np.float64)
    assert y.dtype == np.float64
    (y * y).sum().backward()
    assert x.grad.dtype == np.float32
    close(x.grad, [2, 4, 6], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# softmax family
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["softmax", "log_softmax"])
@hyp
@given(data=st.data(), shape=nonscalar_shapes, seed=seeds)
def test_softmax_family(xp, which, data, shape, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    a = normal(xp, np.random.default_rng(seed), shape) * 3
    fn = softmax if which == "softmax" else log_softmax
    ref = _softmax(host(a), axis)
    close(fn(Tensor(a), axis=axis), ref if which == "softmax" else np.log(ref))
    check_grad(lambda t: fn(t, axis=axis), a)


def test_softmax_large_logits_stable(xp):
    a = xp.asarray([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -1000.0]])
    out = softmax(Tensor(a))
    assert np.isfinite(host(out.data)).all()
    close(out, _softmax(host(a), -1))
    close(log_softmax(Tensor(a)), np.log(_softmax(host(a), -1)))


# ---------------------------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------------------------
REDUCE = {
    "sum": (cudrop.sum, np.sum, normal),
    "mean": (cudrop.mean, np.mean, normal),
    "max": (cudrop.max, np.max, distinct),
    "var": (cudrop.var, np.var, normal),
}


@pytest.mark.parametrize("name", sorted(REDUCE))
@hyp
@given(data=st.data(), shape=shapes, seed=seeds, keepdims=st.booleans())
def test_reduction(xp, name, data, shape, seed, keepdims):
    fn, ref, draw = REDUCE[name]
    axis = data.draw(axes_for(len(shape)), label="axis")
    a = draw(xp, np.random.default_rng(seed), shape)
    expected = ref(host(a), axis=axis, keepdims=keepdims)
    out = fn(Tensor(a), axis=axis, keepdims=keepdims)
    assert out.shape == np.shape(expected)
    close(out, expected)
    method = getattr(Tensor(a), name)(axis=axis, keepdims=keepdims)
    close(method, expected)
    check_grad(lambda t: fn(t, axis=axis, keepdims=keepdims), a)


def test_reduction_numpy_integer_axis(xp):
    a = xp.arange(6.0).reshape(2, 3)
    close(cudrop.sum(Tensor(a), axis=np.int64(1)), [3, 12])
    close(cudrop.mean(Tensor(a), axis=(np.int64(0),)), [1.5, 2.5, 3.5])


def test_reduction_axis_out_of_range(xp):
    with pytest.raises(ValueError, match="axis"):
        cudrop.sum(Tensor(xp.ones((2, 3))), axis=2)


def test_max_splits_gradient_between_ties(xp):
    x = Tensor(xp.asarray([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0]]), requires_grad=True)
    x.max(axis=1).sum().backward()
    close(x.grad, [[0, 0.5, 0.5], [1, 0, 0]])


def test_mean_half_precision_many_elements(xp):
    """float16 cannot hold n = 70000: the mean and its gradient must not turn into 0/inf/nan."""
    n = 70000
    x = Tensor(xp.ones(n, dtype=xp.float16), requires_grad=True)
    m = cudrop.mean(x)
    assert m.dtype == np.float16
    close(m, 1.0, rtol=1e-3)
    m.backward()
    assert x.grad.dtype == np.float16
    np.testing.assert_allclose(host(x.grad).astype(np.float64) * n, np.ones(n), rtol=1e-2)


def test_mean_of_ints_is_float(xp):
    out = cudrop.mean(Tensor(xp.arange(4)))
    assert out.dtype.kind == "f"
    close(out, 1.5)


# ---------------------------------------------------------------------------------------------
# shape ops
# ---------------------------------------------------------------------------------------------
@hyp
@given(shape=shapes, seed=seeds, data=st.data())
def test_reshape(xp, shape, seed, data):
    a = normal(xp, np.random.default_rng(seed), shape)
    size = int(np.prod(shape, dtype=np.int64))
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    d = data.draw(st.sampled_from(divisors), label="first")
    target = data.draw(st.sampled_from([(d, size // d), (d, -1), (size,), (-1,), (1, size, 1)]),
                       label="target")
    close(cudrop.reshape(Tensor(a), target), host(a).reshape(target))
    close(Tensor(a).reshape(*target), host(a).reshape(target))
    close(Tensor(a).reshape(target), host(a).reshape(target))
    check_grad(lambda t: cudrop.reshape(t, target), a)


def test_reshape_int_shape(xp):
    a = xp.arange(6.0).reshape(2, 3)
    close(cudrop.reshape(Tensor(a), 6), np.arange(6.0))
    close(Tensor(a).reshape(6), np.arange(6.0))


@hyp
@given(shape=shapes, seed=seeds, data=st.data())
def test_transpose(xp, shape, seed, data):
    a = normal(xp, np.random.default_rng(seed), shape)
    nd = len(shape)
    axes = data.draw(st.one_of(st.none(), st.permutations(range(nd))), label="axes")
    if axes is not None:
        axes = [ax - nd if data.draw(st.booleans(), label="neg") else ax for ax in axes]
    expected = np.transpose(host(a), axes)
    close(cudrop.transpose(Tensor(a), axes), expected)
    check_grad(lambda t: cudrop.transpose(t, axes), a)
    if axes is None:
        close(Tensor(a).T, expected)
        close(Tensor(a).transpose(), expected)
    else:
        close(Tensor(a).transpose(*axes), expected)
        close(Tensor(a).transpose(axes), expected)


@st.composite
def index_for(draw, shape):
    """A NumPy index of the kinds the Tensor supports: basic slices and ints, integer arrays
    (repeats, negatives), boolean masks, and mixtures."""
    kind = draw(st.sampled_from(["slices", "int_array", "int_array_2d", "bool_full",
                                 "bool_axis0", "mixed", "int_and_slice", "ellipsis_newaxis"]))
    n0 = shape[0]
    if kind == "slices":
        idx = []
        for n in shape:
            if draw(st.booleans()):
                idx.append(draw(st.integers(-n, n - 1)))
            else:
                start = draw(st.one_of(st.none(), st.integers(-n, n)))
                stop = draw(st.one_of(st.none(), st.integers(-n, n)))
                step = draw(st.sampled_from([None, 1, 2, -1, -2]))
                idx.append(slice(start, stop, step))
        return tuple(idx)
    if kind == "int_array":
        return ("int", draw(st.lists(st.integers(-n0, n0 - 1), min_size=1, max_size=6)))
    if kind == "int_array_2d":
        return ("int2", draw(st.lists(st.integers(-n0, n0 - 1), min_size=4, max_size=4)))
    if kind == "bool_full":
        return ("bool", draw(st.lists(st.booleans(), min_size=int(np.prod(shape)),
                                      max_size=int(np.prod(shape)))))
    if kind == "bool_axis0":
        return ("bool0", draw(st.lists(st.booleans(), min_size=n0, max_size=n0)))
    if kind == "mixed" and len(shape) >= 2:
        return ("mixed", draw(st.lists(st.integers(-n0, n0 - 1), min_size=1, max_size=5)))
    if kind == "int_and_slice" and len(shape) >= 2:
        return (draw(st.integers(-n0, n0 - 1)), slice(None, None, -1))
    return (Ellipsis, None, slice(0, 1))


def materialise(xp, idx, shape):
    """Turn the drawn description into a real index on device ``xp``."""
    if isinstance(idx, tuple) and idx and isinstance(idx[0], str):
        kind, vals = idx
        if kind == "int":
            return xp.asarray(vals)
        if kind == "int2":
            return xp.asarray(vals).reshape(2, 2)
        if kind == "bool":
            return xp.asarray(vals).reshape(shape)
        if kind == "bool0":
            return xp.asarray(vals, dtype=bool)
        if kind == "mixed":
            return (xp.asarray(vals), slice(None, None, 2))
    return idx


@hyp
@given(shape=nonscalar_shapes, seed=seeds, data=st.data())
def test_getitem(xp, shape, seed, data):
    desc = data.draw(index_for(shape), label="index")
    idx = materialise(xp, desc, shape)
    a = normal(xp, np.random.default_rng(seed), shape)
    host_idx = tuple(host(i) if hasattr(i, "shape") else i for i in idx) \
        if isinstance(idx, tuple) else host(idx)
    expected = host(a)[host_idx]
    out = Tensor(a)[idx]
    close(out, expected)
    close(getitem(Tensor(a), idx), expected)
    assume(out.size > 0)
    check_grad(lambda t: t[idx], a)


def test_getitem_repeated_indices_accumulate(xp):
    x = Tensor(xp.arange(4.0), requires_grad=True)
    x[xp.asarray([0, 2, 0, 0, -1])].sum().backward()
    close(x.grad, [3, 0, 1, 1])


def test_getitem_tensor_index_and_bool_mask(xp):
    a = xp.arange(6.0).reshape(3, 2)
    x = Tensor(a, requires_grad=True)
    rows = Tensor(xp.asarray([2, 2, 0]))
    y = x[rows]
    close(y, host(a)[[2, 2, 0]])
    (y * 1.0).sum().backward()
    close(x.grad, [[1, 1], [0, 0], [2, 2]])
    x.zero_grad()
    x[x > 2.5].sum().backward()
    close(x.grad, host(a) > 2.5)


@hyp
@given(shape=nonscalar_shapes, seed=seeds, data=st.data())
def test_concat(xp, shape, seed, data):
    rng = np.random.default_rng(seed)
    nd = len(shape)
    axis = data.draw(st.integers(-nd, nd - 1), label="axis")
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3), label="sizes")
    parts = []
    for s in sizes:
        sh = list(shape)
        sh[axis] = s
        parts.append(normal(xp, rng, tuple(sh)))
    expected = np.concatenate([host(p) for p in parts], axis=axis)
    close(concat([Tensor(p) for p in parts], axis=axis), expected)
    check_grad(lambda *ts: concat(list(ts), axis=axis), *parts)


@hyp
@given(shape=shapes, seed=seeds, data=st.data())
def test_stack(xp, shape, seed, data):
    rng = np.random.default_rng(seed)
    nd = len(shape) + 1
    axis = data.draw(st.integers(-nd, nd - 1), label="axis")
    k = data.draw(st.integers(1, 3), label="count")
    parts = [normal(xp, rng, shape) for _ in range(k)]
    expected = np.stack([host(p) for p in parts], axis=axis)
    close(stack([Tensor(p) for p in parts], axis=axis), expected)
    check_grad(lambda *ts: stack(list(ts), axis=axis), *parts)


def test_concat_stack_need_inputs():
    with pytest.raises(ValueError, match="at least one"):
        concat([])
    with pytest.raises(ValueError, match="at least one"):
        stack([])


def test_concat_partial_requires_grad(xp):
    a = Tensor(xp.ones((2, 2)), requires_grad=True)
    b = Tensor(xp.ones((1, 2)))
    (concat([a, b]) * 2.0).sum().backward()
    close(a.grad, np.full((2, 2), 2.0))
    assert b.grad is None


# ---------------------------------------------------------------------------------------------
# check_grad itself
# ---------------------------------------------------------------------------------------------
class _WrongSquare(Function):
    def forward(self, a):
        self.a = a
        return a * a

    def backward(self, g):
        return g * self.a  # should be 2 a


def test_check_grad_catches_wrong_gradient(xp):
    a = normal(xp, np.random.default_rng(8), (3, 2))
    with pytest.raises(AssertionError, match="gradient check failed"):
        check_grad(lambda t: _WrongSquare()(t), a)


def test_check_grad_wants_float64(xp):
    with pytest.raises(TypeError, match="float64"):
        check_grad(lambda t: t * 2, xp.ones(3, dtype=xp.float32))


def test_check_grad_wrt_subset(xp):
    rng = np.random.default_rng(9)
    a, b = normal(xp, rng, (3,)), normal(xp, rng, (3,))
    check_grad(lambda x, y: x * y, a, b, wrt=[1])


# ---------------------------------------------------------------------------------------------
# engine
# ---------------------------------------------------------------------------------------------
def leaf(xp, values, dtype=None):
    return Tensor(xp.asarray(values, dtype=dtype or xp.float64), requires_grad=True)


def test_grad_accumulates_within_one_graph(xp):
    x = leaf(xp, [1.0, 2.0, -3.0])
    (x * x).sum().backward()
    close(x.grad, [2, 4, -6])
    y = leaf(xp, [1.0, 2.0])
    (y + y).sum().backward()
    close(y.grad, [2, 2])
    z = leaf(xp, [1.5])
    (z * z * z + z).sum().backward()
    close(z.grad, [3 * 1.5 ** 2 + 1])


def test_grad_accumulates_across_backward_calls(xp):
    x = leaf(xp, [1.0, 2.0])
    (x * 3.0).sum().backward()
    (x * x).sum().backward()
    close(x.grad, [3 + 2, 3 + 4])
    x.zero_grad()
    assert x.grad is None


def test_backward_on_leaf_root(xp):
    x = leaf(xp, [2.0])
    x.backward()
    close(x.grad, [1.0])


def test_diamond_graph(xp):
    x = leaf(xp, [0.5, -1.0, 2.0])
    a = x * 2.0
    b = a + 1.0
    c = a * 3.0
    d = (b * c).sum()  # d = (2x + 1) 6x = 12 x^2 + 6x
    d.backward()
    close(x.grad, 24 * host(x.data) + 6)
    check_grad(lambda t: ((t * 2.0 + 1.0) * (t * 2.0) * 3.0).sum(), xp.asarray([0.5, -1.0, 2.0]))


def test_deep_chain_no_recursion_limit(xp):
    n = max(2000, sys.getrecursionlimit() + 500)
    x = leaf(xp, [1.0, 2.0])
    y = x
    for _ in range(n):
        y = y * 1.0001 + 0.0
    y.sum().backward(retain_graph=True)
    close(x.grad, np.full(2, 1.0001 ** n), rtol=1e-9)
    del y  # freeing a deep retained graph must not overflow the C stack either


def test_no_grad_builds_no_graph(xp):
    x = leaf(xp, [1.0, 2.0])
    with no_grad():
        assert not is_grad_enabled()
        y = (x * 2.0).sum()
        with enable_grad():
            assert is_grad_enabled()
            z = x * 2.0
        assert not is_grad_enabled()
    assert is_grad_enabled()
    assert y.creator is None and not y.requires_grad
    assert z.creator is not None and z.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


def test_no_inputs_requiring_grad_build_no_graph(xp):
    y = Tensor(xp.ones(3)) * 2.0
    assert y.creator is None and not y.requires_grad


def test_non_scalar_backward_needs_grad(xp):
    y = leaf(xp, [1.0, 2.0]) * 2.0
    with pytest.raises(RuntimeError, match="grad="):
        y.backward()
    with pytest.raises(ValueError, match="shape"):
        y.backward(xp.ones(3))
    y.backward(xp.asarray([1.0, 10.0]))


def test_backward_grad_argument_as_tensor_or_list(xp):
    x = leaf(xp, [1.0, 2.0])
    (x * 2.0).backward(Tensor(xp.asarray([1.0, 1.0])), retain_graph=True)
    close(x.grad, [2, 2])
    if xp is np:
        (x * 2.0).backward([1.0, 0.5])
        close(x.grad, [4, 3])


def test_backward_twice_needs_retain_graph(xp):
    x = leaf(xp, [1.0, 2.0])
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()

    x.zero_grad()
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    close(x.grad, 2 * 2 * host(x.data))


class _Split(Function):
    """Two outputs: the first ``k`` entries and the rest."""

    def __init__(self, k):
        self.k = k
        self.received = None

    def forward(self, a):
        return a[: self.k].copy(), a[self.k:].copy()

    def backward(self, g1, g2):
        self.received = (g1, g2)
        return backend.get_array_module(g1).concatenate([g1, g2])


@pytest.mark.parametrize("keep_other", [True, False])
def test_multi_output_unused_output_gets_zero_grad(xp, keep_other):
    x = leaf(xp, [1.0, 2.0, 3.0, 4.0])
    f = _Split(1)
    first, second = f(x)
    assert first.creator is f and second.creator is f
    if not keep_other:
        del second
    (first * 5.0).sum().backward(retain_graph=True)
    close(x.grad, [5, 0, 0, 0])
    g1, g2 = f.received
    assert g2 is not None and g2.shape == (3,) and g2.dtype == x.dtype
    close(g2, np.zeros(3))


def test_multi_output_both_used(xp):
    x = leaf(xp, [1.0, 2.0, 3.0])
    a, b = _Split(2)(x)
    (a.sum() * 2.0 + (b * b).sum()).backward()
    close(x.grad, [2, 2, 6])


class _BadArity(Function):
    def forward(self, a, b):
        return a + b

    def backward(self, g):
        return g


def test_backward_arity_mismatch_raises(xp):
    a, b = leaf(xp, [1.0]), leaf(xp, [2.0])
    with pytest.raises(RuntimeError, match="2 inputs"):
        _BadArity()(a, b).backward()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_scalar_lifting_keeps_dtype_and_device(xp, dtype):
    t = Tensor(xp.asarray([1.0, 2.0], dtype=dtype))
    outs = [t * 2, 2 * t, t + 2.5, 1 - t, t / 2, 3.0 / t, t - np.float64(1.5), t ** 2,
            np.float64(2.0) * t]
    for o in outs:
        assert isinstance(o, Tensor)
        assert o.dtype == np.dtype(dtype), o
        assert backend.get_array_module(o.data) is xp
        assert o.device == t.device


def test_scalar_lifting_int_tensor_promotes_for_float_scalar(xp):
    t = Tensor(xp.arange(3))
    close(t * 2.5, [0.0, 2.5, 5.0])
    close(2.5 + t, [2.5, 3.5, 4.5])
    close(t / 2, [0.0, 0.5, 1.0])
    assert (t * 2).dtype == t.dtype
    close(t * 2, [0, 2, 4])


def test_array_priority_makes_raw_array_ops_return_tensor(xp):
    a = xp.asarray([1.0, 2.0, 4.0])
    t = leaf(xp, [2.0, 3.0, 5.0])
    for op, ref in [(lambda u, v: u + v, np.add), (lambda u, v: u - v, np.subtract),
                    (lambda u, v: u * v, np.multiply), (lambda u, v: u / v, np.divide)]:
        out = op(a, t)
        assert isinstance(out, Tensor), type(out)
        close(out, ref(host(a), host(t.data)))
    out = a * t
    out.sum().backward()
    close(t.grad, host(a))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_grad_dtype_equals_data_dtype(xp, dtype):
    x = Tensor(xp.asarray([[0.5, -1.0], [2.0, 1.5]], dtype=dtype), requires_grad=True)
    w = Tensor(xp.asarray([[1.0], [2.0]], dtype=dtype), requires_grad=True)
    const64 = xp.asarray([1.0, 2.0])  # a float64 array mixed in promotes the forward
    y = (cudrop.tanh(x @ w) * 2).sum() + (x * const64).mean() + x.max() + x.var(axis=0).sum()
    y.backward()
    assert x.grad.dtype == np.dtype(dtype) and w.grad.dtype == np.dtype(dtype)
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_leaf_grads_do_not_alias(xp):
    """Optimisers update ``.grad`` in place (weight decay, clipping): two leaves, or a leaf and
    the caller's seed gradient, must never share one array."""
    a, b = leaf(xp, [1.0, 2.0]), leaf(xp, [3.0, 4.0])
    (a + b).backward(xp.asarray([1.0, 1.0]))
    assert a.grad is not b.grad
    a.grad *= 10
    close(b.grad, [1, 1])

    seed = xp.asarray([1.0, 1.0])
    x = leaf(xp, [1.0, 2.0])
    (x + 0.0).backward(seed)
    x.grad += 1
    close(seed, [1, 1])

    r = leaf(xp, [5.0])
    s = xp.asarray([2.0])
    r.backward(s)
    r.grad *= 3
    close(s, [2.0])


def test_intermediate_tensors_get_no_grad(xp):
    x = leaf(xp, [1.0, 2.0])
    h = x * 2.0
    (h * h).sum().backward()
    assert h.grad is None
    close(x.grad, 8 * host(x.data))


def test_detach_cuts_graph(xp):
    x = leaf(xp, [1.0, 2.0])
    d = (x * 2.0).detach()
    assert d.creator is None and not d.requires_grad
    (x * d).sum().backward()
    close(x.grad, 2 * host(x.data))


def test_tensor_helpers(xp):
    t = tensor([[1, 2], [3, 4]], dtype=np.float32, requires_grad=True)
    assert t.dtype == np.float32 and t.requires_grad and t.shape == (2, 2) and len(t) == 2
    assert t.device == "cpu" and t.ndim == 2 and t.size == 4
    assert "requires_grad=True" in repr(t)
    assert Tensor(xp.asarray([3.0])).item() == 3.0
    np.testing.assert_array_equal(Tensor(xp.asarray([1.0, 2.0])).numpy(), [1.0, 2.0])
    assert isinstance((Tensor(xp.ones(2)) < 2), type(xp.ones(1)))


@pytest.mark.gpu
def test_mixed_numpy_cupy_raises_type_error():
    cp = backend.cupy
    a = Tensor(np.ones(3), requires_grad=True)
    b = Tensor(cp.ones(3))
    for fn in (lambda: a + b, lambda: b * a, lambda: cudrop.matmul(Tensor(np.ones((2, 2))),
                                                                      Tensor(cp.ones((2, 2))))):
        with pytest.raises(TypeError, match="NumPy") as e:
            fn()
        assert "CuPy" in str(e.value)
    c = Tensor(cp.ones(3), requires_grad=True)
    with pytest.raises(TypeError, match="CuPy"):
        (c * 2.0).sum().backward(np.ones(()))  # a GPU graph seeded with a NumPy gradient


@pytest.mark.gpu
def test_to_device_roundtrip():
    x = Tensor(np.arange(3.0), requires_grad=True)
    g = x.to("gpu")
    assert g.device.startswith("gpu") and g.requires_grad and g.creator is None
    back = g.to("cpu")
    assert back.device == "cpu"
    np.testing.assert_array_equal(back.data, np.arange(3.0))


# ---------------------------------------------------------------------------------------------
# mode switches
# ---------------------------------------------------------------------------------------------
def test_train_eval_switch_restores():
    assert is_training()
    with eval_mode():
        assert not is_training()
        with train_mode():
            assert is_training()
        assert not is_training()
    assert is_training()


def test_mode_switches_restore_after_exception():
    with pytest.raises(KeyError):
        with eval_mode():
            raise KeyError("boom")
    assert is_training()
    with pytest.raises(KeyError):
        with no_grad():
            raise KeyError("boom")
    assert is_grad_enabled()
    try:
        set_training(False)
        with pytest.raises(KeyError):
            with train_mode():
                assert is_training()
                raise KeyError("boom")
        assert not is_training()
        with pytest.raises(KeyError):
            with no_grad():
                with enable_grad():
                    raise KeyError("boom")
        assert is_grad_enabled()
    finally:
        set_training(True)


def test_mode_is_per_thread():
    import threading
    seen = {}

    def worker():
        seen["grad"], seen["train"] = is_grad_enabled(), is_training()

    with no_grad(), eval_mode():
        th = threading.Thread(target=worker)
        th.start()
        th.join()
    assert seen == {"grad": True, "train": True}


def test_relu_of_infinities_and_pow_zero_exponent_at_zero(xp):
    x = cudrop.Tensor(xp.asarray([-np.inf, -1.0, 0.0, 2.0, np.inf]), requires_grad=True)
    y = cudrop.relu(x)
    assert backend.asnumpy(y.data).tolist() == [0.0, 0.0, 0.0, 2.0, np.inf]
    y.backward(xp.asarray([1.0, 1.0, 1.0, 1.0, np.inf]))
    assert backend.asnumpy(x.grad).tolist() == [0.0, 0.0, 0.0, 1.0, np.inf]
    z = cudrop.Tensor(xp.zeros(3), requires_grad=True)
    (z ** 0).sum().backward()
    assert backend.asnumpy(z.grad).tolist() == [0.0, 0.0, 0.0]


def test_leaves_own_their_gradients_without_needless_copies(xp):
    """A fresh gradient array becomes the leaf's .grad as it is (no extra pass); one array
    handed to two leaves (a + b), the seed, and pass-through gradients are copied, so an
    in-place update of one leaf's .grad (clipping, hooks) never reaches another."""
    kept = {}

    class Twice(Function):
        def forward(self, a):
            return a * 2

        def backward(self, g):
            kept["gx"] = g * 2
            return kept["gx"]

    x = Tensor(xp.ones(3), requires_grad=True)
    Twice()(x).sum().backward()
    assert x.grad is kept["gx"]

    a, b = Tensor(xp.ones(3), requires_grad=True), Tensor(xp.ones(3), requires_grad=True)
    seed = xp.ones(3)
    (a + b).backward(seed)
    assert a.grad is not b.grad and a.grad is not seed and b.grad is not seed
    a.grad *= 5
    close(b.grad, [1, 1, 1])
    close(seed, [1, 1, 1])

    c = Tensor(xp.ones(3), requires_grad=True)
    c.backward(seed)  # a leaf as the root: the seed itself is never kept
    assert c.grad is not seed


def test_a_freed_gradients_reused_id_does_not_make_a_leaf_copy(xp):
    """The pass's record of handed arrays is by identity, not by id alone: an array freed
    during the pass whose id a new array gets (CPython and the memory pool reuse both at once)
    does not make that new array's leaf copy it."""
    from cudrop.autograd.function import _Handed
    first = xp.ones(3)
    handed = _Handed(first)
    assert first in handed and xp.ones(3) not in handed
    for _ in range(1000):  # until a new array takes the id of a freed handed one
        a = xp.zeros(4)
        handed.add(a)
        old = id(a)
        del a
        b = xp.zeros(4)
        if id(b) == old:
            break
    else:
        pytest.fail("no id was reused in 1000 tries: the test cannot show the case")
    assert b not in handed and first in handed
    handed.add(b)
    assert b in handed


def test_backward_skips_gradients_nobody_needs(xp):
    """Linear and conv2d are told which inputs need a gradient: a first layer's input gradient
    (a whole GEMM, and a col2im for a convolution) is not computed; the others are unchanged."""
    from cudrop.functional import _conv
    from cudrop import flops
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((6, 5)))
    w, b = xp.asarray(rng.standard_normal((5, 4))), xp.asarray(rng.standard_normal(4))
    y, saved = F.linear(x, w, b)
    g = xp.ones_like(y)
    full = F.linear_backward(g, saved)
    part = F.linear_backward(g, saved, needs=(False, True, True))
    assert part[0] is None
    close(part[1], host(full[1]))
    close(part[2], host(full[2]))
    img = xp.asarray(rng.standard_normal((2, 3, 5, 5)))
    k = xp.asarray(rng.standard_normal((4, 3, 3, 3)))
    y, saved = _conv.conv2d(img, k, None, 1, 1)
    full = _conv.conv2d_backward(xp.ones_like(y), saved)
    part = _conv.conv2d_backward(xp.ones_like(y), saved, needs=(False, True, False))
    assert part[0] is None
    close(part[1], host(full[1]))
    # through autograd: an input without requires_grad costs no input-gradient product
    wt, bt = Tensor(w, requires_grad=True), Tensor(b, requires_grad=True)
    with flops.count() as c:
        cudrop.linear(Tensor(x), wt, bt).sum().backward()
    assert c.total == 2 * (2 * 6 * 5 * 4)  # the forward and the weight gradient only
    assert wt.grad is not None and bt.grad is not None


def test_softmax_and_gelu_of_an_int_input_are_float(xp):
    """Only floating inputs are cast back to their dtype: an int input gets NumPy's float
    result (never truncated to int)."""
    t = Tensor(xp.arange(3))
    e = np.exp(np.arange(3.0))
    close(cudrop.softmax(t), e / e.sum())
    close(cudrop.log_softmax(t), np.log(e / e.sum()))
    x = np.arange(3.0)
    close(cudrop.gelu(t), 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(5, 1), (3, 31), (2, 3, 33), (4, 300), (4096 * 8 + 3, 2)])
def test_softmax_and_gelu_tanh_pairs_match_float64(xp, dtype, shape):
    """The functional pairs (one kernel each way on the GPU: softmax.cu's warp per row over
    ragged row lengths and more rows than its grid's warps, act.cu's GELU) against float64 math on the same rounded inputs, with the
    pool poisoned before every launch; the outputs keep the input dtype."""
    from conftest import low_precision_dtype, poison_pool
    dt = low_precision_dtype(xp, dtype)
    rng = np.random.default_rng(sum(shape))
    x = xp.asarray((3 * rng.standard_normal(shape)).astype(np.float32)).astype(dt)
    g = xp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dt)
    x64, g64 = host(x).astype(np.float64), host(g).astype(np.float64)
    tol = {"float16": 4e-3, "bfloat16": 2e-2, "float32": 1e-5, "float64": 1e-12}[dtype]

    e = np.exp(x64 - x64.max(-1, keepdims=True))
    y64 = e / e.sum(-1, keepdims=True)
    poison_pool(xp)
    y, saved = F.softmax(x)
    poison_pool(xp)
    gx = F.softmax_backward(g, saved)
    gx64 = y64 * (g64 - (g64 * y64).sum(-1, keepdims=True))
    for got, want in ((y, y64), (gx, gx64)):
        assert got.dtype == dt and got.shape == shape
        np.testing.assert_allclose(host(got).astype(np.float64), want, rtol=tol, atol=tol)

    c = math.sqrt(2 / math.pi)
    t = np.tanh(c * (x64 + 0.044715 * x64 ** 3))
    poison_pool(xp)
    y, saved = F.gelu_tanh(x)
    poison_pool(xp)
    gx = F.gelu_tanh_backward(g, saved)
    dgelu = 0.5 * (1 + t) + 0.5 * x64 * (1 - t * t) * c * (1 + 3 * 0.044715 * x64 ** 2)
    for got, want in ((y, 0.5 * x64 * (1 + t)), (gx, g64 * dgelu)):
        assert got.dtype == dt and got.shape == shape
        scale = np.abs(want).max()
        np.testing.assert_allclose(host(got).astype(np.float64), want, rtol=tol,
                                   atol=tol * scale)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_binary_ops_skip_the_gradient_of_a_constant_operand(xp, op, monkeypatch):
    """A constant operand (an array, a Python number) gets no gradient computed: attention's
    ``s * scale + causal_mask`` once reduced the whole (B, H, T, T) gradient to the scalar and
    to the (T, T) mask every step. The tensor operand's gradient is unchanged, on either side."""
    from cudrop.autograd import math as amath
    shapes = []
    real = amath.sum_to

    def spy(g, shape):
        shapes.append(tuple(shape))
        return real(g, shape)

    monkeypatch.setattr(amath, "sum_to", spy)
    rng = np.random.default_rng(3)
    a = xp.asarray(rng.uniform(1, 2, (4, 3)))
    c = xp.asarray(rng.uniform(1, 2, (3,)))
    fn = {"add": lambda u, v: u + v, "sub": lambda u, v: u - v, "mul": lambda u, v: u * v,
          "div": lambda u, v: u / v}[op]
    for left in (True, False):
        shapes.clear()
        t = Tensor(a, requires_grad=True)
        out = fn(t, c) if left else fn(c, t)
        out.sum().backward()
        assert shapes == [(4, 3)]  # only the tensor's gradient was reduced
        a64, c64 = host(a), host(c)
        want = {"add": np.ones_like(a64), "sub": np.full_like(a64, 1 if left else -1),
                "mul": np.broadcast_to(c64, a64.shape),
                "div": 1 / np.broadcast_to(c64, a64.shape) if left else -c64 / a64 ** 2}[op]
        np.testing.assert_allclose(host(t.grad), want, rtol=1e-12)
