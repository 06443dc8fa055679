"""Optimizers against their update rules written out here in NumPy, schedules against closed
forms, gradient clipping, checkpoint round trips and hyperparameter validation."""
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra.numpy import array_shapes

from conftest import host_harness
from cudrop import backend, raw_kernels
from cudrop.autograd import Tensor
from cudrop.optim import optimizer as opt_mod
from cudrop.optim import (SGD, Adam, AdamW, CosineLR, LinearWarmup, RMSprop, StepLR,
                          clip_grad_norm)

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
shapes = array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5)
unit = st.floats(0.0, 0.99)
lrs = st.floats(1e-4, 0.5)
wds = st.sampled_from([0.0, 0.0, 1e-3, 0.1])


# ---- reference update rules (NumPy, float64, written independently) ----------------------
def ref_sgd(p, grads, lr, momentum, nesterov, wd):
    p, buf = p.copy(), None
    for g in grads:
        d = g + wd * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
    return p


def ref_adam(p, grads, lr, b1, b2, eps, wd, decoupled):
    p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        if decoupled:
            p = p - lr * wd * p
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
    return p


def ref_rmsprop(p, grads, lr, alpha, eps, momentum, wd):
    p, s, b = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for g in grads:
        g = g + wd * p
        s = alpha * s + (1 - alpha) * g ** 2
        d = g / (np.sqrt(s) + eps)
        if momentum:
            b = momentum * b + d
            d = b
        p = p - lr * d
    return p


def run(opt_cls, xp, p0, grads, **kw):
    p = Tensor(xp.array(p0, copy=True), requires_grad=True)  # the update is in place
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = xp.asarray(g)
        opt.step()
    return backend.asnumpy(p.data)


def draw_problem(data, shape):
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    n = data.draw(st.integers(1, 4), label="steps")
    return rng.standard_normal(shape), [rng.standard_normal(shape) for _ in range(n)]


@fixture_ok
@given(data=st.data(), shape=shapes, lr=lrs, mu=unit, nesterov=st.booleans(), wd=wds)
def test_sgd_matches_formula(xp, data, shape, lr, mu, nesterov, wd):
    nesterov = nesterov and mu > 0
    p0, grads = draw_problem(data, shape)
    got = run(SGD, xp, p0, grads, lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd)
    np.testing.assert_allclose(got, ref_sgd(p0, grads, lr, mu, nesterov, wd), rtol=1e-10,
                               atol=1e-12)


@fixture_ok
@given(data=st.data(), shape=shapes, lr=lrs, b1=unit, b2=unit,
       eps=st.sampled_from([1e-8, 1e-3]), wd=wds, decoupled=st.booleans())
