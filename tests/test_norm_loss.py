"""Batch/layer norm, cross entropy, MSE and embedding: forward values against
formulas written here independently in NumPy, gradients by check_grad, and argument checks."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import cudrop
from cudrop import backend
from cudrop.autograd import check_grad
from cudrop.functional import _embedding as Femb
from cudrop.functional import _loss as Floss
from cudrop.functional import _norm as Fnorm
from conftest import low_precision_dtype, poison_pool, raises_at_check

seeds = st.integers(0, 2**16)


bn_shapes = st.builds(lambda n, c, sp: (n, c, *sp), st.integers(2, 4), st.integers(1, 3),
                      st.lists(st.integers(1, 3), max_size=2))
lead_shapes = st.lists(st.integers(1, 3), max_size=2).map(tuple)


def _normal(xp, seed, shape, loc=0.0, scale=1.0):
    return xp.asarray(np.random.default_rng(seed).normal(loc, scale, shape))


def _np(a):
    return backend.asnumpy(a.data if isinstance(a, cudrop.Tensor) else a)


# ---- batch norm ---------------------------------------------------------------------------

def _bn_params(xp, seed, shape):
    c = shape[1]
    x = _normal(xp, seed, shape, loc=0.5, scale=2.0)
    gamma = _normal(xp, seed + 1, (c,), loc=1.0)
    beta = _normal(xp, seed + 2, (c,))
    rm = _normal(xp, seed + 3, (c,))
    rv = xp.asarray(np.random.default_rng(seed + 4).uniform(0.5, 2.0, c))
    return x, gamma, beta, rm, rv


@given(shape=bn_shapes, seed=seeds, momentum=st.sampled_from([0.1, 0.3, 1.0]))
def test_batch_norm_train_forward_and_running_stats(xp, shape, seed, momentum):
    x, gamma, beta, rm, rv = _bn_params(xp, seed, shape)
    xn, gn, bn, rm0, rv0 = (_np(a).copy() for a in (x, gamma, beta, rm, rv))
    axes = tuple(i for i in range(len(shape)) if i != 1)
    bshape = [1] * len(shape)
    bshape[1] = shape[1]
    mu = xn.mean(axis=axes)
    var = xn.var(axis=axes)
    want = ((xn - mu.reshape(bshape)) / np.sqrt(var.reshape(bshape) + 1e-5) * gn.reshape(bshape)
            + bn.reshape(bshape))

    y = cudrop.batch_norm(cudrop.Tensor(x), cudrop.Tensor(gamma), cudrop.Tensor(beta), rm, rv,
                          training=True, momentum=momentum)
    np.testing.assert_allclose(_np(y), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(_np(rm), (1 - momentum) * rm0 + momentum * mu, rtol=1e-12)
    unbiased = xn.var(axis=axes, ddof=1)
    np.testing.assert_allclose(_np(rv), (1 - momentum) * rv0 + momentum * unbiased, rtol=1e-12)


@given(shape=bn_shapes, seed=seeds)
def test_batch_norm_eval_forward_uses_running_stats(xp, shape, seed):
    x, gamma, beta, rm, rv = _bn_params(xp, seed, shape)
    xn, gn, bn, rm0, rv0 = (_np(a).copy() for a in (x, gamma, beta, rm, rv))
    bshape = [1] * len(shape)
    bshape[1] = shape[1]
    want = ((xn - rm0.reshape(bshape)) / np.sqrt(rv0.reshape(bshape) + 1e-3)
            * gn.reshape(bshape) + bn.reshape(bshape))
    y = cudrop.batch_norm(x, gamma, beta, rm, rv, training=False, eps=1e-3)
    np.testing.assert_allclose(_np(y), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(_np(rm), rm0)
    np.testing.assert_array_equal(_np(rv), rv0)


def test_batch_norm_layer_follows_mode(xp):
    """The layer decides train versus eval (the op takes ``training`` explicitly)."""
    layer = cudrop.nn.BatchNorm1d(2, dtype=np.float64).to("gpu" if xp is not np else "cpu")
    x = cudrop.Tensor(xp.asarray(np.random.default_rng(0).standard_normal((4, 2))))
    rm0 = _np(layer.running_mean).copy()
    with cudrop.train_mode():
        layer(x)
    assert not np.array_equal(_np(layer.running_mean), rm0)
    rm1 = _np(layer.running_mean).copy()
    with cudrop.eval_mode():
        layer(x)
    np.testing.assert_array_equal(_np(layer.running_mean), rm1)


@given(shape=bn_shapes, seed=seeds, training=st.booleans(), affine=st.booleans(),
       act=st.sampled_from([None, "relu"]))
def test_batch_norm_grad(xp, shape, seed, training, affine, act):
    x, gamma, beta, rm, rv = _bn_params(xp, seed, shape)

    if affine:
        def fn(x, g, b):
            # fresh running stats per call: training mode updates them in place
            return cudrop.batch_norm(x, g, b, rm.copy(), rv.copy(), training=training, act=act)
        check_grad(fn, x, gamma, beta, seed=seed)
    else:
        check_grad(lambda x: cudrop.batch_norm(x, None, None, rm.copy(), rv.copy(),
                                               training=training, act=act), x, seed=seed)


def test_batch_norm_float16_stats_in_float32(xp):
    x = _normal(xp, 0, (64, 3, 2), loc=50.0, scale=0.5)
    rm, rv = xp.zeros(3), xp.ones(3)
    y64, _ = Fnorm.batch_norm(x, None, None, rm.copy(), rv.copy(), True)
    y16, _ = Fnorm.batch_norm(x.astype(np.float16), None, None, rm.copy(), rv.copy(), True)
    assert y16.dtype == np.float16
    # the float16 input itself is rounded (spacing 0.03 near 50 = 0.06 std), so compare loosely
    np.testing.assert_allclose(_np(y16).astype(np.float64), _np(y64), atol=0.15)


def _relerr(got, want):
    got = _np(got).astype(np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float16", 2e-3),
                                        ("bfloat16", 1.5e-2)])
@pytest.mark.parametrize("shape", [(5, 3, 7, 3), (64, 3, 16, 17), (7, 130), (3, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_low_precision_matches_float64(xp, dtype, tol, shape, training):
    """Forward, running statistics and all three gradients against the float64 path on the
    same (rounded) inputs; (64, 3, 16, 17) has more than 16384 values per channel."""
    dt = low_precision_dtype(xp, dtype)
    rng = np.random.default_rng(shape[0])
    c = shape[1]
    x = rng.normal(0.7, 1.5, shape).astype(dt)
    gamma, beta = rng.normal(1.0, 0.5, c).astype(dt), rng.normal(0.0, 1.0, c).astype(dt)
    g = rng.standard_normal(shape).astype(dt)
    rm, rv = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    f64 = [a.astype(np.float64) for a in (x, gamma, beta, rm, rv)]
    y64, s64 = Fnorm.batch_norm(*f64, training, momentum=0.2)
    want = (y64,) + Fnorm.batch_norm_backward(g.astype(np.float64), s64)
    rm_d, rv_d = xp.asarray(rm), xp.asarray(rv)
    poison_pool(xp)
    y, saved = Fnorm.batch_norm(xp.asarray(x), xp.asarray(gamma), xp.asarray(beta), rm_d, rv_d,
                                training, momentum=0.2)
    poison_pool(xp)
    got = (y,) + Fnorm.batch_norm_backward(xp.asarray(g), saved)
    for name, a, ref in zip(("y", "gx", "ggamma", "gbeta"), got, want):
        assert a.dtype == dt and a.shape == ref.shape, name
        assert _relerr(a, ref) < tol, (name, _relerr(a, ref))
    # running statistics stay float32 and follow the float64 update to float32 precision
    for a, ref in ((rm_d, f64[3]), (rv_d, f64[4])):
        assert a.dtype == np.float32
        np.testing.assert_allclose(_np(a), ref, rtol=max(tol, 1e-5), atol=max(tol, 1e-5))


def _bn_float64_reference(x, gamma, beta, rm, rv, g, training, momentum, eps, relu_mask=None):
    """Batch norm written out in float64 NumPy: ``(y, gx, ggamma, gbeta, running_mean,
    running_var, inv_std)``; ``gamma``/``beta`` None for no affine map. ``relu_mask`` (bool, x's
    shape): a ReLU after it, whose gradient passes where the mask is True (the tested output's
    ``y > 0``: a value within rounding of 0 may fall either way)."""
    x, g = x.astype(np.float64), g.astype(np.float64)
    if relu_mask is not None:
        g = np.where(relu_mask, g, 0.0)
    c = x.shape[1]
    axes = (0,) + tuple(range(2, x.ndim))
    bshape = (1, c) + (1,) * (x.ndim - 2)
    n = x.size // c
    mu, var = (x.mean(axis=axes), x.var(axis=axes)) if training else (rm, rv)
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (x - mu.reshape(bshape)) * inv.reshape(bshape)
    gam = np.ones(c) if gamma is None else gamma.astype(np.float64)
    y = xhat * gam.reshape(bshape)
    if beta is not None:
        y = y + beta.astype(np.float64).reshape(bshape)
    gbeta, ggamma = g.sum(axis=axes), (g * xhat).sum(axis=axes)
    k = (gam * inv).reshape(bshape)
    if training:
        gx = k / n * (n * g - gbeta.reshape(bshape) - xhat * ggamma.reshape(bshape))
        rm = (1 - momentum) * rm + momentum * mu
        rv = (1 - momentum) * rv + momentum * x.var(axis=axes, ddof=1)
    else:
        gx = g * k
    if relu_mask is not None:
        y = np.maximum(y, 0)
    return y, gx, ggamma, gbeta, rm, rv, inv


def test_batch_norm_split_rule(monkeypatch):
    """S (CTAs per channel in the GPU reductions) for an H200's 132 SMs: C * S reaches 264,
    capped by N; 1 once C reaches 264. Host arithmetic only: runs without a GPU."""
    monkeypatch.setattr(Fnorm, "device_facts", lambda: (132, True))
    for (nb, c), want in [((128, 16), 17), ((128, 32), 9), ((128, 64), 5), ((37, 3), 37),
                          ((300, 5), 53), ((2, 1), 2), ((1, 3), 1), ((4, 263), 2),
                          ((4, 264), 1), ((4, 600), 1)]:
        assert Fnorm._bn_split(nb, c) == want, (nb, c)


def test_split_stays_within_what_the_merge_holds(monkeypatch):
    """``_split`` caps the rule so that the elementwise kernels' shared-memory merge holds the
    partials: C <= CD_BN_MERGE_MAX and C * S <= CD_BN_PART_MAX, the numbers norm.cu defines
    (read from its source here). Host arithmetic only."""
    import re
    from cudrop import raw_kernels
    src = raw_kernels.source("norm.cu")
    defined = {k: int(v) for k, v in re.findall(r"#define (CD_BN_\w+_MAX) (\d+)", src)}
    assert defined == {"CD_BN_MERGE_MAX": Fnorm._MERGE_MAX, "CD_BN_PART_MAX": Fnorm._PART_MAX}
    monkeypatch.setattr(Fnorm, "device_facts", lambda: (132, True))
    for (nb, c), want in [((128, 16), 17), ((300, 5), 53), ((2, 1), 2)]:
        assert Fnorm._split(nb, c) == want == Fnorm._bn_split(nb, c)
    monkeypatch.setattr(Fnorm, "_bn_split", lambda nb, c: nb)  # a rule that asks for more
    for nb, c in [(4096, 1), (4096, 3), (4096, 512), (4096, 513), (3, 600)]:
        split = Fnorm._split(nb, c)
        assert split >= 1 and (split == 1 or (c <= Fnorm._MERGE_MAX
                                              and c * split <= Fnorm._PART_MAX)), (nb, c)
    assert Fnorm._split(4096, 1) == 1024 and Fnorm._split(4096, 512) == 2
    assert Fnorm._split(4096, 513) == 1


# (N, C, ...) shapes for the split reductions: S > 1 with N not a multiple of S (37 samples;
# 128 x 16 x 32 x 32, the ResNet-56 CIFAR layer the split was made for, S = 17 on 132 SMs), the
# smallest training input (2, 1, 1), (N, C) input, N = 1 (S = 1 whatever the GPU) and a channel
# count that fills the GPU alone (S = 1 below 300 SMs).
BN_SPLIT_SHAPES = [(37, 3, 5, 7), (128, 16, 32, 32), (2, 1, 1), (300, 5), (2, 1), (1, 3, 4, 5),
                   (4, 600)]


@pytest.mark.parametrize("shape", BN_SPLIT_SHAPES)
@pytest.mark.parametrize("split", [None, 5])
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 2e-6)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("act", [None, "relu"])
def test_batch_norm_split_reductions_match_float64(xp, monkeypatch, shape, split, dtype, tol,
                                                   training, affine, act):
    """The reductions with each channel spread over S CTAs: forward, inverse std, running
    statistics and the gradients against float64 math written out here, outputs and
    workspaces allocated from a NaN-poisoned pool. ``split`` None keeps the host's rule (S > 1
    wherever C is below twice the SM count); 5 forces S = min(5, N) on any GPU (up to what the
    merge holds in shared memory: S = 1 for C > 512, (4, 600)), so every split shape with N > 5
    has N not a multiple of S. Two identical calls give identical bits.
    ``act='relu'``: the fused ReLU, its mask in both backward kernels."""
    if xp is np and split is not None:
        pytest.skip("the split exists only on the GPU kernels' path")
    if split is not None:
        monkeypatch.setattr(Fnorm, "_bn_split", lambda nb, c: min(split, nb))
    dt = np.dtype(dtype)
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    c = shape[1]
    x = rng.normal(0.5, 2.0, shape).astype(dt)
    gamma, beta = rng.normal(1.0, 0.5, c).astype(dt), rng.normal(0.0, 1.0, c).astype(dt)
    if not affine:
        gamma = beta = None
    g = rng.standard_normal(shape).astype(dt)
    rm0 = rng.standard_normal(c).astype(dt)
    rv0 = rng.uniform(0.5, 2, c).astype(dt)
    runs = []
    for _ in range(2):
        rm, rv = xp.asarray(rm0.copy()), xp.asarray(rv0.copy())  # updated in place
        poison_pool(xp)
        gb = [None if a is None else xp.asarray(a) for a in (gamma, beta)]
        y, saved = Fnorm.batch_norm(xp.asarray(x), *gb, rm, rv, training, momentum=0.3,
                                    act=act)
        poison_pool(xp)
        grads = Fnorm.batch_norm_backward(xp.asarray(g), saved)
        outs = (y,) + grads + (rm, rv, saved.inv_std)
        runs.append([None if a is None else _np(a) for a in outs])
    want = _bn_float64_reference(x, gamma, beta, rm0.astype(np.float64), rv0.astype(np.float64),
                                 g, training, 0.3, 1e-5, runs[0][0] > 0 if act else None)
    names = ("y", "gx", "ggamma", "gbeta", "running_mean", "running_var", "inv_std")
    for name, a, b, ref in zip(names, *runs, want):
        if not affine and name in ("ggamma", "gbeta"):
            assert a is None and b is None, name
            continue
        assert a.shape == ref.shape, name
        assert a.dtype == (dt if name != "inv_std" else Fnorm.compute_dtype(dt)), name
        assert np.isfinite(a).all(), name
        np.testing.assert_array_equal(a, b, err_msg=f"{name}: two identical calls differ")
        # per element, relative to the array's scale; gx in training is a difference of terms
        # of the size of g * gamma * inv_std that may cancel almost exactly (N * P = 2: gx is
        # zero but for eps), so its scale is theirs
        scale = np.abs(ref).max()
        if name == "gx":
            scale = np.abs(g).max() * np.abs(want[6] * (1 if gamma is None else gamma)).max()
        np.testing.assert_allclose(a, ref, rtol=0, atol=tol * scale, err_msg=name)


# ---- layer norm ---------------------------------------------------------------------------

@given(lead=lead_shapes, d=st.integers(2, 5), seed=seeds)
def test_layer_norm_forward(xp, lead, d, seed):
    x = _normal(xp, seed, lead + (d,), loc=-1.0, scale=3.0)
    gamma, beta = _normal(xp, seed + 1, (d,)), _normal(xp, seed + 2, (d,))
    xn, gn, bn = _np(x), _np(gamma), _np(beta)
    mu = xn.mean(axis=-1, keepdims=True)
    var = ((xn - mu) ** 2).mean(axis=-1, keepdims=True)
    want = (xn - mu) / np.sqrt(var + 1e-5) * gn + bn
    np.testing.assert_allclose(_np(cudrop.layer_norm(x, gamma, beta)), want, rtol=1e-10,
                               atol=1e-10)


@given(lead=lead_shapes, d=st.integers(2, 5), seed=seeds, affine=st.booleans())
def test_layer_norm_grad(xp, lead, d, seed, affine):
    x = _normal(xp, seed, lead + (d,))
    if affine:
        check_grad(cudrop.layer_norm, x, _normal(xp, seed + 1, (d,)),
                   _normal(xp, seed + 2, (d,)), seed=seed)
    else:
        check_grad(lambda x: cudrop.layer_norm(x, None, None), x, seed=seed)


def test_layer_norm_float16(xp):
    x = _normal(xp, 1, (5, 16), loc=20.0)
    y, _ = Fnorm.layer_norm(x.astype(np.float16), None, None)
    assert y.dtype == np.float16
    want, _ = Fnorm.layer_norm(x, None, None)
    np.testing.assert_allclose(_np(y).astype(np.float64), _np(want), atol=0.05)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("shape, affine", [((7, 1), True), ((3, 5, 33), False),
                                           ((4, 1031), True), ((4096 * 8 + 3, 4), True)])
def test_layer_norm_pair_matches_float64(xp, dtype, shape, affine):
    """The pair (lastaxis.cu's warp per row on the GPU: rows shorter and longer than a warp,
    more rows than the grid's warps) against float64 math on the same rounded inputs, every
    output poisoned first; y and gx keep x's dtype."""
    dt = low_precision_dtype(xp, dtype)
    rng = np.random.default_rng(shape[-1])
    x = xp.asarray((2 * rng.standard_normal(shape) + 1).astype(np.float32)).astype(dt)
    g = xp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dt)
    d = shape[-1]
    gamma = xp.asarray(rng.standard_normal(d).astype(np.float32)).astype(dt) if affine else None
    beta = xp.asarray(rng.standard_normal(d).astype(np.float32)).astype(dt) if affine else None
    x64, g64 = _np(x).astype(np.float64), _np(g).astype(np.float64)
    gm = _np(gamma).astype(np.float64) if affine else np.ones(d)
    bt = _np(beta).astype(np.float64) if affine else np.zeros(d)
    mu = x64.mean(-1, keepdims=True)
    inv = 1 / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    xhat = (x64 - mu) * inv
    gxhat = g64 * gm
    want = {"y": xhat * gm + bt,
            "gx": inv * (gxhat - gxhat.mean(-1, keepdims=True)
                         - xhat * (gxhat * xhat).mean(-1, keepdims=True)),
            "ggamma": (g64 * xhat).reshape(-1, d).sum(0), "gbeta": g64.reshape(-1, d).sum(0)}
    poison_pool(xp)
    y, saved = Fnorm.layer_norm(x, gamma, beta)
    poison_pool(xp)
    gx, ggamma, gbeta = Fnorm.layer_norm_backward(g, saved)
    got = {"y": y, "gx": gx, "ggamma": ggamma, "gbeta": gbeta}
    tol = {"float16": 1e-2, "bfloat16": 4e-2, "float32": 1e-5, "float64": 1e-10}[dtype]
    for name, ref in want.items():
        if not affine and name in ("ggamma", "gbeta"):
            assert got[name] is None
            continue
        assert got[name].dtype == dt, name
        np.testing.assert_allclose(_np(got[name]).astype(np.float64), ref, rtol=tol,
                                   atol=tol * np.abs(ref).max(), err_msg=name)


