"""Depth dropout and stochastic depth: skipped bodies, scaling, determinism, per-sample mode."""
import copy

import numpy as np
import pytest
from hypothesis import given, strategies as st

import cudrop as cd
from cudrop import backend, models, nn, philox
from cudrop.autograd import check_grad
from cudrop.functional import _rows as F
from cudrop.nn.depth import (DepthDropout, StochasticDepth, conv_shortcut, linear_shortcut,
                             stochastic_depth_probs)
from cudrop.nn.module import Module
from cudrop.nn.stochastic import set_step

KINDS = [DepthDropout, StochasticDepth]


class Recorder(Module):
    """Wraps a body: counts calls and records the input rows it saw."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = []

    def forward(self, x):
        self.seen.append(backend.asnumpy(x.data).copy())
        return self.inner(x)


class TanhLinear(Module):
    """tanh(x @ w) with ``w`` a plain attribute, so check_grad can hand in the weight."""

    def __init__(self, w):
        super().__init__()
        object.__setattr__(self, "w", w)

    def forward(self, x):
        return cd.tanh(x @ self.w)


def _dev(xp):
    return "cpu" if xp is np else "gpu"


def _mlp_unit(cls, xp, p, mode="batch", seed=3, layer=7, width=5, bn=False):
    body = nn.Sequential(nn.Linear(width, width, rng=1), nn.Tanh(),
                         *( [nn.BatchNorm1d(width)] if bn else []),
                         nn.Linear(width, width, rng=2))
    short = linear_shortcut(width, width, rng=4) if cls is DepthDropout else None
    u = cls(Recorder(body), short, p, nn.ReLU(), mode=mode, seed=seed, layer=layer)
    return u.to(_dev(xp), dtype=np.float64)


def _x(xp, n=6, width=5, seed=0):
    return cd.Tensor(xp.asarray(np.random.default_rng(seed).standard_normal((n, width))))


def _step_with(unit, want, start=0):
    """The first step >= start whose batch gate equals ``want``."""
    s = start
    while unit.keep_gate(s) != want:
        s += 1
    return s


def _np(t):
    return backend.asnumpy(t.data if isinstance(t, cd.Tensor) else t)


# ---- forward equals the dense formula --------------------------------------------------------

@pytest.mark.parametrize("cls", KINDS)
def test_batch_forward_matches_formula(xp, cls):
    u = _mlp_unit(cls, xp, p=0.5)
    x = _x(xp)
    for step in range(12):
        a = philox.uniform(u.seed, u.layer, step, philox.TAG_DEPTH, 1)[0] >= u.p
        assert u.step == step
        y = u(x)
        with cd.no_grad():
            f = u.body.inner(x).data
            t = u.shortcut(x).data
        scale = 1 / (1 - u.p) if cls is StochasticDepth else 1.0
        ref = np.maximum(_np(t) + a * scale * _np(f), 0)
        assert np.allclose(_np(y), ref, rtol=1e-12, atol=1e-12)
    assert u.step == 12


@pytest.mark.parametrize("cls", KINDS)
def test_eval_keeps_every_body_unscaled_and_does_not_advance(xp, cls):
    u = _mlp_unit(cls, xp, p=0.75)
    x = _x(xp)
    u.eval()
    for _ in range(5):
        y = u(x)
    assert len(u.body.seen) == 5 and u.step == 0
    ref = np.maximum(_np(u.body.inner(x)) + _np(u.shortcut(x)), 0)
    assert np.allclose(_np(y), ref)
    u.train()
    with cd.eval_mode():  # the global switch alone also means test time
        u(x)
    assert len(u.body.seen) == 6 and u.step == 0


def test_is_a_residual_unit_and_a_stochastic_layer():
    u = StochasticDepth(nn.Linear(3, 3), None, 0.2, seed=1, layer=2)
    assert isinstance(u, nn.ResidualUnit) and isinstance(u, nn.stochastic.StochasticLayer)
    assert isinstance(u.shortcut, nn.Identity) and isinstance(u.activation, nn.Identity)
    assert "p=0.2" in repr(u) and "layer=2" in repr(u)
    assert [n for n, _ in u.named_parameters()] == ["body.weight", "body.bias"]
    assert u.scale == pytest.approx(1 / 0.8)
    assert DepthDropout(nn.Linear(3, 3), None, 0.2).scale == 1.0


# ---- skipping --------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", KINDS)
def test_dropped_body_is_not_called_and_gets_no_gradient(xp, cls):
    u = _mlp_unit(cls, xp, p=0.5)
    if cls is StochasticDepth:  # identity shortcut has nothing to train; give it a Linear
        u.shortcut = linear_shortcut(5, 5, rng=4).to(_dev(xp), dtype=np.float64)
    set_step(u, _step_with(u, False))
    x = _x(xp)
    y = u(x)
    y.backward(xp.ones(y.shape))
    assert u.body.seen == []
    assert all(p.grad is None for p in u.body.parameters())
    assert all(p.grad is not None for p in u.shortcut.parameters())
    ref = np.maximum(_np(u.shortcut(x)), 0)
    assert np.allclose(_np(y), ref)
    # kept: both paths get gradients
    u.zero_grad()
    set_step(u, _step_with(u, True))
    y = u(x)
    y.backward(xp.ones(y.shape))
    assert len(u.body.seen) == 1
    assert all(p.grad is not None for p in u.parameters())


# ---- gradients -------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", KINDS)
@pytest.mark.parametrize("kept", [True, False])
def test_batch_gradients(xp, cls, kept):
    rng = np.random.default_rng(1)
    probe = cls(nn.Identity(), None, 0.5, seed=5, layer=9)
    step = _step_with(probe, kept)

    def fn(x, wf, wt):
        u = cls(TanhLinear(wf), TanhLinear(wt), 0.5, nn.Tanh(), seed=5, layer=9)
        set_step(u, step)
        return u(x)

    x, wf, wt = (xp.asarray(rng.standard_normal(s)) for s in [(4, 3), (3, 3), (3, 3)])
    check_grad(fn, x, wf, wt)


@pytest.mark.parametrize("cls", KINDS)
@pytest.mark.parametrize("bn", [False, True])
def test_sample_mode_gradients(xp, cls, bn):
    rng = np.random.default_rng(2)
    u = _mlp_unit(cls, xp, p=0.5, mode="sample", bn=bn)
    # a step where some, not all, samples are kept (>= 3: BatchNorm over two rows is +-1,
    # whose gradient vanishes and would hide a wrong one)
    step = next(s for s in range(100) if 3 <= u.keep_samples(s, 6).sum() < 6)

    def fn(x, wf, wt):
        object.__setattr__(u, "step", step)
        u.body = TanhLinear(wf)
        if bn:
            u.body = nn.Sequential(u.body, nn.BatchNorm1d(3).to(_dev(xp), dtype=np.float64))
        u.shortcut = TanhLinear(wt)
        return u(x)

    x, wf, wt = (xp.asarray(rng.standard_normal(s)) for s in [(6, 3), (3, 3), (3, 3)])
    check_grad(fn, x, wf, wt)


# ---- keep rates, decay, down-sampling ----------------------------------------------------------

@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_keep_rate_within_binomial_bounds(mode):
    p, steps, n = 0.3, 2000, 4
    u = StochasticDepth(nn.Identity(), None, p, mode=mode, seed=11, layer=1)
    if mode == "batch":
        kept, trials = sum(u.keep_gate(s) for s in range(steps)), steps
    else:
        kept, trials = sum(int(u.keep_samples(s, n).sum()) for s in range(steps)), steps * n
    q = 1 - p
    assert abs(kept - q * trials) < 5 * np.sqrt(trials * p * q)


def test_body_calls_follow_the_gate():
    u = DepthDropout(Recorder(nn.Identity()), None, 0.6, seed=2, layer=4)
    x = cd.Tensor(np.ones((2, 3)))
    for _ in range(200):
        u(x)
    assert len(u.body.seen) == sum(u.keep_gate(s) for s in range(200))


def test_stochastic_depth_probabilities_decay_linearly():
    assert stochastic_depth_probs(4, 0.5) == pytest.approx([0.125, 0.25, 0.375, 0.5])
    m = models.resnet20(in_channels=1, stochastic_depth=0.5, keep_downsampling=False)
    ps = np.array([u.p for u in m.units])
    L = len(ps)
    assert L == 9 and all(isinstance(u, StochasticDepth) for u in m.units)
    assert np.allclose(ps, 0.5 * np.arange(1, L + 1) / L)
    assert np.allclose(np.diff(ps), 0.5 / L) and ps[-1] == pytest.approx(0.5)
    # keep_downsampling: stride-2 units never drop, the others keep their place in the decay
    m = models.resnet56(in_channels=1, stochastic_depth=0.5)
    L = len(m.units)
    for l, u in enumerate(m.units, 1):
        assert u.p == (0.0 if u.downsamples else pytest.approx(0.5 * l / L))
    assert sum(u.downsamples for u in m.units) == 2


def test_depth_dropout_units_and_downsampling_never_dropped():
    m = models.ResNet(8, num_classes=3, in_channels=1, widths=(2, 3, 3), depth_dropout=0.75)
    assert all(isinstance(u, DepthDropout) for u in m.units)
    for u in m.units:
        assert u.p == (0.0 if u.downsamples else 0.75)
        # t = 1x1 conv + BN + ReLU with the unit's stride, the ReLU fused into the BN (an
        # Identity keeps the separate ReLU's place)
        conv, bn, relu = u.shortcut
        assert conv.kernel_size == (1, 1) and conv.stride == (2 if u.downsamples else 1)
        assert isinstance(bn, nn.BatchNorm2d) and bn.act == "relu"
        assert isinstance(relu, nn.Identity)
        u.body = Recorder(u.body)
    x = cd.Tensor(np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(np.float32))
    for _ in range(12):
        m(x)
    calls = [len(u.body.seen) for u in m.units]
    assert [c for c, u in zip(calls, m.units) if u.downsamples] == [12, 12]
    assert calls[0] == sum(m.units[0].keep_gate(s) for s in range(12)) < 12
    m2 = models.ResNet(8, in_channels=1, depth_dropout=0.75, keep_downsampling=False)
    assert [u.p for u in m2.units] == [0.75] * 3


# ---- determinism and resume ------------------------------------------------------------------

def _decisions(unit, x, steps):
    start = len(unit.body.seen)
    out = []
    for _ in range(steps):
        unit(x)
        out.append(len(unit.body.seen) > start)
        start = len(unit.body.seen)
    return out


def test_same_seed_layer_step_same_decision():
    x = cd.Tensor(np.ones((2, 3)))
    a = DepthDropout(Recorder(nn.Identity()), None, 0.5, seed=8, layer=3)
    b = DepthDropout(Recorder(nn.Identity()), None, 0.5, seed=8, layer=3)
    c = DepthDropout(Recorder(nn.Identity()), None, 0.5, seed=8, layer=4)
    da, db, dc = (_decisions(u, x, 40) for u in (a, b, c))
    assert da == db and da != dc
    assert da == [a.keep_gate(s) for s in range(40)]


@pytest.mark.parametrize("kw", [dict(depth_dropout=0.5), dict(stochastic_depth=0.6),
                                dict(stochastic_depth=0.6, stochastic_depth_mode="sample")])
def test_state_dict_round_trip_resumes_decisions(kw):
    def build():
        m = models.ResNet(8, num_classes=3, in_channels=1, widths=(2, 2, 2), seed=4,
                          keep_downsampling=False, **kw)
        for u in m.units:
            u.body = Recorder(u.body)
        return m

    # 8x8 so that one kept sample still gives BatchNorm several values per channel
    x = cd.Tensor(np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32))
    a = build()
    for _ in range(3):
        a(x)
    state = a.state_dict()
    assert [int(state[f"units.{i}.step"]) for i in range(3)] == [3, 3, 3]
    for u in a.units:
        u.body.seen.clear()
    for _ in range(6):
        a(x)
    b = build()
    b.load_state_dict(state)
    assert [u.step for u in b.units] == [3, 3, 3]
    for _ in range(6):
        b(x)
    for ua, ub in zip(a.units, b.units):
        assert [s.shape for s in ua.body.seen] == [s.shape for s in ub.body.seen]
    set_step(b, 0)
    assert [u.step for u in b.units] == [0, 0, 0]


# ---- per-sample mode -------------------------------------------------------------------------

@pytest.mark.parametrize("cls", KINDS)
def test_sample_mode_runs_body_on_kept_rows_only(xp, cls):
    n = 8
    u = _mlp_unit(cls, xp, p=0.5, mode="sample")
    x = _x(xp, n)
    scale = 1 / (1 - u.p) if cls is StochasticDepth else 1.0
    partial = 0
    for step in range(10):
        keep = philox.uniform(u.seed, u.layer, step, philox.TAG_SAMPLE, n) >= u.p
        calls = len(u.body.seen)
        y = _np(u(x))
        t = _np(u.shortcut(x))
        if not keep.any():
            assert len(u.body.seen) == calls
        else:
            assert len(u.body.seen) == calls + 1
            assert np.array_equal(u.body.seen[-1], _np(x)[keep])  # exactly the kept rows
            partial += not keep.all()
        f = np.zeros_like(t)
        if keep.any():
            f[keep] = _np(u.body.inner(cd.Tensor(x.data[xp.asarray(np.flatnonzero(keep))])))
        assert np.allclose(y[~keep], np.maximum(t[~keep], 0))  # dropped rows: shortcut only
        assert np.allclose(y, np.maximum(t + scale * f, 0))
    assert partial > 0


def test_sample_mode_with_nothing_kept_never_calls_body():
    u = StochasticDepth(Recorder(nn.Identity()), None, 0.9, mode="sample", seed=0, layer=0)
    step = next(s for s in range(200) if not u.keep_samples(s, 2).any())
    set_step(u, step)
    x = cd.Tensor(np.ones((2, 3)), requires_grad=True)
    y = u(x)
    assert u.body.seen == [] and np.array_equal(y.data, x.data)


def test_sample_mode_batchnorm_sees_kept_samples_only():
    bn = nn.BatchNorm1d(3, momentum=1.0).to(dtype=np.float64)
    u = StochasticDepth(bn, None, 0.5, mode="sample", seed=1, layer=1)
    step = next(s for s in range(100) if 2 <= u.keep_samples(s, 6).sum() < 6)
    keep = u.keep_samples(step, 6)
    set_step(u, step)
    x = np.random.default_rng(3).standard_normal((6, 3))
    u(cd.Tensor(x))
    assert np.allclose(bn.running_mean, x[keep].mean(0))


@given(n=st.integers(1, 9), cols=st.integers(1, 4), scale=st.floats(0.5, 4.0),
       seed=st.integers(0, 2 ** 16))
def test_functional_gather_scatter_pair(n, cols, scale, seed):
    rng = np.random.default_rng(seed)
    keep = rng.random(n) < 0.5
    idx = np.flatnonzero(keep)
    x, base = rng.standard_normal((n, cols)), rng.standard_normal((n, cols))
    rows, saved = F.gather_rows(x, idx)
    assert np.array_equal(rows, x[keep])
    out, s2 = F.scatter_add_rows(base, rows, idx, scale)
    ref = base + scale * np.where(keep[:, None], x, 0)
    assert np.allclose(out, ref) and not np.shares_memory(out, base)
    g = rng.standard_normal((n, cols))
    gb, gr, gidx = F.scatter_add_rows_backward(g, s2)
    gx, gidx2 = F.gather_rows_backward(gr, saved)
    assert gidx is None and gidx2 is None
    assert np.array_equal(gb, g)
    assert np.allclose(gx, scale * np.where(keep[:, None], g, 0))
    # adjoint identities: <g, scatter(r)> == <scatter*(g), r>, <gather(x), r> == <x, gather*(r)>
    assert np.isclose((g * (out - base)).sum(), (gr * rows).sum())
    assert np.isclose((rows * gr).sum(), (x * F.gather_rows_backward(gr, saved)[0]).sum())


def test_functional_pair_validates():
    with pytest.raises(ValueError, match="rows must have shape"):
        F.scatter_add_rows(np.zeros((4, 2)), np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="idx must be a 1-D integer"):
        F.gather_rows(np.zeros((4, 2)), np.array([0.0]))


# ---- model builders --------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(depth_dropout=0.5), dict(stochastic_depth=0.5),
                                dict(stochastic_depth=0.9, stochastic_depth_mode="sample")])
def test_resnet_with_depth_options_trains(kw):
    m = models.resnet20(num_classes=3, in_channels=1, widths=(2, 3, 4), **kw).to(dtype=np.float64)
    x = cd.Tensor(np.random.default_rng(0).standard_normal((4, 1, 8, 8)))
    for _ in range(2):
        m.zero_grad()
        loss = cd.cross_entropy(m(x), np.array([0, 1, 2, 0]))
        loss.backward()
        assert np.isfinite(loss.item())
        assert m.head.weight.grad is not None and m.stem[0].weight.grad is not None
    m.eval()
    assert m(x).shape == (4, 3)


def test_conv_unit_forward_matches_formula():
    unit = nn.basic_block(2, 3, 2, rng=0, dtype=np.float64)
    u = DepthDropout.from_unit(unit, 0.5, shortcut=conv_shortcut(2, 3, 2, rng=1, dtype=np.float64),
                               seed=0, layer=0)
    assert u.downsamples and u.body is unit.body and u.activation is unit.activation
    x = cd.Tensor(np.random.default_rng(0).standard_normal((2, 2, 5, 5)))
    for step in range(4):
        y = u(x)
        with cd.no_grad():
            ref = u.shortcut(x).data + u.keep_gate(step) * u.body(x).data
        assert np.allclose(y.data, np.maximum(ref, 0))


# ---- fused BN + ReLU and add + ReLU change no result -----------------------------------------

class _PlainReLU(nn.ReLU):
    """A ReLU module that ResidualUnit.merge does not fuse (it fuses exactly nn.ReLU)."""


def _swap_child(parent, name, child):
    """``parent.name = child`` in place: same key, same place in the module order, and no
    renumbering of stochastic layers (an assignment renumbers a unit's own layer ids)."""
    parent._modules[name] = child
    object.__setattr__(parent, name, child)


def _unfused(model):
    """A deep copy of ``model`` with every fusion undone: each ``BatchNorm2d(act='relu')`` +
    Identity pair back to ``BatchNorm2d`` + ``ReLU`` (the Identity's key and place in its
    Sequential), and unit activations that ``merge`` leaves as ``activation(f + t)``."""
    ref = copy.deepcopy(model)
    for m in list(ref.modules()):
        if isinstance(m, nn.Sequential):
            names = list(m._modules)
            for name, nxt in zip(names, names[1:]):
                bn = m._modules[name]
                if isinstance(bn, nn.BatchNorm2d) and bn.act == "relu":
                    assert isinstance(m._modules[nxt], nn.Identity)
                    bn.act = None
                    _swap_child(m, nxt, nn.ReLU())
        if isinstance(m, nn.ResidualUnit) and type(m.activation) is nn.ReLU:
            _swap_child(m, "activation", _PlainReLU())
    return ref


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [dict(), dict(depth_dropout=0.5), dict(stochastic_depth=0.5),
                                dict(stochastic_depth=0.7, stochastic_depth_mode="sample")])