def test_adam_and_adamw_match_formula(xp, data, shape, lr, b1, b2, eps, wd, decoupled):
    p0, grads = draw_problem(data, shape)
    cls = AdamW if decoupled else Adam
    got = run(cls, xp, p0, grads, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    np.testing.assert_allclose(got, ref_adam(p0, grads, lr, b1, b2, eps, wd, decoupled),
                               rtol=1e-9, atol=1e-12)


@fixture_ok
@given(data=st.data(), shape=shapes, lr=lrs, alpha=unit, mu=unit,
       eps=st.sampled_from([1e-8, 1e-3]), wd=wds)
def test_rmsprop_matches_formula(xp, data, shape, lr, alpha, mu, eps, wd):
    p0, grads = draw_problem(data, shape)
    got = run(RMSprop, xp, p0, grads, lr=lr, alpha=alpha, eps=eps, momentum=mu,
              weight_decay=wd)
    np.testing.assert_allclose(got, ref_rmsprop(p0, grads, lr, alpha, eps, mu, wd),
                               rtol=1e-9, atol=1e-12)


def test_defaults_are_the_documented_ones():
    p = [Tensor(np.zeros(2))]
    a, w, r = Adam(p), AdamW(p), RMSprop(p)
    assert (a.lr, a.betas, a.eps, a.weight_decay) == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    assert w.weight_decay == 0.01
    assert (r.lr, r.alpha, r.eps, r.momentum) == (1e-2, 0.99, 1e-8, 0.0)


def test_skips_params_without_grad_and_never_writes_grads(xp):
    a = Tensor(xp.ones(3), requires_grad=True)
    b = Tensor(xp.ones(3), requires_grad=True)
    shared = xp.full(3, 2.0)
    a.grad = shared
    opt = Adam([a, b, a], lr=0.1)  # the duplicate is dropped
    assert len(opt.params) == 2
    opt.step()
    np.testing.assert_allclose(backend.asnumpy(b.data), 1.0)
    assert not np.allclose(backend.asnumpy(a.data), 1.0)
    np.testing.assert_array_equal(backend.asnumpy(shared), 2.0)
    assert opt.state[1] == {}
    opt.zero_grad()
    assert a.grad is None and b.grad is None


@pytest.mark.parametrize("cls,kw", [(SGD, dict(lr=0.1, momentum=0.9)), (Adam, {}),
                                    (RMSprop, dict(momentum=0.5))])
def test_half_precision_params_get_float32_state(xp, cls, kw):
    p = Tensor(xp.ones(4, dtype=xp.float16), requires_grad=True)
    p.grad = xp.full(4, 0.5, dtype=xp.float16)
    opt = cls([p], **kw)
    opt.step()
    assert p.data.dtype == xp.float16
    arrays = [v for v in opt.state[0].values() if hasattr(v, "dtype")]
    assert arrays and all(v.dtype == xp.float32 for v in arrays)
    q = Tensor(xp.ones(4, dtype=xp.float32))
    q.grad = xp.full(4, 0.5, dtype=xp.float32)
    cls([q], **kw).step()
    np.testing.assert_allclose(backend.asnumpy(p.data), backend.asnumpy(q.data), rtol=1e-3)


@pytest.mark.parametrize("cls,kw", [
    (SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    (Adam, dict(lr=0.01, weight_decay=1e-3)),
    (AdamW, dict(lr=0.01)),
    (RMSprop, dict(lr=0.01, momentum=0.5)),
])
def test_state_dict_round_trip_resumes_identically(xp, cls, kw):
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal((3, 2)), rng.standard_normal(4)]
    grads = [[rng.standard_normal(a.shape) for a in p0] for _ in range(6)]

    def make():
        ps = [Tensor(xp.array(a, copy=True), requires_grad=True) for a in p0]
        return ps, cls(ps, **kw)

    def steps(ps, opt, gs):
        for g in gs:
            for p, gi in zip(ps, g):
                p.grad = xp.asarray(gi)
            opt.step()

    ps, opt = make()
    steps(ps, opt, grads)
    straight = [backend.asnumpy(p.data) for p in ps]

    ps, opt = make()
    steps(ps, opt, grads[:3])
    sd = opt.state_dict()
    saved = [backend.asnumpy(p.data).copy() for p in ps]
    steps(ps, opt, grads[3:4])  # the snapshot must not move with later steps
    ps2 = [Tensor(xp.asarray(a), requires_grad=True) for a in saved]
    opt2 = cls(ps2, lr=123.0) if cls is SGD else cls(ps2)
    opt2.load_state_dict(sd)
    assert opt2.lr == opt.lr and opt2.steps == 3 and opt2.hyperparams() == opt.hyperparams()
    steps(ps2, opt2, grads[3:])
    for a, b in zip(straight, ps2):
        np.testing.assert_array_equal(a, backend.asnumpy(b.data))


def test_load_state_dict_rejects_mismatches():
    p = Tensor(np.zeros(3))
    p.grad = np.ones(3)
    opt = Adam([p])
    opt.step()
    with pytest.raises(ValueError, match="Adam"):
        SGD([p], lr=0.1).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="shape"):
        Adam([Tensor(np.zeros(4))]).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("make,arg", [
    (lambda p: SGD(p, lr=-1.0), "lr"),
    (lambda p: SGD(p, lr=float("nan")), "lr"),
    (lambda p: SGD(p, lr=0.1, momentum=-0.1), "momentum"),
    (lambda p: SGD(p, lr=0.1, nesterov=True), "nesterov"),
    (lambda p: SGD(p, lr=0.1, weight_decay=-1), "weight_decay"),
    (lambda p: Adam(p, betas=(1.0, 0.9)), r"betas\[0\]"),
    (lambda p: Adam(p, betas=(0.9, -0.1)), r"betas\[1\]"),
    (lambda p: Adam(p, betas=0.9), "betas"),
    (lambda p: AdamW(p, eps=-1e-8), "eps"),
    (lambda p: RMSprop(p, alpha=1.0), "alpha"),
    (lambda p: RMSprop(p, momentum=1.5), "momentum"),
    (lambda p: StepLR(SGD(p, lr=0.1), step_size=0), "step_size"),
    (lambda p: CosineLR(SGD(p, lr=0.1), total_steps=-3), "total_steps"),
    (lambda p: LinearWarmup(SGD(p, lr=0.1), warmup_steps=1.5), "warmup_steps"),
    (lambda p: clip_grad_norm(p, 0.0), "max_norm"),
    (lambda p: SGD([], lr=0.1), "params"),
])
def test_bad_hyperparameters_raise_naming_the_argument(make, arg):
    with pytest.raises(ValueError, match=arg):
        make([Tensor(np.zeros(2))])


