"""SparseDrop linear: forward and the three gradients equal the dense formulas with the
materialised block mask; dropped work is not done (GEMM multiply-adds counted); explicit and
drawn masks agree; eval and p = 0 are dense; the layer steps and exposes its mask; errors name
the argument."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import cudrop
from cudrop import backend, masks
from cudrop import bsmm
from cudrop.variants import sparsedrop as Fsd
from cudrop import nn
from cudrop.nn import Linear
from cudrop.nn.sparsedrop import SparseDropLinear
from conftest import poison_pool

BLOCKS = [(4, 8), (3, 5), (2, 2), (5, 3), (1, 4)]
TOL = dict(rtol=1e-10, atol=1e-12)


def _np(a):
    return backend.asnumpy(a.data if isinstance(a, cudrop.Tensor) else a)


def _arr(xp, shape, seed, dtype=np.float64):
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _problem(xp, m, k, n, dtype=np.float64):
    """x (m, k), w (k, n), b (n,), gy (m, n)."""
    return tuple(_arr(xp, shape, i, dtype) for i, shape in
                 enumerate([(m, k), (k, n), (n,), (m, n)], 1))


def _reference(x, w, b, keep, p, gy):
    """Dense formulas on the host with the materialised mask (float64)."""
    x, w, gy = _np(x), _np(w), _np(gy)
    lead, k = x.shape[:-1], x.shape[-1]
    x2, g2, m = x.reshape(-1, k), gy.reshape(-1, w.shape[1]), _np(keep)
    xm = x2 * m / (1 - p)
    y = xm @ w + (0 if b is None else _np(b))
    gx = (g2 @ w.T) * m / (1 - p)
    return y.reshape(lead + (w.shape[1],)), gx.reshape(x.shape), xm.T @ g2, g2.sum(axis=0)


def _check_all(xp, x, w, b, p, gy, **kw):
    poison_pool(xp)
    y, saved = Fsd.sparsedrop_linear(x, w, b, p=p, **kw)
    poison_pool(xp)
    gx, gw, gb = Fsd.sparsedrop_linear_backward(gy, saved)
    mask = saved.mask
    keep = _np(mask.to_dense())
    ry, rgx, rgw, rgb = _reference(x, w, b, keep, p, gy)
    np.testing.assert_allclose(_np(y), ry, **TOL)
    np.testing.assert_allclose(_np(gx), rgx, **TOL)
    np.testing.assert_allclose(_np(gw), rgw, **TOL)
    if b is None:
        assert gb is None
    else:
        np.testing.assert_allclose(_np(gb), rgb, **TOL)
    assert y.shape == x.shape[:-1] + (w.shape[1],) and gx.shape == x.shape
    assert gw.shape == w.shape and y.dtype == gx.dtype == gw.dtype == x.dtype
    # dropped blocks of dX are exact zeros, not small numbers
    assert (_np(gx).reshape(keep.shape)[~keep] == 0).all()
    return y, (gx, gw, gb), mask


# ---- forward and gradients against the dense formulas ----------------------------------------

@given(lead=st.lists(st.integers(1, 9), min_size=1, max_size=2).map(tuple),
       k=st.integers(1, 30), n=st.integers(1, 6), block=st.sampled_from(BLOCKS),
       p=st.sampled_from([0.0, 0.3, 0.7, 0.99]), bias=st.booleans(),
       step=st.integers(0, 2**32 - 1))
def test_equals_dense_formulas_with_mask(xp, lead, k, n, block, p, bias, step):
    x, w = _arr(xp, lead + (k,), 1), _arr(xp, (k, n), 2)
    b = _arr(xp, (n,), 3) if bias else None
    gy = _arr(xp, lead + (n,), 4)
    _, _, mask = _check_all(xp, x, w, b, p, gy, block=block, seed=5, layer=6, step=step)
    # saved holds the packed block mask, the one drawn for these coordinates
    rows = int(np.prod(lead))
    drawn = masks.block_mask((rows, k), block, p, seed=5, layer=6, step=step, xp=xp)
    assert isinstance(mask, masks.BlockMask) and mask.block == block
    np.testing.assert_array_equal(_np(mask.bits), _np(drawn.bits))


def test_p_zero_is_dense(xp):
    x, w, b, gy = _problem(xp, 13, 21, 5)
    poison_pool(xp)
    y, saved = Fsd.sparsedrop_linear(x, w, b, p=0.0, block=(4, 8))
    gx, gw, gb = Fsd.sparsedrop_linear_backward(gy, saved)
    X, W, G = _np(x), _np(w), _np(gy)
    np.testing.assert_allclose(_np(y), X @ W + _np(b), **TOL)
    np.testing.assert_allclose(_np(gx), G @ W.T, **TOL)
    np.testing.assert_allclose(_np(gw), X.T @ G, **TOL)
    np.testing.assert_allclose(_np(gb), G.sum(0), **TOL)
    t = cudrop.sparsedrop_linear(x, w, b, p=0.0, block=(4, 8))
    np.testing.assert_allclose(_np(t), X @ W + _np(b), **TOL)


def test_explicit_grid_dropped_rows_and_columns(xp):
    # 10 x 17 with (4, 8) blocks: a 3 x 3 grid with partial edge blocks. Row block 0 keeps a
    # non-contiguous set (gather), row block 1 keeps nothing, row block 2 a contiguous run;
    # K-block 1 is dropped in every row block.
    keep = xp.asarray(np.array([[1, 0, 1], [0, 0, 0], [1, 0, 0]], bool))
    mask = masks.BlockMask.from_blocks(keep, (10, 17), (4, 8), 0.5)
    x, w, b, gy = _problem(xp, 10, 17, 3)
    y, (gx, gw, _), _ = _check_all(xp, x, w, b, 0.5, gy, block=(4, 8), mask=mask)
    np.testing.assert_array_equal(_np(y)[4:8], np.broadcast_to(_np(b), (4, 3)))  # b only
    assert (_np(gx)[4:8] == 0).all() and (_np(gx)[:, 8:16] == 0).all()
    assert (_np(gw)[8:16] == 0).all()  # no kept row block in K-block 1


def test_everything_dropped_and_p_099(xp):
    x, w, b, gy = _problem(xp, 9, 11, 4)
    none = masks.BlockMask.from_blocks(xp.zeros((3, 3), bool), (9, 11), (3, 4), 0.5)
    y, (gx, gw, gb), _ = _check_all(xp, x, w, b, 0.5, gy, block=(3, 4), mask=none)
    np.testing.assert_array_equal(_np(y), np.broadcast_to(_np(b), (9, 4)))
    assert not _np(gx).any() and not _np(gw).any()
    # p = 0.99 drawn: almost every row block is b only, exactly
    x, w, gy = _arr(xp, (64, 40), 5), _arr(xp, (40, 4), 6), _arr(xp, (64, 4), 7)
    y, _, mask = _check_all(xp, x, w, b, 0.99, gy, block=(4, 8), seed=1, step=2)
    empty = np.repeat(_np(mask.row_count) == 0, 4)[:64]
    assert empty.sum() >= 12
    np.testing.assert_array_equal(_np(y)[empty], np.broadcast_to(_np(b), (empty.sum(), 4)))


def test_leading_axes_and_non_contiguous_input(xp):
    x = _arr(xp, (2, 5, 6), 1).transpose(0, 2, 1)  # (2, 6, 5), a non-contiguous view
    w, gy = _arr(xp, (5, 3), 2), _arr(xp, (2, 6, 3), 4)
    _check_all(xp, x, w, None, 0.5, gy, block=(2, 2), seed=3)


def test_float32_keeps_dtype(xp):
    x, w, b, _ = _problem(xp, 9, 10, 3, np.float32)
    y, saved = Fsd.sparsedrop_linear(x, w, b, p=0.5, block=(2, 4), seed=1)
    grads = Fsd.sparsedrop_linear_backward(xp.ones_like(y), saved)
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    keep = _np(saved.mask.to_dense())
    ry = (_np(x) * keep / 0.5) @ _np(w) + _np(b)
    np.testing.assert_allclose(_np(y), ry, rtol=1e-5, atol=1e-5)


# ---- the work falls with p -------------------------------------------------------------------

@pytest.fixture
def gemm_log(monkeypatch):
    """Every GEMM the SparseDrop products run, as (m, k, n)."""
    log = []
    real = bsmm.matmul

    def counting(a, b):
        log.append((a.shape[0], a.shape[1], b.shape[1]))
        return real(a, b)

    monkeypatch.setattr(bsmm, "matmul", counting)
    return log


def _macs(log):
    n = sum(m * k * nn for m, k, nn in log)
    log.clear()
    return n


@pytest.mark.parametrize("shape", [(37, 45), (32, 48)])  # edge blocks partial / exact
def test_gemm_work_equals_kept_blocks(gemm_log, shape):
    # The NumPy reference runs one GEMM per kept row block; the GPU kernels' work is shown by
    # benchmarks/bsmm.py (their time falls with p).
    xp = np
    m, k, n, block = *shape, 7, (4, 8)
    x, w, dy = _arr(xp, (m, k), 1), _arr(xp, (k, n), 2), _arr(xp, (m, n), 3)
    kept_prev = None
    for p in (0.0, 0.2, 0.5, 0.8, 0.95):
        mask = masks.block_mask((m, k), block, p, seed=4, layer=0, step=9, xp=xp)
        kept = int(_np(mask.to_dense()).sum())  # kept elements, edge blocks partial
        kept_blocks = int(_np(mask.row_count).sum())
        assert kept <= kept_blocks * block[0] * block[1]
        if shape == (32, 48):
            assert kept == kept_blocks * block[0] * block[1]
        for product, a, c in ((bsmm.dsd, x, w), (bsmm.sdd, dy, w.T), (bsmm.dsd_t, x, dy)):
            product(a, c, mask, 2.0)
            assert _macs(gemm_log) == kept * n, (product.__name__, p)
        y, saved = Fsd.sparsedrop_linear(x, w, p=p, block=block, mask=mask)
        assert _macs(gemm_log) == kept * n
        Fsd.sparsedrop_linear_backward(dy, saved)
        assert _macs(gemm_log) == 2 * kept * n
        if p == 0.0:
            assert kept == m * k
        else:  # one seed: the kept set at a larger p is a subset, and here a strict one
            assert kept < kept_prev
        kept_prev = kept
    assert kept_prev < 0.25 * m * k


def test_empty_row_blocks_run_no_gemm(gemm_log):
    xp = np
    keep = xp.asarray(np.array([[0, 0], [1, 0], [0, 0]], bool))
    mask = masks.BlockMask.from_blocks(keep, (6, 8), (2, 4), 0.5)
    Fsd.sparsedrop_linear(_arr(xp, (6, 8), 1), _arr(xp, (8, 2), 2), p=0.5, block=(2, 4), mask=mask)
    assert gemm_log == [(2, 4, 2)]


# ---- masks: explicit equals drawn ------------------------------------------------------------

def test_explicit_mask_equals_drawn(xp):
    x, w, b, gy = _problem(xp, 19, 23, 4)
    kw = dict(p=0.4, block=(4, 8))
    poison_pool(xp)
    y1, s1 = Fsd.sparsedrop_linear(x, w, b, seed=7, layer=3, step=11, **kw)
    mask = masks.block_mask((19, 23), (4, 8), 0.4, seed=7, layer=3, step=11, xp=xp)
    y2, s2 = Fsd.sparsedrop_linear(x, w, b, mask=mask, **kw)
    assert s2.mask is mask
    np.testing.assert_array_equal(_np(y1), _np(y2))
    g1s, g2s = (Fsd.sparsedrop_linear_backward(gy, s) for s in (s1, s2))
    for g1, g2 in zip(g1s, g2s):
        np.testing.assert_array_equal(_np(g1), _np(g2))
    y3, _ = Fsd.sparsedrop_linear(x, w, b, seed=7, layer=3, step=12, **kw)
    y4, _ = Fsd.sparsedrop_linear(x, w, b, seed=7, layer=4, step=11, **kw)
    assert not np.array_equal(_np(y1), _np(y3)) and not np.array_equal(_np(y1), _np(y4))


# ---- autograd --------------------------------------------------------------------------------

@pytest.mark.parametrize("xshape, bias", [((7, 11), True), ((2, 5, 11), False), ((3, 11), True)])
def test_check_grad(xp, xshape, bias):
    x, w = _arr(xp, xshape, 1), _arr(xp, (11, 3), 2)
    args = (x, w, _arr(xp, (3,), 3)) if bias else (x, w)

    def fn(*t):
        return cudrop.sparsedrop_linear(*t, p=0.4, block=(2, 4), seed=1, layer=2, step=3)
    cudrop.check_grad(fn, *args)


def test_autograd_matches_functional(xp):
    x = cudrop.Tensor(_arr(xp, (10, 9), 1), requires_grad=True)
    w = cudrop.Tensor(_arr(xp, (9, 4), 2), requires_grad=True)
    b = cudrop.Tensor(_arr(xp, (4,), 3), requires_grad=True)
    gy = _arr(xp, (10, 4), 4)
    poison_pool(xp)
    y = cudrop.sparsedrop_linear(x, w, b, p=0.5, block=(3, 4), seed=2, step=1)
    y.backward(gy)
    ry, saved = Fsd.sparsedrop_linear(x.data, w.data, b.data, p=0.5, block=(3, 4), seed=2, step=1)
    np.testing.assert_array_equal(_np(y), _np(ry))
    for t, g in zip((x, w, b), Fsd.sparsedrop_linear_backward(gy, saved)):
        np.testing.assert_array_equal(_np(t.grad), _np(g))


def test_eval_is_dense(xp):
    x = cudrop.Tensor(_arr(xp, (2, 6, 9), 1), requires_grad=True)
    w = cudrop.Tensor(_arr(xp, (9, 4), 2), requires_grad=True)
    b = _arr(xp, (4,), 3)
    want = _np(x) @ _np(w) + _np(b)
    poison_pool(xp)
    layer = SparseDropLinear(9, 4, 0.9, block=(2, 2))
    layer.weight.data, layer.bias.data = w.data, b
    layer.weight = w
    layer.eval()
    y = layer(x)  # a layer in eval mode is the dense Linear and takes no step
    assert layer.step == 0 and layer.last_mask is None
    np.testing.assert_allclose(_np(y), want, **TOL)
    y.backward(xp.ones(y.shape))
    np.testing.assert_allclose(_np(x.grad), np.ones((2, 6, 4)) @ _np(w).T, **TOL)


# ---- the layer -------------------------------------------------------------------------------

def _layer_input(xp, shape=(3, 8, 10)):
    return cudrop.Tensor(_arr(xp, shape, 11))


def test_layer_parameters_like_linear():
    a, ref = SparseDropLinear(10, 4, 0.5, rng=7), Linear(10, 4, rng=7)
    assert [n for n, _ in a.named_parameters()] == ["weight", "bias"]
    np.testing.assert_array_equal(a.weight.data, ref.weight.data)
    np.testing.assert_array_equal(a.bias.data, ref.bias.data)
    assert a.weight.shape == (10, 4) and a.weight.dtype == np.float32
    assert SparseDropLinear(10, 4, 0.5, bias=False).bias is None
    assert "p=0.5" in repr(a) and "block=(128, 128)" in repr(a)


def test_layer_training_forward(xp):
    layer = SparseDropLinear(10, 4, 0.5, block=(4, 2), seed=3, layer=8, dtype=np.float64)
    layer.to("gpu" if xp is not np else "cpu")
    x = _layer_input(xp)
    poison_pool(xp)
    y = layer(x)
    assert layer.step == 1
    mask = layer.last_mask
    assert mask.shape == (24, 10) and mask.block == (4, 2) and mask.p == 0.5
    drawn = masks.block_mask((24, 10), (4, 2), 0.5, seed=3, layer=8, step=0, xp=xp)
    np.testing.assert_array_equal(_np(mask.bits), _np(drawn.bits))
    gy = _arr(xp, (3, 8, 4), 12)
    y.backward(gy)
    ry, _, rgw, rgb = _reference(x, layer.weight, layer.bias, mask.to_dense(), 0.5, gy)
    np.testing.assert_allclose(_np(y), ry, **TOL)
    np.testing.assert_allclose(_np(layer.weight.grad), rgw, **TOL)
    np.testing.assert_allclose(_np(layer.bias.grad), rgb, **TOL)
    layer(x)
    assert layer.step == 2 and not np.array_equal(_np(layer.last_mask.bits), _np(mask.bits))


def test_layer_eval_dense_and_state_dict(xp):
    layer = SparseDropLinear(10, 4, 0.7, block=(2, 2), seed=1, dtype=np.float64)
    layer.to("gpu" if xp is not np else "cpu")
    x = _layer_input(xp)
    layer(x)
    state = layer.state_dict()
    want = _np(layer(x))
    layer.eval()
    y = layer(x)
    assert layer.step == 2 and layer.last_mask is None
    np.testing.assert_allclose(_np(y), _np(x) @ _np(layer.weight) + _np(layer.bias), **TOL)
    other = SparseDropLinear(10, 4, 0.7, block=(2, 2), seed=1, layer=layer.layer,
                             dtype=np.float64)
    other.to("gpu" if xp is not np else "cpu")
    other.load_state_dict(state)
    assert other.step == 1
    np.testing.assert_array_equal(_np(other(x)), want)


def test_layers_draw_different_masks():
    a, b = nn.Sequential(*(SparseDropLinear(16, 2, 0.5, block=(2, 2), dtype=np.float64)
                           for _ in range(2)))
    assert (a.layer, b.layer) == (0, 1)
    x = _layer_input(np, (16, 16))
    a(x), b(x)
    assert not np.array_equal(a.last_mask.bits, b.last_mask.bits)


# ---- errors ----------------------------------------------------------------------------------

def test_errors_name_the_argument(xp):
    x, w = _arr(xp, (6, 8), 1), _arr(xp, (8, 3), 2)
    good = masks.block_mask((6, 8), (2, 4), 0.5, seed=0, layer=0, step=0, xp=xp)
    with pytest.raises(ValueError, match="mask covers shape"):
        Fsd.sparsedrop_linear(x[:4], w, p=0.5, block=(2, 4), mask=good)
    with pytest.raises(ValueError, match="mask has block"):
        Fsd.sparsedrop_linear(x, w, p=0.5, block=(2, 2), mask=good)
    with pytest.raises(ValueError, match="mask was made with p"):
        Fsd.sparsedrop_linear(x, w, p=0.3, block=(2, 4), mask=good)
    with pytest.raises(TypeError, match="mask must be"):
        Fsd.sparsedrop_linear(x, w, p=0.5, mask=good.to_dense())
    with pytest.raises(ValueError, match="w must have shape"):
        Fsd.sparsedrop_linear(x, w[:7], p=0.5)
    with pytest.raises(ValueError, match="b must have shape"):
        Fsd.sparsedrop_linear(x, w, _arr(xp, (4,), 3), p=0.5)
    with pytest.raises(TypeError, match="w has dtype"):
        Fsd.sparsedrop_linear(x, w.astype(np.float32), p=0.5)
    with pytest.raises(TypeError, match="b has dtype"):
        Fsd.sparsedrop_linear(x, w, _arr(xp, (3,), 3, np.float32), p=0.5)
    with pytest.raises(TypeError, match="x must be"):
        Fsd.sparsedrop_linear(x.astype(np.int32), w.astype(np.int32), p=0.5)
    with pytest.raises(ValueError, match="block"):
        Fsd.sparsedrop_linear(x, w, p=0.5, block=(0, 4))
    for p in (-0.1, 1.0, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="p"):
            Fsd.sparsedrop_linear(x, w, p=p)
        with pytest.raises(ValueError, match="p"):
            SparseDropLinear(8, 3, p)
    with pytest.raises(ValueError, match="block"):
        SparseDropLinear(8, 3, 0.5, block=(4,))
    with pytest.raises(ValueError, match="8 features"):
        SparseDropLinear(8, 3, 0.5)(x[:, :7])


def test_mixed_devices_raise(xp):
    if xp is np:
        pytest.skip("needs a CuPy array to mix with a NumPy one")
    x, w = _arr(xp, (6, 8), 1), _arr(np, (8, 3), 2)
    with pytest.raises(TypeError, match="different devices"):
        Fsd.sparsedrop_linear(x, w, p=0.5)
    cpu_mask = masks.block_mask((6, 8), (2, 4), 0.5, seed=0, layer=0, step=0)
    with pytest.raises(TypeError, match="different devices"):
        Fsd.sparsedrop_linear(x, xp.asarray(w), p=0.5, block=(2, 4), mask=cpu_mask)


def test_p_and_block_default_to_the_given_mask():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((10, 12)), rng.standard_normal((12, 3))
    m = masks.block_mask((10, 12), (4, 8), 0.3, seed=1, layer=0, step=2)
    y1, _ = Fsd.sparsedrop_linear(x, w, mask=m)
    y2, _ = Fsd.sparsedrop_linear(x, w, p=0.3, block=(4, 8), seed=1, step=2)
    np.testing.assert_allclose(y1, y2)
    with pytest.raises(TypeError, match="p is required"):
        Fsd.sparsedrop_linear(x, w)
    with pytest.raises(ValueError, match="p="):
        Fsd.sparsedrop_linear(x, w, p=0.5, mask=m)