def test_fused_resnet_equals_unfused(xp, kw, dtype):
    """The builders' fusions (conv-BN-ReLU as BatchNorm2d(act='relu'), the units' add + ReLU
    as add_relu) change no number: losses, every parameter's gradient, the BatchNorm running
    statistics and unit steps over training steps that keep and drop units (depth dropout's
    trainable 1x1 conv + BN + ReLU shortcut, stochastic depth's scaled body, per-sample
    gather/scatter), then eval outputs, equal those of the same model unfused, exactly; the
    state_dict keys are those of the unfused model (checkpoints load either way)."""
    rng = np.random.default_rng(0)
    m = models.ResNet(14, num_classes=3, in_channels=2, widths=(3, 4, 5), seed=1,
                      keep_downsampling=False, **kw).to(_dev(xp), dtype=dtype)
    # random weights: the zero-initialised residual BN scales would make every body output 0
    state = {k: (rng.normal(0.2, 0.8, v.shape).astype(v.dtype) if v.dtype.kind == "f" else v)
             for k, v in m.state_dict().items()}
    state = {k: (np.abs(v) + 0.5 if k.endswith("running_var") else v) for k, v in state.items()}
    m.load_state_dict(state)
    ref = _unfused(m)
    assert sum(isinstance(b, nn.BatchNorm2d) and b.act == "relu" for b in m.modules()) > 0
    assert sum(isinstance(b, nn.BatchNorm2d) and b.act == "relu" for b in ref.modules()) == 0
    assert list(ref.state_dict()) == list(m.state_dict())
    x = cd.Tensor(xp.asarray(rng.standard_normal((6, 2, 8, 8)).astype(dtype)))
    labels = xp.asarray(rng.integers(0, 3, 6))
    kept = set()
    for _ in range(5):
        runs = []
        for model in (m, ref):
            model.zero_grad()
            loss = cd.cross_entropy(model(x), labels)
            loss.backward()
            runs.append((_np(loss), {n: _np(p.grad) for n, p in model.named_parameters()
                                     if p.grad is not None}, model.state_dict()))
        (la, ga, sa), (lb, gb, sb) = runs
        np.testing.assert_array_equal(la, lb)
        assert ga.keys() == gb.keys()
        for k in ga:
            np.testing.assert_array_equal(ga[k], gb[k], err_msg=k)
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
        kept.add(frozenset(k.split(".body.")[0] for k in ga if ".body." in k))
    if kw.get("stochastic_depth_mode") == "sample":  # some steps keep some samples only
        assert any(0 < u.keep_samples(s, 6).sum() < 6 for u in m.units for s in range(5))
    elif kw:
        assert len(kept) > 1  # units were kept at some steps and dropped at others
    m.eval()
    ref.eval()
    np.testing.assert_array_equal(_np(m(x)), _np(ref(x)))


