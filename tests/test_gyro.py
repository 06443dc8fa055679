"""Gyro dropout and block-wise gyro dropout: the schedule (Σ sub-networks, each for `period`
consecutive steps; random baseline; Figure 3(b) spanning), forward and backward against the
dense formula with an independently materialised mask, keep rates, eval identity, determinism,
resuming, CPU/GPU bit equality through ``xp``, and argument errors."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import cudrop
from cudrop import backend, masks, philox
from cudrop.variants import gyro_schedule as gyro
from cudrop.variants import gyro as Fg
from cudrop.nn.gyro import BlockwiseDropout, GyroDropout
from cudrop.nn.stochastic import set_step
from conftest import poison_pool

SEED, LAYER = 7, 3


def _np(a):
    return backend.asnumpy(a.data if isinstance(a, cudrop.Tensor) else a)


def _x(xp, shape, seed=0, dtype="float64"):
    # strictly positive: a kept cell is never 0, so y != 0 reads the mask back
    return xp.asarray(np.random.default_rng(seed).uniform(1.0, 2.0, shape).astype(dtype))


def _ref_unit_keep(subnets, n, p, seed=SEED, layer=LAYER):
    """Sub-network masks straight from Philox, without cudrop.gyro."""
    t = np.uint32(philox.threshold(p))
    rows = np.asarray(subnets, np.uint64)[:, None]
    return philox.words(seed, layer, 0, philox.TAG_GYRO, rows, np.arange(n)[None, :]) >= t


def _ref_gyro_dense(shape, subnets, p, ax):
    """(B, ...) bool: row group t of τ contiguous, balanced groups gets sub-network subnets[t]."""
    b, tau = shape[0], len(subnets)
    keep = _ref_unit_keep(subnets, shape[ax], p)
    group = [t for t in range(tau) for _ in range(t * b // tau, (t + 1) * b // tau)]
    rows = keep[group]  # (B, N)
    bshape = [b] + [1] * (len(shape) - 1)
    bshape[ax] = shape[ax]
    return np.broadcast_to(rows.reshape(bshape), shape)


def _ref_block_dense(shape, block, row_ids, p):
    (m, k), (mb, kb) = shape, block
    grid = _ref_unit_keep(row_ids, -(-k // kb), p)
    return np.repeat(np.repeat(grid, mb, axis=0), kb, axis=1)[:m, :k]


# ---- the schedule -------------------------------------------------------------------------

@pytest.mark.parametrize("sigma,tau,period", [(16, 4, 3), (8, 8, 2), (12, 3, 1), (1, 1, 4)])
def test_full_schedule_uses_each_subnet_once_for_period_consecutive_steps(sigma, tau, period):
    cycle = sigma // tau * period
    steps = {}
    for t in range(cycle):
        ids = gyro.scheduled_subnets(t, num_subnets=sigma, co_scheduled=tau, period=period)
        assert len(set(ids.tolist())) == tau
        for s in ids.tolist():
            steps.setdefault(s, []).append(t)
    assert sorted(steps) == list(range(sigma))
    for s, ts in steps.items():
        assert len(ts) == period and ts == list(range(ts[0], ts[0] + period))
    # the next cycle repeats the first
    for t in range(cycle):
        a = gyro.scheduled_subnets(t, num_subnets=sigma, co_scheduled=tau, period=period)
        b = gyro.scheduled_subnets(t + cycle, num_subnets=sigma, co_scheduled=tau, period=period)
        assert np.array_equal(a, b)


def test_layer_trains_exactly_sigma_distinct_masks_and_resumes(xp):
    sigma, tau, period, n, batch = 16, 4, 3, 64, 8
    total = sigma // tau * period
    layer = GyroDropout(0.5, num_subnets=sigma, co_scheduled=tau, total_steps=total, seed=SEED,
                        layer=LAYER)
    assert layer.period == period  # total_steps * τ // Σ
    x = cudrop.Tensor(_x(xp, (batch, n)))
    outs, seen = [], {}
    for t in range(total):
        y = _np(layer(x)) != 0
        outs.append(y)
        for g in range(tau):
            rows = y[g * batch // tau:(g + 1) * batch // tau]
            assert (rows == rows[0]).all()  # one sub-network per row group
            seen.setdefault(rows[0].tobytes(), []).append(t)
    assert len(seen) == sigma  # Σ distinct sub-networks (64 units: distinct w.h.p.)
    for ts in seen.values():
        assert ts == list(range(ts[0], ts[0] + period))
    # resume from a state_dict saved at step 5: the same masks from there on
    fresh = GyroDropout(0.5, num_subnets=sigma, co_scheduled=tau, total_steps=total, seed=SEED,
                        layer=LAYER)
    set_step(layer, 5)
    fresh.load_state_dict(layer.state_dict())
    for t in range(5, total):
        assert np.array_equal(_np(fresh(x)) != 0, outs[t])


def test_random_schedule_is_the_uniform_formula():
    for step in (0, 1, 99, 2**32 - 1):
        ids = gyro.scheduled_subnets(step, num_subnets=1000, co_scheduled=8, schedule="random",
                                     seed=SEED, layer=LAYER)
        u = philox.uniform(SEED, LAYER, step, philox.TAG_SCHEDULE, 8)
        assert ids.tolist() == np.floor(u * 1000).astype(int).tolist()
    a = [tuple(gyro.scheduled_subnets(t, num_subnets=64, co_scheduled=4, schedule="random"))
         for t in range(50)]
    assert len(set(a)) > 45 and all(0 <= s < 64 for ids in a for s in ids)
    # τ need not divide Σ for the random baseline
    assert len(gyro.scheduled_subnets(0, num_subnets=10, co_scheduled=3, schedule="random")) == 3


def test_blockwise_subnets_span_iterations_figure_3b():
    # 2 row blocks per batch, τ = 4: the 4 co-scheduled sub-networks span 2 iterations
    kw = dict(block=(128, 32), num_subnets=16, co_scheduled=4, period=4)
    ids = [gyro.blockwise_row_ids(t, 256, **kw).tolist() for t in range(8)]
    assert ids[:4] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert ids[4:] == [[4, 5], [6, 7], [4, 5], [6, 7]]
    # a ragged batch of 300 rows has 3 row blocks; 8 row blocks with τ = 4 repeat the set
    assert gyro.blockwise_row_ids(1, 300, **kw).tolist() == [3, 0, 1]
    assert gyro.blockwise_row_ids(0, 1024, **kw).tolist() == [0, 1, 2, 3] * 2
    # over a full cycle every sub-network runs
    used = {s for t in range(16) for s in gyro.blockwise_row_ids(t, 256, **kw).tolist()}
    assert used == set(range(16))


def test_period_resolution():
    assert gyro.resolve_period(1024, 8, period=5) == 5
    assert gyro.resolve_period(1024, 8, total_steps=10000) == 78
    assert gyro.resolve_period(1024, 8, total_steps=10) == 1
    assert gyro.resolve_period(1024, 8) == gyro.DEFAULT_PERIOD == 1
    layer = GyroDropout(0.5)  # a working default layer, as make_dropout builds it
    assert (layer.num_subnets, layer.co_scheduled, layer.period) == (1024, 8, 1)
    assert BlockwiseDropout(0.5).block == (128, 32)


# ---- forward and backward against the dense formula ---------------------------------------

@given(tau=st.sampled_from([1, 2, 4]), k=st.integers(1, 5), rest=st.sampled_from(
    [(1,), (7,), (33,), (3, 5), (5, 2, 3)]), p=st.sampled_from([0.1, 0.5, 0.8]),
    step=st.integers(0, 10**6), schedule=st.sampled_from(["consecutive", "random"]),
    ragged=st.booleans())
def test_gyro_forward_backward_equal_dense_formula(xp, tau, k, rest, p, step, schedule, ragged):
    b = tau * k + (1 if ragged and tau > 1 else 0)
    shape = (b,) + rest
    ax = 1 if len(shape) == 4 else len(shape) - 1
    x = cudrop.Tensor(_x(xp, shape, step % 97), requires_grad=True)
    kw = dict(num_subnets=8 * tau, co_scheduled=tau, period=2, schedule=schedule, seed=SEED,
              layer=LAYER, step=step, ragged=ragged)
    poison_pool(xp)
    y = cudrop.gyro_dropout(x, p, **kw)
    subnets = gyro.scheduled_subnets(step, num_subnets=8 * tau, co_scheduled=tau, period=2,
                                     schedule=schedule, seed=SEED, layer=LAYER)
    dense = _ref_gyro_dense(shape, subnets, p, ax)
    np.testing.assert_allclose(_np(y), np.where(dense, _np(x) / (1 - p), 0.0), rtol=1e-14)
    g = _x(xp, shape, 5)
    y.backward(g)
    np.testing.assert_allclose(_np(x.grad), np.where(dense, _np(g) / (1 - p), 0.0), rtol=1e-14)
    mask = gyro.gyro_mask(shape[ax], p, step=step, num_subnets=8 * tau, co_scheduled=tau,
                          period=2, schedule=schedule, seed=SEED, layer=LAYER, xp=xp)
    assert np.array_equal(_np(mask.to_dense(shape, ragged=ragged)), dense)
    cudrop.autograd.check_grad(lambda t: cudrop.gyro_dropout(t, p, **kw), x.data)


@given(m=st.integers(1, 300), k=st.integers(1, 100),
       block=st.sampled_from([(128, 32), (16, 8), (3, 5), (1, 1), (7, 128)]),
       p=st.sampled_from([0.1, 0.5, 0.8]), step=st.integers(0, 10**6),
       tau=st.sampled_from([1, 2, 4]))
def test_blockwise_forward_backward_equal_dense_formula(xp, m, k, block, p, step, tau):
    kw = dict(num_subnets=4 * tau, co_scheduled=tau, period=3, seed=SEED, layer=LAYER)
    x = cudrop.Tensor(_x(xp, (m, k), step % 89), requires_grad=True)
    poison_pool(xp)
    y = cudrop.blockwise_dropout(x, p, block=block, step=step, **kw)
    ids = gyro.blockwise_row_ids(step, m, block=block, **kw)
    dense = _ref_block_dense((m, k), block, ids, p)
    np.testing.assert_allclose(_np(y), np.where(dense, _np(x) / (1 - p), 0.0), rtol=1e-14)
    g = _x(xp, (m, k), 3)
    y.backward(g)
    np.testing.assert_allclose(_np(x.grad), np.where(dense, _np(g) / (1 - p), 0.0), rtol=1e-14)
    mask = gyro.blockwise_mask((m, k), p, step=step, block=block, xp=xp, **kw)
    assert np.array_equal(_np(mask.to_dense()), dense)


def test_blockwise_gradcheck_and_leading_axes(xp):
    x = _x(xp, (3, 50, 40))  # (B, T, D): 150 token rows, ragged in both block axes
    kw = dict(block=(16, 8), num_subnets=8, co_scheduled=4, seed=SEED, layer=LAYER, step=5)
    cudrop.autograd.check_grad(lambda t: cudrop.blockwise_dropout(t, 0.5, **kw), x)
    y = cudrop.blockwise_dropout(x, 0.5, **kw)
    ids = gyro.blockwise_row_ids(5, 150, **{k: v for k, v in kw.items() if k != "step"})
    dense = _ref_block_dense((150, 40), (16, 8), ids, 0.5).reshape(3, 50, 40)
    np.testing.assert_allclose(_np(y), np.where(dense, _np(x) * 2, 0.0), rtol=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_low_precision_and_dropped_cells_are_exact_zeros(xp, dtype):
    x = _x(xp, (8, 64), dtype=dtype)
    x[:, :] = xp.inf
    mask = gyro.gyro_mask(64, 0.5, step=0, num_subnets=8, co_scheduled=4)
    y, saved = Fg.gyro_dropout(x, mask=gyro.GyroMask(xp.asarray(mask.keep), mask.subnets, 0.5))
    assert y.dtype == x.dtype
    keep = mask.to_dense((8, 64))
    assert (_np(y)[~keep] == 0).all() and np.isinf(_np(y)[keep]).all()
    bm = gyro.blockwise_mask((8, 64), 0.5, step=0, block=(4, 8), num_subnets=8, co_scheduled=4,
                             xp=xp)
    yb, _ = cudrop.functional.blockwise_dropout(x, mask=bm)
    keep = _np(bm.to_dense())
    assert yb.dtype == x.dtype and (_np(yb)[~keep] == 0).all() and np.isinf(_np(yb)[keep]).all()


# ---- rates, determinism, devices, layers ---------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rates_within_binomial_bounds(xp, p):
    keep = _np(gyro.subnet_keep(np.arange(256), 512, p, seed=SEED, layer=LAYER, xp=xp))
    n = keep.size
    assert abs(keep.sum() - n * (1 - p)) < 5 * np.sqrt(n * p * (1 - p))
    bm = gyro.blockwise_mask((128 * 64, 32 * 64), p, step=0, num_subnets=64, co_scheduled=64,
                             xp=xp)
    kb = _np(bm.keep_blocks())
    # 64 row blocks run 64 distinct sub-networks: the cells are independent
    assert abs(kb.sum() - kb.size * (1 - p)) < 5 * np.sqrt(kb.size * p * (1 - p))


def test_same_coordinates_same_mask_other_step_other_mask(xp):
    kw = dict(num_subnets=64, co_scheduled=4, period=1)
    x = _x(xp, (8, 256))

    def mask(**over):
        a = {**kw, "seed": SEED, "layer": LAYER, "step": 10, **over}
        return _np(cudrop.gyro_dropout(x, 0.5, **a)) != 0

    assert np.array_equal(mask(), mask())
    assert (mask() != mask(step=11)).mean() > 0.3
    assert (mask() != mask(layer=LAYER + 1)).mean() > 0.3
    assert (mask() != mask(seed=SEED + 1)).mean() > 0.3
    # within a period the set is, by design, the same
    assert np.array_equal(mask(period=4, step=8), mask(period=4, step=11))

    def bmask(step):
        return _np(gyro.blockwise_mask((256, 256), 0.5, step=step, block=(128, 32), xp=xp,
                                       seed=SEED, layer=LAYER, **kw).keep_blocks())
    assert np.array_equal(bmask(3), bmask(3)) and not np.array_equal(bmask(3), bmask(4))


def test_gpu_masks_bit_equal_numpy_reference(xp):
    poison_pool(xp)
    ids = np.array([0, 5, 1023, 77, 5], np.int64)
    for n, p in ((1, 0.5), (333, 0.3), (4096, 0.5), (70, 0.0)):
        got = gyro.subnet_keep(ids, n, p, seed=SEED, layer=LAYER, xp=xp)
        assert backend.get_array_module(got) is xp
        np.testing.assert_array_equal(_np(got), _ref_unit_keep(ids, n, p))
    kw = dict(step=123, block=(128, 32), seed=SEED, layer=LAYER, num_subnets=32, co_scheduled=8)
    got = gyro.blockwise_mask((1000, 300), 0.4, xp=xp, **kw)
    ref = gyro.blockwise_mask((1000, 300), 0.4, **kw)
    for f in ("bits", "row_count", "row_index", "col_count", "col_index"):
        np.testing.assert_array_equal(_np(getattr(got, f)), getattr(ref, f), err_msg=f)


def test_layers_eval_identity_and_p_zero(xp):
    x = cudrop.Tensor(_x(xp, (8, 16)))
    for layer in (GyroDropout(0.5, num_subnets=8, co_scheduled=4),
                  BlockwiseDropout(0.5, num_subnets=8, co_scheduled=4)):
        layer.eval()
        assert layer(x) is x and layer.step == 0
        with cudrop.eval_mode():
            assert layer.train()(x) is x and layer.step == 0
    assert GyroDropout(0.0)(x) is x and BlockwiseDropout(0.0)(x) is x


def test_layers_match_the_functional_ops_across_set_changes(xp):
    # On NumPy the layers memoise a set's mask; that must never change a result. On CuPy
    # GyroDropout decides its mask on the device (eagerly too) while the op given an int step
    # draws it on the host: the outputs are equal, and so is last_mask's host form.
    kw = dict(num_subnets=16, co_scheduled=4, period=2, seed=SEED)
    g = GyroDropout(0.5, layer=LAYER, **kw)
    b = BlockwiseDropout(0.5, layer=LAYER, block=(4, 8), **kw)
    r = GyroDropout(0.5, layer=LAYER, schedule="random", **kw)
    x = cudrop.Tensor(_x(xp, (8, 40)))
    for t in range(7):
        want = cudrop.gyro_dropout(x, 0.5, layer=LAYER, step=t, **kw)
        assert np.array_equal(_np(g(x)), _np(want))
        assert g.last_mask.on_device == (xp is not np)
        host, ref = g.last_mask.host(), gyro.gyro_mask(40, 0.5, step=t, layer=LAYER, **kw)
        assert host.subnets == ref.subnets and backend.get_array_module(host.keep) is xp
        np.testing.assert_array_equal(_np(host.keep), ref.keep)
        want = cudrop.blockwise_dropout(x, 0.5, layer=LAYER, step=t,
                                        block=(4, 8), **kw)
        got = b(x)
        assert np.array_equal(_np(got), _np(want))
        assert isinstance(b.last_mask, masks.BlockMask) and b.last_mask.shape == (8, 40)
        want = cudrop.gyro_dropout(x, 0.5, layer=LAYER, step=t,
                                   schedule="random", **kw)
        assert np.array_equal(_np(r(x)), _np(want))
    assert g.step == b.step == r.step == 7


def test_conv_channels_are_units_and_ragged_batch(xp):
    layer = GyroDropout(0.5, num_subnets=8, co_scheduled=2, seed=SEED, layer=LAYER)
    y = _np(layer(cudrop.Tensor(_x(xp, (4, 6, 3, 3))))) != 0
    assert (y == y[:, :, :1, :1]).all()  # a channel is kept or dropped whole
    assert (y[0] == y[1]).all() and (y[2] == y[3]).all()
    with pytest.raises(ValueError, match=r"co_scheduled \(τ = 2\).*batch size \(5\)"):
        layer(cudrop.Tensor(_x(xp, (5, 6))))
    ragged = GyroDropout(0.5, num_subnets=8, co_scheduled=4, ragged=True)
    y = _np(ragged(cudrop.Tensor(_x(xp, (3, 64))))) != 0  # B < τ: 3 of the 4 groups have a row
    assert y.shape == (3, 64)


# ---- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_p(xp, p):
    x = xp.ones((8, 8))
    with pytest.raises(ValueError, match="p"):
        GyroDropout(p)
    with pytest.raises(ValueError, match="p"):
        BlockwiseDropout(p)
    with pytest.raises(ValueError, match="p"):
        cudrop.gyro_dropout(x, p)
    with pytest.raises(ValueError, match="p"):
        cudrop.blockwise_dropout(x, p)
    with pytest.raises(ValueError, match="p"):
        gyro.gyro_mask(8, p, step=0)


def test_bad_subnet_counts_and_period():
    for cls in (GyroDropout, BlockwiseDropout):
        with pytest.raises(ValueError, match=r"co_scheduled \(τ = 16\) must be <= num_subnets"):
            cls(0.5, num_subnets=8, co_scheduled=16)
        with pytest.raises(ValueError, match=r"co_scheduled \(τ = 3\) must divide num_subnets"):
            cls(0.5, num_subnets=8, co_scheduled=3)
        with pytest.raises(ValueError, match="num_subnets"):
            cls(0.5, num_subnets=0)
        with pytest.raises(ValueError, match="co_scheduled"):
            cls(0.5, co_scheduled=0)
        with pytest.raises(ValueError, match="period"):
            cls(0.5, period=0)
        with pytest.raises(ValueError, match="total_steps"):
            cls(0.5, total_steps=-5)
        with pytest.raises(ValueError, match="schedule"):
            cls(0.5, schedule="roundrobin")
    with pytest.raises(ValueError, match="must be <= num_subnets"):
        gyro.scheduled_subnets(0, num_subnets=2, co_scheduled=3, schedule="random")
    with pytest.raises(ValueError, match="must divide num_subnets"):
        cudrop.gyro_dropout(np.ones((6, 4)), 0.5, num_subnets=8, co_scheduled=3)


def test_batch_not_divisible_by_tau():
    x = np.ones((10, 4))
    with pytest.raises(ValueError, match=r"τ = 4\) must divide the batch size \(10\)"):
        cudrop.gyro_dropout(x, 0.5, num_subnets=8, co_scheduled=4)
    y = cudrop.gyro_dropout(x, 0.5, num_subnets=8, co_scheduled=4, ragged=True)
    assert y.shape == (10, 4)
    # block-wise needs no divisibility: ragged row blocks are partial
    assert cudrop.blockwise_dropout(x, 0.5, block=(3, 3)).shape == (10, 4)


@pytest.mark.parametrize("block", [(0, 32), (128, 0), (-1, 4), (2.5, 4), (128,), (1, 2, 3), 128,
                                   (True, 4)])
def test_bad_block(block):
    with pytest.raises(ValueError, match="block"):
        BlockwiseDropout(0.5, block=block)
    with pytest.raises(ValueError, match="block"):
        cudrop.blockwise_dropout(np.ones((4, 4)), 0.5, block=block)
    with pytest.raises(ValueError, match="block"):
        gyro.blockwise_mask((4, 4), 0.5, step=0, block=block)


def test_bad_shapes_and_masks(xp):
    with pytest.raises(ValueError, match="ndim >= 2"):
        cudrop.gyro_dropout(xp.ones(8), 0.5, co_scheduled=1, num_subnets=1)
    with pytest.raises(ValueError, match="rows, units"):
        cudrop.blockwise_dropout(xp.ones(8), 0.5)
    with pytest.raises(ValueError, match="unit_axis"):
        cudrop.gyro_dropout(xp.ones((8, 4)), 0.5, unit_axis=0)
    mask = gyro.gyro_mask(5, 0.5, step=0, num_subnets=8, co_scheduled=4, xp=xp)
    with pytest.raises(ValueError, match="units"):
        Fg.gyro_dropout(xp.ones((8, 4)), mask=mask)
    bm = gyro.blockwise_mask((8, 4), 0.5, step=0, xp=xp)
    with pytest.raises(ValueError, match="shape"):
        cudrop.functional.blockwise_dropout(xp.ones((8, 5)), mask=bm)
    with pytest.raises(TypeError, match="float16"):
        cudrop.functional.blockwise_dropout(xp.ones((8, 4), dtype=np.int32), mask=bm)
    with pytest.raises(TypeError, match="BlockMask"):
        cudrop.functional.blockwise_dropout(xp.ones((8, 4)), mask=mask)