# ---- losses -------------------------------------------------------------------------------

def _ce_case(xp, lead, c, seed):
    logits = _normal(xp, seed, lead + (c,), scale=3.0)
    targets = xp.asarray(np.random.default_rng(seed + 1).integers(0, c, lead))
    return logits, targets


@given(lead=lead_shapes, c=st.integers(1, 5), seed=seeds)
def test_cross_entropy_forward(xp, lead, c, seed):
    logits, targets = _ce_case(xp, lead, c, seed)
    z, t = _np(logits), _np(targets)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    want = np.empty(lead)
    for idx in np.ndindex(*lead):
        want[idx] = -np.log(p[idx][t[idx]])
    for reduction, ref in (("none", want), ("sum", want.sum()), ("mean", want.mean())):
        got = cudrop.cross_entropy(logits, targets, reduction=reduction)
        assert got.shape == np.shape(ref)
        np.testing.assert_allclose(_np(got), ref, rtol=1e-10, atol=1e-12)


def test_cross_entropy_is_stable_for_huge_logits(xp):
    logits = xp.asarray([[1000.0, 0.0, -1000.0], [0.0, 1e4, 0.0]])
    targets = xp.asarray([0, 0])
    got = _np(cudrop.cross_entropy(logits, cudrop.tensor(targets), reduction="none"))
    np.testing.assert_allclose(got, [0.0, 1e4])