def test_merge_fuses_exactly_a_relu_of_matching_operands(xp):
    """ResidualUnit.merge: ``add_relu`` for an nn.ReLU activation and operands of one shape
    and dtype; the two ops otherwise (another activation, a subclass, a broadcast)."""
    f = cd.Tensor(xp.asarray(np.random.default_rng(0).standard_normal((2, 3))))
    t = cd.Tensor(xp.asarray(np.random.default_rng(1).standard_normal((2, 3))),
                  requires_grad=True)
    ops = {}
    for name, act, other in [("relu", nn.ReLU(), t), ("plain", _PlainReLU(), t),
                             ("tanh", nn.Tanh(), t), ("broadcast", nn.ReLU(), t[0])]:
        y = nn.ResidualUnit(nn.Identity(), activation=act).merge(f, other)
        ops[name] = repr(y.creator)
        if name != "tanh":
            np.testing.assert_array_equal(_np(y), np.maximum(_np(f) + _np(other), 0))
    assert ops["relu"] == "<add_relu>"
    assert "add_relu" not in ops["plain"] + ops["tanh"] + ops["broadcast"]


# ---- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan"), True, "0.5"])
@pytest.mark.parametrize("cls", KINDS)
def test_bad_p_raises_naming_p(cls, p):
    with pytest.raises(ValueError, match=r"\bp must"):
        cls(nn.Identity(), None, p)


