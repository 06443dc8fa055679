"""Element dropout: counter-based masks, the fused GPU kernel against the NumPy reference bit for
bit, backward from the packed bits, eval/p=0 identity, and argument checks."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import cudrop
from cudrop import backend, masks, nn
from cudrop.variants import dropout as Fdrop
from conftest import poison_pool

DTYPES = ["float64", "float32", "float16"]


def _np(a):
    return backend.asnumpy(a.data if isinstance(a, cudrop.Tensor) else a)


def _x(xp, shape, dtype, seed=0):
    # strictly positive values: a kept element is never 0, so y != 0 reads the mask back
    return xp.asarray(np.random.default_rng(seed).uniform(1.0, 2.0, shape).astype(dtype))


@given(shape=st.lists(st.integers(1, 70), min_size=1, max_size=3).map(tuple),
       p=st.sampled_from([0.05, 0.3, 0.5, 0.9]), step=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(DTYPES))
def test_forward_equals_mask_formula(xp, shape, p, step, dtype):
    x = _x(xp, shape, dtype, step % 1000)
    poison_pool(xp)
    y, saved = Fdrop.dropout(x, p, seed=3, layer=5, step=step)
    ref_mask = masks.element_mask(x.size, p, seed=3, layer=5, step=step)
    # the packed bits (GPU kernel or CPU path) equal the NumPy reference bit for bit
    np.testing.assert_array_equal(_np(saved.mask.bits), ref_mask.bits)
    keep = ref_mask.to_dense().reshape(shape)
    want = np.where(keep, _np(x).astype(np.float64) / (1 - p), 0.0)
    tol = 1e-12 if dtype == "float64" else (1e-6 if dtype == "float32" else 2e-3)
    np.testing.assert_allclose(_np(y).astype(np.float64), want, rtol=tol)
    assert y.dtype == x.dtype and y.shape == x.shape


@given(shape=st.lists(st.integers(1, 50), min_size=1, max_size=3).map(tuple),
       p=st.sampled_from([0.2, 0.7]), dtype=st.sampled_from(DTYPES))
def test_backward_from_bits(xp, shape, p, dtype):
    x = cudrop.Tensor(_x(xp, shape, dtype), requires_grad=True)
    y = cudrop.dropout(x, p, seed=1, layer=2, step=3)
    g = _x(xp, shape, dtype, 9)
    poison_pool(xp)
    y.backward(g)
    keep = _np(y) != 0
    tol = 1e-12 if dtype == "float64" else (1e-6 if dtype == "float32" else 2e-3)
    np.testing.assert_allclose(_np(x.grad).astype(np.float64),
                               keep * _np(g).astype(np.float64) / (1 - p), rtol=tol)


def test_keep_rate_within_binomial_bounds(xp):
    for p in (0.1, 0.5, 0.9):
        y, _ = Fdrop.dropout(_x(xp, (300, 700), "float32"), p, seed=0, layer=0, step=1)
        n, kept = y.size, int((y != 0).sum())
        assert abs(kept - n * (1 - p)) < 5 * np.sqrt(n * p * (1 - p))


def test_same_coordinates_same_mask_other_step_other_mask(xp):
    x = _x(xp, (64, 64), "float32")
    a, _ = Fdrop.dropout(x, 0.5, seed=1, layer=2, step=3)
    b, _ = Fdrop.dropout(x, 0.5, seed=1, layer=2, step=3)
    c, _ = Fdrop.dropout(x, 0.5, seed=1, layer=2, step=4)
    d, _ = Fdrop.dropout(x, 0.5, seed=1, layer=3, step=3)
    assert np.array_equal(_np(a), _np(b))
    assert (_np(a) != _np(c)).mean() > 0.3 and (_np(a) != _np(d)).mean() > 0.3


def test_non_contiguous_input(xp):
    x = _x(xp, (40, 30), "float32").T  # a transposed view
    y, saved = Fdrop.dropout(x, 0.5, seed=0, layer=0, step=0)
    keep = masks.element_mask(x.size, 0.5, seed=0, layer=0, step=0).to_dense().reshape(x.shape)
    np.testing.assert_allclose(_np(y), np.where(keep, _np(x) * 2, 0), rtol=1e-6)


def test_misaligned_contiguous_view(xp):
    base = _x(xp, (1001,), "float16")
    x = base[1:]  # contiguous, but 2 bytes past an aligned address
    y, saved = Fdrop.dropout(x, 0.5, seed=0, layer=0, step=0)
    keep = masks.element_mask(x.size, 0.5, seed=0, layer=0, step=0).to_dense()
    np.testing.assert_allclose(_np(y), np.where(keep, _np(x) * 2, 0), rtol=1e-3)
    g = Fdrop.dropout_backward(base[1:], saved)
    np.testing.assert_allclose(_np(g), np.where(keep, _np(x) * 2, 0), rtol=1e-3)


def test_p0_and_eval_are_identity(xp):
    x = cudrop.Tensor(_x(xp, (3, 4), "float32"), requires_grad=True)
    np.testing.assert_array_equal(_np(cudrop.dropout(x, 0.0)), _np(x))
    layer = nn.Dropout(0.9)
    with cudrop.eval_mode():  # layers decide train versus eval; the op always applies
        assert layer(x) is x and layer.step == 0
    y, saved = Fdrop.dropout(x.data, 0.0)
    assert y is x.data and Fdrop.dropout_backward(x.data, saved) is x.data


def test_layer_advances_step_and_differs_per_layer(xp):
    a, b = nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.5))  # ids by position: 0 and 1
    assert (a.layer, b.layer) == (0, 1)
    x = cudrop.Tensor(_x(xp, (32, 32), "float32"))
    y1, y2, z = _np(a(x)), _np(a(x)), _np(b(x))
    assert a.step == 2 and b.step == 1
    assert (y1 != y2).mean() > 0.3 and (y1 != z).mean() > 0.3
    a.eval()
    assert a(x) is x and a.step == 2


def test_layer_step_is_restored_by_state_dict():
    a = nn.Dropout(0.5, seed=4, layer=7)
    x = cudrop.Tensor(_x(np, (16, 16), "float32"))
    a(x)
    state = a.state_dict()
    want = _np(a(x))
    b = nn.Dropout(0.5, seed=4, layer=7)
    b.load_state_dict(state)
    assert b.step == 1 and np.array_equal(_np(b(x)), want)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_p(xp, p):
    x = xp.ones((2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="p"):
        cudrop.dropout(x, p)
    with pytest.raises(ValueError, match="p"):
        Fdrop.dropout(x, p)
    with pytest.raises(ValueError, match="p"):
        nn.Dropout(p)


def test_bad_dtype_and_seed(xp):
    with pytest.raises(TypeError, match="x must be"):
        Fdrop.dropout(xp.ones((2, 2), dtype=np.int32), 0.5)
    with pytest.raises(ValueError, match="seed"):
        Fdrop.dropout(xp.ones((2, 2)), 0.5, seed=-1)


def test_layer_ids_are_positions_not_a_process_counter():
    """Two models built alike in one process draw the same masks; explicit ids are kept."""
    def build():
        return nn.Sequential(nn.Linear(8, 8, rng=np.random.default_rng(0)), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.5)),
                             nn.Dropout(0.5, layer=9))
    m1, m2 = build(), build()
    ids = [m.layer for m in m1.modules() if isinstance(m, nn.StochasticLayer)]
    assert ids == [0, 1, 9]
    x = cudrop.Tensor(_x(np, (16, 8), "float32"))
    np.testing.assert_array_equal(_np(m1(x)), _np(m2(x)))