def test_bad_params_and_lr_assignment_raise():
    with pytest.raises(TypeError, match=r"params\[0\]"):
        SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(TypeError, match="dtype"):
        SGD([Tensor(np.zeros(2, np.int64))], lr=0.1)
    opt = SGD([Tensor(np.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -0.5


# ---- schedules --------------------------------------------------------------------------
def lr_trace(sched, n):
    out = [sched.optimizer.lr]
    for _ in range(n):
        sched.step()
        assert sched.lr == sched.get_lr() == sched.optimizer.lr
        out.append(sched.optimizer.lr)
    return out


def opt_with(lr):
    return SGD([Tensor(np.zeros(1))], lr=lr)


@given(lr=lrs, step_size=st.integers(1, 5), gamma=st.floats(0.05, 1.0))
def test_step_lr_closed_form(lr, step_size, gamma):
    got = lr_trace(StepLR(opt_with(lr), step_size, gamma), 20)
    np.testing.assert_allclose(got, [lr * gamma ** (t // step_size) for t in range(21)],
                               rtol=1e-12)


@given(lr=lrs, total=st.integers(1, 30), min_frac=st.floats(0.0, 0.5))
def test_cosine_lr_closed_form(lr, total, min_frac):
    lo = lr * min_frac
    got = lr_trace(CosineLR(opt_with(lr), total, min_lr=lo), total + 5)
    want = [lo + (lr - lo) * (1 + math.cos(math.pi * min(t, total) / total)) / 2
            for t in range(total + 6)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert got[0] == pytest.approx(lr) and got[-1] == pytest.approx(lo)


@given(lr=lrs, warm=st.integers(1, 10), total=st.integers(1, 20), chained=st.booleans())
def test_linear_warmup_closed_form(lr, warm, total, chained):
    opt = opt_with(lr)
    after = CosineLR(opt, total) if chained else None
    got = lr_trace(LinearWarmup(opt, warm, after=after), warm + total + 3)
    for t, v in enumerate(got):
        if t < warm:
            want = lr * (t + 1) / warm
        elif chained:
            k = min(t - warm, total)
            want = lr * (1 + math.cos(math.pi * k / total)) / 2
        else:
            want = lr
        assert v == pytest.approx(want, rel=1e-12, abs=1e-15), t
    assert 0 < got[0] <= lr


def test_schedule_state_dict_resumes():
    opt = opt_with(0.1)
    s = LinearWarmup(opt, 3, after=StepLR(opt, 2, 0.5))
    for _ in range(5):
        s.step()
    sd = s.state_dict()
    want = lr_trace(s, 4)
    opt2 = opt_with(7.0)
    s2 = LinearWarmup(opt2, 3, after=StepLR(opt2, 2, 0.5))
    s2.load_state_dict(sd)
    assert lr_trace(s2, 4) == want


# ---- clipping ---------------------------------------------------------------------------
@given(data=st.data(), max_norm=st.floats(0.01, 10.0), scale=st.floats(0.01, 10.0))
def test_clip_grad_norm(data, max_norm, scale):
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    ps = [Tensor(np.zeros(s)) for s in [(3,), (2, 2), (5,)]]
    gs = [scale * rng.standard_normal(p.shape) for p in ps]
    for p, g in zip(ps, gs):
        p.grad = g.copy()
    ps.append(Tensor(np.zeros(2)))  # no grad: ignored
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in gs))
    total = clip_grad_norm(ps, max_norm)
    assert isinstance(total, float) and total == pytest.approx(norm, rel=1e-12)
    coef = min(1.0, max_norm / (norm + 1e-6))
    for p, g in zip(ps, gs):
        np.testing.assert_allclose(p.grad, g * coef, rtol=1e-12)
    after = math.sqrt(sum(float((p.grad ** 2).sum()) for p in ps[:3]))
    assert after <= max_norm * (1 + 1e-9)


def test_clip_grad_norm_devices_shared_grads_and_half(xp):
    shared = xp.full(4, 3.0, dtype=xp.float16)
    a, b = Tensor(xp.zeros(4, dtype=xp.float16)), Tensor(xp.zeros(4, dtype=xp.float16))
    a.grad = b.grad = shared  # autograd hands one array to both inputs of an add
    total = clip_grad_norm([a, b], 1.0)
    assert total == pytest.approx(math.sqrt(8 * 9.0))
    assert a.grad.dtype == xp.float16
    np.testing.assert_allclose(backend.asnumpy(a.grad), 3.0 / total, rtol=1e-3)
    np.testing.assert_allclose(backend.asnumpy(b.grad), 3.0 / total, rtol=1e-3)
    np.testing.assert_array_equal(backend.asnumpy(shared), 3.0)
    c = Tensor(xp.zeros(2))
    c.grad = xp.asarray([float("inf"), 1.0])
    assert math.isinf(clip_grad_norm(c, 1.0))
    assert float(c.grad[1]) == 1.0  # non-finite norm: left alone for the caller to skip


def test_optimizer_trains_a_tiny_regression():
    """End to end with autograd: least squares through matmul converges."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3))
    w_true = np.array([[1.0], [-2.0], [0.5]])
    y = x @ w_true
    w = Tensor(np.zeros((3, 1)), requires_grad=True)
    opt = Adam([w], lr=0.1)
    sched = CosineLR(opt, total_steps=300, min_lr=1e-3)
    for _ in range(300):
        opt.zero_grad()
        r = Tensor(x) @ w - Tensor(y)
        (r * r).mean().backward()
        clip_grad_norm([w], 10.0)
        opt.step()
        sched.step()
    np.testing.assert_allclose(w.data, w_true, atol=1e-2)


@pytest.mark.parametrize("opt_cls", ["sgd", "adam"])
def test_half_precision_parameters_train_through_a_float32_master_copy(xp, opt_cls):
    """Updates below half a float16 ulp accumulate in the float32 master and reach the
    parameter once they add up; the parameter is always the master's rounding."""
    p = Tensor(xp.ones(4, dtype=np.float16))
    opt = SGD([p], lr=1e-4) if opt_cls == "sgd" else Adam([p], lr=1e-4)
    master = np.ones(4, np.float32)
    m = v = np.zeros(4, np.float32)
    for t in range(1, 11):
        p.grad = xp.ones(4, dtype=np.float16)
        opt.step()
        g = np.ones(4, np.float32)
        if opt_cls == "sgd":
            master -= np.float32(1e-4) * g
        else:
            m = np.float32(0.9) * m + np.float32(0.1) * g
            v = np.float32(0.999) * v + np.float32(0.001) * g * g
            denom = np.sqrt(v) / np.float32((1 - 0.999 ** t) ** 0.5) + np.float32(1e-8)
            master -= np.float32(1e-4 / (1 - 0.9 ** t)) * (m / denom)
    state = opt.state[0]
    np.testing.assert_allclose(backend.asnumpy(state["master"]), master, rtol=1e-6)
    np.testing.assert_array_equal(backend.asnumpy(p.data), master.astype(np.float16))
    assert backend.asnumpy(p.data)[0] < 1.0  # without the master copy it would stay at 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not backend.gpu_available(), reason="no usable CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("cls, kw", [
    (SGD, dict(lr=0.1, momentum=0.9)), (SGD, dict(lr=0.05, momentum=0.8, nesterov=True,
                                                  weight_decay=0.01)),
    (SGD, dict(lr=0.1)), (Adam, dict(lr=0.01, weight_decay=0.01)),
    (AdamW, dict(lr=0.01, weight_decay=0.1))])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("offset", [0, 1])
def test_fused_update_is_bit_identical_to_the_unfused_one(dtype, cls, kw, scaled, offset):
    """On CuPy SGD and Adam run fused kernels (raw_kernels/optim.cu); they round
    exactly as the unfused CuPy expressions: parameters, master copies and state bit-identical
    over several steps (odd sizes: the grid-stride tail; ``offset`` 1: parameter and gradients
    are views one element into their arrays, off the 16-byte groups SGD's kernel moves)."""
    from conftest import low_precision_dtype
    cp = backend.cupy
    dt = low_precision_dtype(cp, dtype)
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(1037).astype(np.float32)
    grads = [rng.standard_normal(1037).astype(np.float32) for _ in range(4)]

    def run(fused):
        def placed(a):  # a view `offset` elements into a larger array
            return cp.asarray(np.concatenate([np.zeros(offset, a.dtype), a])).astype(dt)[offset:]
        p = Tensor(placed(p0), requires_grad=True)
        opt = cls([p], **kw)
        if not fused:
            opt._fused_many = None
        inv = cp.asarray(np.float32(1 / 1024)) if scaled else None  # a loss scaler's unscale
        for g in grads:
            p.grad = placed(g * (1024 if scaled else 1))
            opt.step(inv_scale=inv)
        return p.data, opt.state[0]

    (pf, sf), (pu, su) = run(True), run(False)
    assert sf.keys() == su.keys()
    np.testing.assert_array_equal(cp.asnumpy(pf.view(np.uint8)), cp.asnumpy(pu.view(np.uint8)))
    for k, v in su.items():
        if hasattr(v, "shape"):
            np.testing.assert_array_equal(cp.asnumpy(sf[k]), cp.asnumpy(v), err_msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not backend.gpu_available(), reason="no usable CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("cls, kw", [
    (SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (AdamW, dict(lr=0.01, weight_decay=0.1)), (Adam, dict(lr=0.01, weight_decay=0.01))])
def test_fused_updates_of_many_parameters_equal_the_unfused_ones(dtype, cls, kw):
    """The fused kernels over many parameters (up to 48 a launch, one table: optim.cu) equal
    the unfused updates bit for bit: 101 parameters of assorted sizes, views one element off
    SGD's 16-byte groups among them, one larger than a launch's blocks cover in one pass
    (strided through), some without a gradient at the first steps, so that their momentum
    buffers start later (SGD) and their Adam step counts lag (one launch per step count)."""
    from conftest import low_precision_dtype
    cp = backend.cupy
    dt = low_precision_dtype(cp, dtype)
    rng = np.random.default_rng(3)
    sizes = [int(v) for v in rng.integers(1, 3000, 100)] + [9_000_001]
    p0 = [rng.standard_normal(n).astype(np.float32) for n in sizes]

    def run(fused):
        params = []
        for i, a in enumerate(p0):
            off = i % 2  # odd parameters are views one element into their arrays
            params.append(Tensor(cp.asarray(np.concatenate([np.zeros(off, a.dtype), a]))
                                 .astype(dt)[off:], requires_grad=True))
        opt = cls(params, **kw)
        if not fused:
            opt._fused_many = None
        g_rng = np.random.default_rng(4)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = None if (i % 3 == 0 and step < 2) else cp.asarray(
                    g_rng.standard_normal(p.data.size).astype(np.float32)).astype(dt)
            opt.step()
        return params, opt.state

    (pm, sm), (p1, s1) = run(True), run(False)
    for i, (a, b) in enumerate(zip(pm, p1)):
        np.testing.assert_array_equal(cp.asnumpy(a.data.view(np.uint8)),
                                      cp.asnumpy(b.data.view(np.uint8)), err_msg=f"param {i}")
        for k, v in s1[i].items():
            if hasattr(v, "shape"):
                np.testing.assert_array_equal(cp.asnumpy(sm[i][k]), cp.asnumpy(v),
                                              err_msg=f"param {i} {k}")


# ---- loss scaling (float16) -------------------------------------------------------------

host = backend.asnumpy


def _fp16_param(xp, values):
    return Tensor(xp.asarray(np.asarray(values, np.float16)), requires_grad=True)


@pytest.mark.parametrize("cls, kw", [(SGD, dict(lr=0.1, momentum=0.9)), (Adam, dict(lr=0.01)),
                                     (RMSprop, dict(lr=0.01, momentum=0.5))])
def test_step_skip_leaves_parameters_and_state_untouched(xp, cls, kw):
    """``step(skip=flag)``: where the device flag is set nothing changes (the fused kernels on
    the GPU, a put-back for the unfused ones, a plain skip on NumPy); counters still advance."""
    p = Tensor(xp.asarray([1.0, -2.0, 3.0], np.float32), requires_grad=True)
    opt = cls([p], **kw)
    p.grad = xp.asarray([0.5, 0.5, -1.0], np.float32)
    opt.step()
    before = host(p.data).copy()
    state = {k: host(v).copy() for k, v in opt.state[0].items() if hasattr(v, "shape")}
    p.grad = xp.asarray([np.inf, 1.0, 1.0], np.float32)
    opt.step(skip=xp.asarray(1, np.uint64))
    np.testing.assert_array_equal(host(p.data), before)
    for k, v in state.items():
        np.testing.assert_array_equal(host(opt.state[0][k]), v, err_msg=k)
    assert opt.state[0]["step"] == 2 and opt.steps == 2
    p.grad = xp.asarray([1.0, 1.0, 1.0], np.float32)
    opt.step(skip=xp.asarray(0, np.uint64))  # an unset flag updates
    assert not np.array_equal(host(p.data), before)


@pytest.mark.parametrize("cls, kw", [(SGD, dict(lr=0.1, momentum=0.9)), (Adam, dict(lr=0.01))])
def test_first_step_skipped_then_taken_equals_one_step(xp, cls, kw):
    """A skipped first step leaves state that the next step treats as fresh."""
    def run(skip_first):
        p = Tensor(xp.asarray([1.0, -2.0, 3.0], np.float32), requires_grad=True)
        opt = cls([p], **kw)
        if skip_first:
            p.grad = xp.asarray([np.nan, 1.0, 1.0], np.float32)
            opt.step(skip=xp.asarray(1, np.uint64))
        p.grad = xp.asarray([0.5, 0.5, -1.0], np.float32)
        opt.step()
        return host(p.data)
    if cls is Adam:  # Adam's bias correction counts the skipped step: compare SGD only
        return
    np.testing.assert_array_equal(run(True), run(False))


def test_loss_scaler_unscales_skips_overflow_and_adapts(xp):
    """float16 parameters with float32 master weights: the update uses grad / scale; a step
    with an inf gradient is skipped and halves the scale; growth_interval finite steps double
    it."""
    from cudrop.optim import LossScaler
    p = _fp16_param(xp, [1.0, -1.0])
    opt = SGD([p], lr=0.5)
    scaler = LossScaler(init_scale=1024.0, growth_interval=2)

    def step(g):
        p.grad = xp.asarray(np.asarray(g, np.float16))
        scaler.step(opt)
        return host(opt.state[0]["master"]).astype(np.float64), float(host(scaler.scale))

    w, s = step([1024.0, 512.0])  # the true gradient is (1, 0.5)
    np.testing.assert_allclose(w, [0.5, -1.25])
    assert s == 1024.0
    w2, s = step([np.inf, 1.0])  # overflow: skipped, scale halves
    np.testing.assert_array_equal(w2, w)
    assert s == 512.0
    w3, s = step([512.0, 0.0])  # one good step at scale 512: grad (1, 0)
    np.testing.assert_allclose(w3, [0.0, -1.25])
    assert s == 512.0
    _, s = step([0.0, 0.0])  # the second good step in a row: scale doubles
    assert s == 1024.0
    assert scaler.state_dict() == {"scale": 1024.0, "good_steps": 0}


def test_loss_scaler_backward_seeds_with_the_scale_capped_for_float16(xp):
    from cudrop.optim import LossScaler
    x = _fp16_param(xp, [0.25, 0.5])
    loss = (x * x).sum()
    LossScaler(init_scale=2.0 ** 20).backward(loss)  # float16 holds 2**15 at most
    np.testing.assert_array_equal(host(x.grad).astype(np.float64), [2.0 ** 14, 2.0 ** 15])


def test_loss_scaler_checks_its_arguments():
    from cudrop.optim import LossScaler
    with pytest.raises(ValueError, match="init_scale must be > 0"):
        LossScaler(init_scale=0)
    with pytest.raises(ValueError, match="backoff_factor must be in"):
        LossScaler(backoff_factor=1.5)
    with pytest.raises(ValueError, match="growth_interval must be a positive int"):
        LossScaler(growth_interval=0)


def test_loss_scaler_state_round_trip(xp):
    from cudrop.optim import LossScaler
    a = LossScaler(init_scale=256.0, growth_interval=3)
    p = _fp16_param(xp, [1.0])
    opt = SGD([p], lr=0.1)
    p.grad = xp.asarray(np.asarray([np.inf], np.float16))
    a.step(opt)
    p.grad = xp.asarray(np.asarray([1.0], np.float16))
    a.step(opt)
    sd = a.state_dict()
    assert sd == {"scale": 128.0, "good_steps": 1}
    b = LossScaler(growth_interval=3)
    b.load_state_dict(sd)
    assert b.state_dict() == sd
    for s in (a, b):  # two more good steps: both grow at the same step
        for _ in range(2):
            p.grad = xp.asarray(np.asarray([1.0], np.float16))
            s.step(opt)
    assert a.state_dict() == b.state_dict() == {"scale": 256.0, "good_steps": 0}


def test_the_fused_kernels_table_matches_optim_cu_s_struct(tmp_path_factory):
    """optimizer._TABLE mirrors optim.cu's cd_multi_table, which a launch passes by value as a
    NumPy structured scalar: every field's offset and the size are those the C++ compiler lays
    out (compiled on the host from the struct's own text), and the struct fits the 4 KB of
    kernel parameters."""
    src = raw_kernels.source("optim.cu")
    struct = re.search(r"struct cd_multi_table \{.*?\};", src, re.S).group(0)
    multi = re.search(r"#define CD_MULTI (\d+)", src).group(1)
    fields = opt_mod._TABLE.names
    run = host_harness(tmp_path_factory, "optim_table", "\n".join([
        "#include <cstddef>", "#include <cstdio>", f"#define CD_MULTI {multi}", struct,
        "int main() {",
        *[f'    std::printf("{f} %zu\\n", offsetof(cd_multi_table, {f}));' for f in fields],
        '    std::printf("size %zu\\n", sizeof(cd_multi_table));', "}"]))
    laid = dict(line.split() for line in run([]).splitlines())
    assert int(multi) == opt_mod.MULTI
    for f in fields:
        assert int(laid[f]) == opt_mod._TABLE.fields[f][1], f
    assert int(laid["size"]) == opt_mod._TABLE.itemsize < 4096 - 64