def test_builder_validates():
    with pytest.raises(ValueError, match="depth_dropout"):
        models.resnet20(depth_dropout=1.0)
    with pytest.raises(ValueError, match="stochastic_depth must"):
        models.resnet56(stochastic_depth=-0.5)
    with pytest.raises(ValueError, match="stochastic_depth_mode"):
        models.resnet20(stochastic_depth=0.5, stochastic_depth_mode="row")
    with pytest.raises(ValueError, match="at most one"):
        models.resnet20(depth_dropout=0.5, stochastic_depth=0.5)
    with pytest.raises(ValueError, match="mode"):
        DepthDropout(nn.Identity(), None, 0.5, mode="token")
    with pytest.raises(TypeError, match="body"):
        StochasticDepth(lambda x: x, None, 0.5)
    plain = models.resnet20(in_channels=1)
    assert all(type(u) is nn.ResidualUnit for u in plain.units)


def test_gather_and_scatter_reject_duplicate_or_out_of_range_host_indices():
    from cudrop.functional import _rows as Fd
    x = np.ones((4, 2))
    for bad in (np.array([1, 1]), np.array([2, 0]), np.array([0, 4]), np.array([-1, 2])):
        with pytest.raises(ValueError, match="strictly increasing"):
            Fd.gather_rows(x, bad)
        with pytest.raises(ValueError, match="strictly increasing"):
            Fd.scatter_add_rows(x, np.ones((2, 2)), bad)