@given(lead=lead_shapes, c=st.integers(1, 5), seed=seeds,
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_cross_entropy_grad(xp, lead, c, seed, reduction):
    logits, targets = _ce_case(xp, lead, c, seed)
    check_grad(lambda z: cudrop.cross_entropy(z, targets, reduction=reduction), logits,
               seed=seed)


@given(shape=lead_shapes, seed=seeds, reduction=st.sampled_from(["mean", "sum", "none"]))
def test_mse_loss(xp, shape, seed, reduction):
    pred, target = _normal(xp, seed, shape), _normal(xp, seed + 1, shape)
    sq = (_np(pred) - _np(target)) ** 2
    want = {"none": sq, "sum": sq.sum(), "mean": sq.mean()}[reduction]
    got = cudrop.mse_loss(pred, target, reduction=reduction)
    np.testing.assert_allclose(_np(got), want, rtol=1e-12)
    check_grad(lambda a, b: cudrop.mse_loss(a, b, reduction=reduction), pred, target, seed=seed)


# ---- embedding ----------------------------------------------------------------------------

@given(v=st.integers(1, 4), d=st.integers(1, 3), idx_shape=st.lists(st.integers(1, 4),
                                                                        max_size=3).map(tuple),
       seed=seeds)
def test_embedding_forward_and_grad(xp, v, d, idx_shape, seed):
    weight = _normal(xp, seed, (v, d))
    idx = np.random.default_rng(seed + 1).integers(0, v, idx_shape)
    indices = xp.asarray(idx)
    got = cudrop.embedding(indices, weight)
    np.testing.assert_array_equal(_np(got), _np(weight)[idx])
    check_grad(lambda w: cudrop.embedding(indices, w), weight, seed=seed)


def test_embedding_repeated_indices_accumulate(xp):
    weight = cudrop.Tensor(_normal(xp, 0, (4, 2)), requires_grad=True)
    indices = xp.asarray([[1, 1, 3], [1, 0, 3]])
    out = cudrop.embedding(cudrop.tensor(indices), weight)
    g = np.arange(12, dtype=np.float64).reshape(2, 3, 2)
    out.backward(xp.asarray(g))
    want = np.zeros((4, 2))
    np.add.at(want, _np(indices).ravel(), g.reshape(-1, 2))
    np.testing.assert_array_equal(_np(weight.grad), want)
    assert want[1].tolist() == [0 + 2 + 6, 1 + 3 + 7]
    check_grad(lambda w: cudrop.embedding(indices, w), _normal(xp, 1, (4, 2)))


# ---- bad inputs name the argument ---------------------------------------------------------

def test_batch_norm_bad_inputs(xp):
    x, gamma, beta, rm, rv = _bn_params(xp, 0, (4, 3, 2))
    with pytest.raises(ValueError, match="gamma"):
        cudrop.batch_norm(x, gamma[:2], beta, rm, rv, training=True)
    with pytest.raises(ValueError, match="beta"):
        cudrop.batch_norm(x, gamma, xp.zeros(4), rm, rv, training=True)
    with pytest.raises(ValueError, match="running_mean"):
        cudrop.batch_norm(x, gamma, beta, rm[:1], rv, training=False)
    with pytest.raises(ValueError, match="running_var"):
        cudrop.batch_norm(x, gamma, beta, rm, xp.ones((3, 1)), training=True)
    with pytest.raises(ValueError, match="x"):
        cudrop.batch_norm(x[0, 0], gamma[:1], beta[:1], rm[:1], rv[:1], training=True)
    with pytest.raises(ValueError, match="momentum"):
        cudrop.batch_norm(x, gamma, beta, rm, rv, training=True, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        cudrop.batch_norm(x, gamma, beta, rm, rv, eps=0, training=True)
    with pytest.raises(ValueError, match="one value per channel"):
        cudrop.batch_norm(x[:1, :, :1], gamma, beta, rm, rv, training=True)
    with pytest.raises(TypeError, match="x"):
        cudrop.batch_norm(xp.ones((4, 3), dtype=np.int64), gamma, beta, rm, rv, training=True)
    with pytest.raises(ValueError, match="running_mean"):
        cudrop.batch_norm(x, gamma, beta, None, None, training=False)


def test_layer_norm_bad_inputs(xp):
    x = _normal(xp, 0, (2, 4))
    with pytest.raises(ValueError, match="gamma"):
        cudrop.layer_norm(x, xp.ones(3), xp.zeros(4))
    with pytest.raises(ValueError, match="beta"):
        cudrop.layer_norm(x, xp.ones(4), xp.zeros((1, 4)))
    with pytest.raises(ValueError, match="eps"):
        cudrop.layer_norm(x, None, None, eps=-1.0)


def test_cross_entropy_bad_inputs(xp):
    logits = _normal(xp, 0, (2, 3, 4))
    good = xp.zeros((2, 3), dtype=np.int64)
    with pytest.raises(TypeError, match="targets"):
        cudrop.cross_entropy(logits, good.astype(np.float64))
    with pytest.raises(TypeError, match="targets"):
        cudrop.cross_entropy(logits, good.astype(bool))
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 3\)"):
        cudrop.cross_entropy(logits, xp.zeros((2,), dtype=np.int64))
    raises_at_check(xp, r"cross_entropy: targets\[0, 0\] = 4 is outside \[0, 4\)",
                    lambda: cudrop.cross_entropy(logits, good + 4))
    raises_at_check(xp, r"cross_entropy: targets\[0, 0\] = -1 is outside \[0, 4\)",
                    lambda: cudrop.cross_entropy(logits, good - 1))
    with pytest.raises(ValueError, match="reduction"):
        cudrop.cross_entropy(logits, good, reduction="avg")
    with pytest.raises(TypeError, match="logits"):
        Floss.cross_entropy(good, good[:, 0])


def test_mse_and_embedding_bad_inputs(xp):
    a = _normal(xp, 0, (3, 2))
    with pytest.raises(ValueError, match="target"):
        cudrop.mse_loss(a, a[:, :1])
    with pytest.raises(ValueError, match="reduction"):
        cudrop.mse_loss(a, a, reduction="max")
    with pytest.raises(TypeError, match="target"):
        Floss.mse_loss(a, xp.ones((3, 2), dtype=np.int32))
    w = _normal(xp, 1, (5, 3))
    with pytest.raises(TypeError, match="indices"):
        cudrop.embedding(xp.asarray([0.0, 1.0]), w)
    raises_at_check(xp, r"embedding: indices\[0, 1\] = 5 is outside \[0, 5\)",
                    lambda: cudrop.embedding(xp.asarray([[0, 5]]), w))
    raises_at_check(xp, r"embedding: indices\[0\] = -2 is outside \[0, 5\)",
                    lambda: Femb.embedding(xp.asarray([-2, 1]), w))
    with pytest.raises(ValueError, match="weight has 0 rows"):
        cudrop.embedding(xp.asarray([0]), w[:0])
    with pytest.raises(ValueError, match="weight"):
        cudrop.embedding(xp.asarray([0]), w[0])


def test_losses_and_embedding_are_scalars_that_backpropagate(xp):
    logits = cudrop.Tensor(_normal(xp, 0, (4, 3)), requires_grad=True)
    loss = cudrop.cross_entropy(logits, xp.asarray([0, 1, 2, 1]))
    assert loss.shape == ()
    loss.backward()
    p = np.exp(_np(logits)) / np.exp(_np(logits)).sum(-1, keepdims=True)
    onehot = np.eye(3)[[0, 1, 2, 1]]
    np.testing.assert_allclose(_np(logits.grad), (p - onehot) / 4, rtol=1e-12)


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_kernels_match_the_array_path(xp, training, affine, act):
    """The path is chosen by calling it, not by a module switch: on CuPy ``batch_norm`` runs the
    kernels and ``_batch_norm_arrays`` the array ops; backward follows its ``saved``."""
    rng = np.random.default_rng(3)
    x = xp.asarray(rng.normal(0.5, 2.0, (6, 3, 5, 4)))
    gamma, beta = (xp.asarray(rng.standard_normal(3)) for _ in range(2))
    if not affine:
        gamma = beta = None
    g = xp.asarray(rng.standard_normal(x.shape))
    results = []
    for fwd in (Fnorm.batch_norm, Fnorm._batch_norm_arrays):
        rm, rv = xp.zeros(3), xp.ones(3)
        y, saved = fwd(x, gamma, beta, rm, rv, training, momentum=0.3, act=act)
        assert isinstance(saved, Fnorm.BatchNormSaved)
        grads = Fnorm.batch_norm_backward(g, saved)
        assert len(grads) == 3 and (grads[1] is None) == (grads[2] is None) == (not affine)
        results.append((y, rm, rv) + grads)
    for name, a, ref in zip(("y", "rm", "rv", "gx", "ggamma", "gbeta"), *results):
        if ref is not None:
            assert _relerr(a, _np(ref)) < 1e-12, name


# Ragged (N, C, ...) shapes for the fused ReLU: odd channel counts, N = 1 (eval only where there
# is one value per channel), one value per (n, c) (HW = 1), (N, C) input, and the ResNet-56
# shortcut shape of the second stage.
BN_RELU_SHAPES = [(3, 5, 7, 3), (1, 3, 4, 5), (1, 7, 1, 1), (9, 11, 1, 1), (5, 1), (2, 3),
                  (16, 32, 16, 16)]


@pytest.mark.parametrize("shape", BN_RELU_SHAPES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("split", [None, 3])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_relu_is_relu_of_batch_norm(xp, monkeypatch, shape, dtype, split, training,
                                               affine):
    """``batch_norm(..., act='relu')`` gives exactly what ``relu`` after ``batch_norm`` gives
    (the two ops on the same path): output, running statistics and the three gradients, bit for
    bit (the fused kernels recompute the forward's value for the mask, rounded as it was
    stored), every output allocated from a NaN-poisoned pool. ``split`` 3 forces the reductions'
    split over S = min(3, N) CTAs per channel (merged by bn_fwd and bn_bwd_apply)."""
    from cudrop.functional import _act
    if xp is np and split is not None:
        pytest.skip("the split exists only on the GPU kernels' path")
    if training and shape[0] * int(np.prod(shape[2:])) < 2:
        pytest.skip("batch_norm in training needs more than one value per channel")
    if split is not None:
        monkeypatch.setattr(Fnorm, "_bn_split", lambda nb, c: min(split, nb))
    dt = low_precision_dtype(xp, dtype)
    rng = np.random.default_rng(shape[1] * 100 + shape[0])
    c = shape[1]
    # beta near 0 and gamma of both signs: about half the outputs are cut by the ReLU
    x = xp.asarray(rng.normal(0.3, 1.5, shape).astype(np.float32)).astype(dt)
    g = xp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dt)
    gamma = xp.asarray(rng.normal(0.0, 1.0, c).astype(np.float32)).astype(dt) if affine else None
    beta = xp.asarray(rng.normal(0.0, 0.3, c).astype(np.float32)).astype(dt) if affine else None
    rm0, rv0 = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    runs = []
    for fused in (True, False):
        rm, rv = xp.asarray(rm0), xp.asarray(rv0)
        poison_pool(xp)
        if fused:
            y, saved = Fnorm.batch_norm(x, gamma, beta, rm, rv, training, act="relu")
            poison_pool(xp)
            grads = Fnorm.batch_norm_backward(g, saved)
        else:
            z, saved = Fnorm.batch_norm(x, gamma, beta, rm, rv, training)
            y, rsaved = _act.relu(z)
            poison_pool(xp)
            grads = Fnorm.batch_norm_backward(_act.relu_backward(g, rsaved), saved)
        runs.append([None if a is None else _np(a) for a in (y, rm, rv) + grads])
    y = runs[0][0]
    assert y.dtype == dt and (y > 0).any() and (y == 0).any()
    for name, a, b in zip(("y", "running_mean", "running_var", "gx", "ggamma", "gbeta"), *runs):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
        assert not np.isnan(a.astype(np.float32)).any(), name


def test_batch_norm_act_is_checked(xp):
    x, gamma, beta, rm, rv = _bn_params(xp, 0, (4, 3, 2))
    with pytest.raises(ValueError, match="act"):
        cudrop.batch_norm(x, gamma, beta, rm, rv, training=True, act="gelu")
    with pytest.raises(ValueError, match="act"):
        cudrop.nn.BatchNorm2d(3, act="tanh")


def test_batch_norm_layer_fuses_relu(xp):
    """``BatchNorm2d(c, act='relu')`` is ``BatchNorm2d(c)`` then ``ReLU()``: same output,
    running statistics and gradients, in training and eval; same parameter and buffer names."""
    dev = "gpu" if xp is not np else "cpu"
    fused = cudrop.nn.BatchNorm2d(3, act="relu").to(dev, dtype=np.float64)
    plain = cudrop.nn.BatchNorm2d(3).to(dev, dtype=np.float64)
    assert "act='relu'" in repr(fused) and "act" not in repr(plain)
    assert list(fused.state_dict()) == list(plain.state_dict())
    rng = np.random.default_rng(7)
    for m in (fused, plain):
        m.weight.data = xp.asarray(rng.normal(0.0, 1.0, 3)) if m is fused else fused.weight.data
        m.bias.data = xp.asarray(rng.normal(0.0, 0.5, 3)) if m is fused else fused.bias.data
    x = xp.asarray(rng.standard_normal((4, 3, 5, 5)))
    g = xp.asarray(rng.standard_normal(x.shape))
    for training in (True, False):
        outs = []
        for m, after in ((fused, lambda y: y), (plain, cudrop.relu)):
            m.train(training)
            m.zero_grad()
            xt = cudrop.Tensor(x, requires_grad=True)
            y = after(m(xt))
            y.backward(g)
            outs.append([_np(a) for a in (y.data, xt.grad, m.weight.grad, m.bias.grad,
                                          m.running_mean, m.running_var)])
        for a, b in zip(*outs):
            np.testing.assert_array_equal(a, b)


def test_saved_are_named_tuples_and_backward_follows_the_convention(xp):
    """One gradient per array input of the forward, in its order: None for the integer
    indices/targets; a tuple for several inputs."""
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((4, 5)))
    y, saved = Fnorm.layer_norm(x, None, xp.ones(5))
    assert isinstance(saved, Fnorm.LayerNormSaved)
    gx, ggamma, gbeta = Fnorm.layer_norm_backward(xp.ones_like(y), saved)
    assert ggamma is None and gx.shape == x.shape and gbeta.shape == (5,)
    idx = xp.asarray(np.array([[0, 2], [2, 1]]))
    out, saved = Femb.embedding(idx, x)
    assert isinstance(saved, Femb.EmbeddingSaved)
    gidx, gw = Femb.embedding_backward(xp.ones_like(out), saved)
    assert gidx is None and gw.shape == x.shape
    targets = xp.asarray(np.array([0, 4, 1, 2]))
    loss, saved = Floss.cross_entropy(x, targets)
    assert isinstance(saved, Floss.CrossEntropySaved)
    glogits, gtargets = Floss.cross_entropy_backward(xp.ones_like(loss), saved)
    assert gtargets is None and glogits.shape == x.shape
    loss, saved = Floss.mse_loss(x, x * 0.5)
    assert isinstance(saved, Floss.MseLossSaved)
    gp, gt = Floss.mse_loss_backward(xp.ones_like(loss), saved)
    assert gp.shape == gt.shape == x.shape