# ---- the gated body's two ends (a captured step's depth dropout: cudrop.graph.gate) ---------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gate_ends_select_on_the_replays_scale(xp, dtype):
    """gate_out = t + f * s where s != 0, else t even when the skipped body's stale output is
    inf or NaN; gate_in's backward passes the body's gradient only where the body ran. Checked
    against float64 NumPy arithmetic written out here."""
    from cudrop.functional import _gate
    rng = np.random.default_rng(0)
    t, f, g = (xp.asarray(rng.standard_normal((4, 3, 5, 5)).astype(dtype)) for _ in range(3))
    stale = f.copy()
    stale[0, 0, 0, 0], stale[1, 2, 3, 4] = np.inf, np.nan
    for s in (1.0, 1.25):
        scale = xp.asarray(np.float32(s))
        y, saved = _gate.gate_out(t, f, scale)
        want = backend.asnumpy(t).astype(np.float64) + backend.asnumpy(f).astype(np.float64) * s
        np.testing.assert_allclose(backend.asnumpy(y), want, rtol=1e-6, atol=1e-6)
        gt, gf = _gate.gate_out_backward(g, saved)
        assert gt is g
        np.testing.assert_allclose(backend.asnumpy(gf), backend.asnumpy(g) * s, rtol=1e-6)
        x, saved_in = _gate.gate_in(t, scale)
        assert x is t
        np.testing.assert_array_equal(backend.asnumpy(_gate.gate_in_backward(g, saved_in)),
                                      backend.asnumpy(g))
    zero = xp.asarray(np.float32(0))
    y, saved = _gate.gate_out(t, stale, zero)
    np.testing.assert_array_equal(backend.asnumpy(y), backend.asnumpy(t))
    np.testing.assert_array_equal(backend.asnumpy(_gate.gate_out_backward(g, saved)[1]), 0)
    stale_grad = g.copy()
    stale_grad[0, 0, 0, 0] = np.nan
    got = _gate.gate_in_backward(stale_grad, _gate.gate_in(t, zero)[1])
    assert got.dtype == g.dtype and not backend.asnumpy(got).any()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_gate_out_with_relu_equals_the_composed_ops(xp, dtype):
    """``gate_out(..., act='relu')`` (one kernel each way on the GPU) equals ReLU of the
    unfused end bit for bit, forward and both gradients, at s = 1, 1.25 and 0 (then with a
    stale inf/NaN body output that must not be read); ``gate_in``'s backward is the gradient
    itself, or zeros at s = 0; outputs poisoned."""
    from conftest import low_precision_dtype, poison_pool
    from cudrop.functional import _act, _gate
    dt = low_precision_dtype(xp, dtype)
    rng = np.random.default_rng(1)
    t, f, g = (xp.asarray(rng.standard_normal((3, 5, 7, 3)).astype(np.float32)).astype(dt)
               for _ in range(3))
    for s in (1.0, 1.25, 0.0):
        if s == 0:
            f[0, 0, 0, 0], f[1, 2, 3, 1] = np.inf, np.nan
        scale = xp.asarray(np.asarray(s, dtype=dt))
        plain, _ = _gate.gate_out(t, f, scale)
        want_y, relu_saved = _act.relu(plain)
        want_gt = _act.relu_backward(g, relu_saved)
        want_gf = _gate.gate_out_backward(want_gt, _gate.gate_out(t, f, scale)[1])[1]
        poison_pool(xp)
        y, saved = _gate.gate_out(t, f, scale, act="relu")
        poison_pool(xp)
        gt, gf = _gate.gate_out_backward(g, saved)
        poison_pool(xp)
        gi = _gate.gate_in_backward(g, _gate.gate_in(t, scale)[1])  # g, or zeros if skipped
        want_gi = g if s else xp.zeros_like(g)
        for got, want in ((y, want_y), (gt, want_gt), (gf, want_gf), (gi, want_gi)):
            assert got.dtype == dt and got.shape == t.shape
            np.testing.assert_array_equal(backend.asnumpy(got).view(np.uint8),
                                          backend.asnumpy(want).view(np.uint8))


def test_gate_out_refuses_a_body_output_unlike_the_shortcut():
    from cudrop.functional import _gate
    t = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="shortcut"):
        _gate.gate_out(t, np.zeros((2, 4), np.float32), np.float32(1))
    with pytest.raises(ValueError, match="shortcut"):
        _gate.gate_out(t, np.zeros((2, 3), np.float64), np.float32(1))


class _FakeCaptureStream:
    """A stream whose captures record nothing: ``end_capture`` numbers the pieces (1, 2, ...)
    and returns ``piece(i)``, or fails like an invalidated capture while ``broken``."""

    def __init__(self, piece):
        self.piece, self.ended, self.broken = piece, 0, False

    def end_capture(self):
        if self.broken:
            raise RuntimeError("cudaErrorStreamCaptureInvalidated")
        self.ended += 1
        return self.piece(self.ended)

    def begin_capture(self, mode):
        pass


def _fake_recorder(monkeypatch, stream):
    """A capture in progress on ``stream`` as cudrop.graph sees it (no scalars, no counters)."""
    from types import SimpleNamespace
    from cudrop import graph
    rec = SimpleNamespace(stream=stream, mode=0, current=None, pieces=[], gates=[],
                          leaf_gates={}, counters=dict, conditional=False)
    monkeypatch.setattr(graph, "_recorder", rec)
    return rec


def test_a_gated_capture_is_cut_into_pieces_that_replays_skip(monkeypatch):
    """The bookkeeping of cudrop.graph's gated parts, with a stand-in for the capturing stream:
    entering or leaving a part ends one piece and begins the next (staying in a part does not),
    and a replay launches the pieces in order, skipping those whose gate is off."""
    from types import SimpleNamespace
    from cudrop import graph

    launched = []
    stream = _FakeCaptureStream(
        lambda i: SimpleNamespace(i=i, launch=lambda s: launched.append(i)))
    rec = _fake_recorder(monkeypatch, stream)
    a, b = graph.gate(lambda: True, "A"), graph.gate(lambda: True, "B")
    graph.switch(a)
    graph.switch(a)  # still in A: no new piece
    assert graph.current_gate() is a
    graph.switch(None)
    graph.switch(b)
    graph.switch(a)  # from one part straight into another
    graph.switch(None)
    assert [(g, p.i) for g, p in rec.pieces] == [(None, 1), (a, 2), (None, 3), (b, 4), (a, 5)]
    whole = graph._PiecedGraph(rec.pieces + [(None, stream.end_capture())])
    a.on, b.on = False, True
    whole.launch(stream)
    assert launched == [1, 3, 4, 6]
    launched.clear()
    a.on, b.on = True, False
    whole.launch(stream)
    assert launched == [1, 2, 3, 5, 6]


def test_a_gated_body_s_error_is_reported_when_it_broke_the_capture(monkeypatch):
    """An error inside a gated part that also invalidated the capture (a host read of a device
    value does): leaving the part cannot end its piece, and the body's error, not that
    failure, reaches CapturedStep (which ends the capture and names the error)."""
    from cudrop import graph

    stream = _FakeCaptureStream(lambda i: object())
    rec = _fake_recorder(monkeypatch, stream)
    a = graph.gate(lambda: True, "A")
    with a:  # a part that ends normally
        pass
    assert rec.current is None and [g for g, _ in rec.pieces] == [None, a]
    with pytest.raises(graph.CaptureError, match="reads a device value"):
        with graph.gate(lambda: True, "B"):
            stream.broken = True
            raise graph.CaptureError("the body reads a device value")
    assert rec.current is None
    stream.broken = False
    with pytest.raises(RuntimeError, match="Invalidated"):  # no error of its own: raised
        with graph.gate(lambda: True, "C"):
            stream.broken = True


def _host_capture(monkeypatch):
    """cudrop.graph's CapturedStep on the CPU: a stand-in CuPy whose stream records nothing
    (a "capture" runs the step's NumPy work at once), enough to follow the host-side paths of
    a capture attempt (gates, pieces, the wait for optimizer state) without a GPU."""
    from types import SimpleNamespace
    from cudrop import graph

    class Stream:
        def begin_capture(self, mode):
            pass

        def end_capture(self):
            return SimpleNamespace(launch=lambda stream: None)

    cp = SimpleNamespace(
        array=lambda a, copy=True: np.array(a, copy=copy), zeros=np.zeros,
        cuda=SimpleNamespace(Stream=lambda non_blocking=True: Stream(),
                             MemoryPool=lambda: None,
                             runtime=SimpleNamespace(streamCaptureModeRelaxed=2)))
    monkeypatch.setattr(graph, "backend", SimpleNamespace(cupy=cp, gpu_available=lambda: True,
                                                          pinned_empty=np.empty))
    monkeypatch.setattr(graph.CapturedStep, "_on_stream", lambda self, body: body())
    monkeypatch.setattr(graph._driver, "available", lambda: False)  # no IF nodes: pieces
    return graph


def _step_zeroing_after(model, opt):
    """A training step that zeroes the gradients after the update (the stand-in capture has
    no host copy of gradients to give back, so none may exist when it starts)."""
    def step(x, y):
        loss = cd.cross_entropy(model(cd.Tensor(x)), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss
    return step


def test_a_capture_that_waits_for_optimizer_state_leaves_the_gradients_as_they_were(
        monkeypatch):
    """A capture attempt that stops in optimizer.step because a gated unit has no optimizer
    state yet (graph._NotYet) gives the parameters back the .grad they had: the step then runs
    eagerly, and a step that zeroes its gradients after the update (``loss.backward();
    opt.step(); opt.zero_grad()``) must not add its gradients to the attempt's (on the GPU:
    arrays recorded but never computed). Same weights as eager steps."""
    graph = _host_capture(monkeypatch)
    from cudrop import optim

    def run(captured):
        rng = np.random.default_rng(0)
        model = nn.number_layers(nn.Sequential(
            nn.Linear(8, 16, rng=rng), nn.ReLU(),
            DepthDropout(nn.Sequential(nn.Linear(16, 16, rng=rng), nn.ReLU()), p=0.8),
            nn.Linear(16, 4, rng=rng)), seed=1)
        assert not any(model[2].keep_gate(s) for s in range(3))  # not kept before the attempt
        opt = optim.SGD(model.parameters(), 0.1, momentum=0.9)
        step = _step_zeroing_after(model, opt)
        fn = graph.capture(step, model=model, optimizer=opt) if captured else step
        data = np.random.default_rng(1)
        for _ in range(3):  # 2 warm-up steps, then the attempt (and this call's eager step)
            fn(data.standard_normal((6, 8)).astype(np.float32), data.integers(0, 4, 6))
        if captured:
            assert fn.graph is None and fn.failed is None and fn.missing
        return model.state_dict()

    eager, captured = run(False), run(True)
    for k in eager:
        np.testing.assert_array_equal(captured[k], eager[k], err_msg=k)


def test_a_gated_unit_is_three_parts_of_a_captured_step(monkeypatch):
    """A captured ResNet with depth dropout records each unit's body as three gated parts:
    its forward, its backward (one part although the ungated shortcut's backward runs beside
    it at the same generations: autograd's capture order finishes the part being recorded
    first) and its parameters' updates (here NumPy's; on the GPU, SGD's fused kernel skips a
    dropped unit's updates by the gate's device flag, in the ungated launch: two parts). Each
    part is an IF node or a piece on the GPU (a few µs of GPU time a replay), so fewer parts
    are a faster step."""
    graph = _host_capture(monkeypatch)
    from cudrop import models, optim

    model = models.ResNet(20, num_classes=10, in_channels=1, widths=(4, 8, 8), seed=0,
                          depth_dropout=0.5)
    opt = optim.SGD(model.parameters(), 0.05, momentum=0.9)
    fn = graph.capture(_step_zeroing_after(model, opt), model=model, optimizer=opt)
    rng = np.random.default_rng(0)
    while fn.graph is None and fn.calls < 50:
        try:
            fn(rng.standard_normal((4, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 4))
        except AttributeError:  # the stand-in CuPy cannot replay: the capture is what counts
            pass
    gates = fn.recorder.gates
    assert len(gates) == 9 and fn.graph is not None
    parts = [g for g, _ in fn.graph.pieces if g is not None]
    assert len(parts) == 3 * len(gates)
    assert all(parts.count(g) == 3 for g in gates)
