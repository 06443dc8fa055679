"""SliceOut: the slice draw (keep count, wrap-around and aligned starts, determinism), every op
against the dense formula with the materialised mask (forward and all gradients, exact zeros in
the dropped parts of the parameter gradients), the op convention (drawing inside the op equals
passing draw_mask's mask; p, mask and unit-count checks), the skipping itself (the products
that run and their FLOPs), the layers (train vs eval, step counter) and the argument errors.

Every array test takes the ``xp`` fixture, so it also runs on CuPy on a GPU machine.
"""
import math

import numpy as np

from cudrop.nn import sliceout as nn_sliceout
import pytest
from hypothesis import given, strategies as st

import cudrop as cd
from cudrop import autograd as ag
from cudrop import backend, philox
from cudrop.autograd import Tensor, check_grad
from cudrop.functional import _conv as fconv
from cudrop.variants import sliceout as F
from cudrop.nn import Conv2d, Linear, MultiHeadAttention
from cudrop.nn.sliceout import (SliceOut, SliceOutConv2d, SliceOutLinear,
                                SliceOutMultiHeadAttention)

host = backend.asnumpy

# Hand-picked kept sets: a wrapped slice (two ranges), an interior one, everything, one unit.
FIXED = [(10, ((7, 10), (0, 3))), (10, ((4, 9),)), (6, ((0, 6),)), (7, ((6, 7),)),
         (7, ((5, 7), (0, 1)))]


def mk(n, ranges):
    """The SliceMask keeping ``ranges`` of ``n`` units."""
    return F.SliceMask.from_ranges(n, ranges)


@st.composite
def slices(draw, max_n=8):
    """A SliceMask: a wrapped slice (two ranges), one interior range, or every unit."""
    n = draw(st.integers(1, max_n))
    kinds = ["wrap", "range", "all"][(n < 3) + (n < 2):]
    kind = draw(st.sampled_from(kinds))
    if kind == "all":
        return mk(n, F.slice_ranges(n, n, draw(st.integers(0, n - 1))))
    keep = draw(st.integers(2 if kind == "wrap" else 1, n - 1))
    start = draw(st.integers(n - keep + 1, n - 1) if kind == "wrap" else st.integers(0, n - keep))
    return mk(n, F.slice_ranges(n, keep, start))


# 0.999 quantiles of chi-square with 1..10 degrees of freedom (no SciPy on the GPU machine).
_CHI2_999 = [10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588]


def uniform_counts(counts):
    """Pearson's chi-square test of equal cell probabilities at the 0.1% level."""
    counts = np.asarray(counts, dtype=np.float64)
    expected = counts.sum() / len(counts)
    return ((counts - expected) ** 2 / expected).sum() < _CHI2_999[len(counts) - 2]


def normal(xp, rng, shape):
    return xp.asarray(rng.standard_normal(shape))


def scaled_mask(xp, mask):
    """The materialised m / q with q = keep / n, in float64 (counted here, not mask.scale)."""
    m = mask.to_dense(np, np.float64)
    return xp.asarray(m * mask.n_units / m.sum())


def close(a, b, rtol=1e-10, atol=1e-12):
    np.testing.assert_allclose(host(a.data if isinstance(a, Tensor) else a),
                               host(b.data if isinstance(b, Tensor) else b), rtol=rtol, atol=atol)


def run(fn, arrays, cot):
    """Forward ``fn`` on fresh leaves, backward with ``cot``: (output, grads)."""
    ts = [Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*ts)
    out.backward(cot)
    return out.data, [t.grad for t in ts]


def compare(xp, rng, fn, dense, arrays):
    """``fn`` and ``dense`` agree in value and in every input gradient (one random cotangent)."""
    with ag.no_grad():
        shape = fn(*[Tensor(a) for a in arrays]).shape
    cot = normal(xp, rng, shape)
    out, grads = run(fn, arrays, cot)
    ref, ref_grads = run(dense, arrays, cot)
    close(out, ref)
    for g, r in zip(grads, ref_grads):
        close(g, r)
    return out, grads


def opt(*arrays):
    return [a for a in arrays if a is not None]


def dropped(mask):
    return ~mask.to_dense()


def draw_ranges(n, p, **coords):
    return F.draw_mask(n, p, **coords).ranges


# ---- the slice draw -----------------------------------------------------------------------

@given(n=st.integers(1, 300), p=st.floats(0, 0.999))
def test_keep_count_is_rounded_keep_fraction(n, p):
    keep = F.keep_count(n, p)
    assert keep == min(n, max(1, math.floor((1 - p) * n + 0.5)))
    mask = F.draw_mask(n, p, seed=1, layer=2, step=3)
    assert sum(hi - lo for lo, hi in mask.ranges) == keep == mask.keep
    assert mask.to_dense().sum() == keep and mask.scale == n / keep
    assert (mask.n_units, mask.p, mask.align) == (n, p, None)


def test_keep_count_examples():
    assert F.keep_count(10, 0.5) == 5
    assert F.keep_count(5, 0.5) == 3  # 2.5 rounds up
    assert F.keep_count(10, 0.0) == 10
    assert F.keep_count(10, 0.99) == 1  # never an empty slice


@given(n=st.integers(1, 50), keep=st.integers(1, 50), start=st.integers(0, 49))
def test_slice_ranges_are_contiguous_with_wrap(n, keep, start):
    keep, start = min(keep, n), start % n
    ranges = F.slice_ranges(n, keep, start)
    idx = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
    expected = np.arange(start, start + keep) % n if keep < n else np.arange(n)
    assert idx.tolist() == expected.tolist()
    assert len(ranges) == (2 if keep < n and start + keep > n else 1)


def test_slice_start_is_the_documented_philox_draw():
    for step in range(50):
        for n, keep, align in ((7, 3, None), (1000, 400, None), (21, 11, 8), (64, 32, 16)):
            count = F.num_starts(n, keep, align)
            u = philox.uniform(9, 4, step, philox.TAG_SLICE, 1)[0]
            idx = int(math.floor(u * count))
            assert F.slice_start(n, keep, seed=9, layer=4, step=step, align=align) == \
                idx * (align or 1)


def test_wrap_starts_are_uniform_and_units_kept_keep_over_n():
    n, keep, steps = 7, 3, 3500
    starts = [F.slice_start(n, keep, seed=5, layer=1, step=s) for s in range(steps)]
    counts = np.bincount(starts, minlength=n)
    assert counts.min() > 0 and len(counts) == n
    assert uniform_counts(counts)
    # Each unit is kept with probability exactly keep / n under wrap-around.
    kept = np.zeros(n)
    for s in starts:
        kept += mk(n, F.slice_ranges(n, keep, s)).to_dense()
    assert uniform_counts(kept)
    assert np.allclose(kept / steps, keep / n, atol=0.03)


@pytest.mark.parametrize("n, align, p", [(20, 4, 0.5), (256, 32, 0.1), (64, 8, 0.7)])
def test_aligned_slices_wrap_blockwise_and_keep_units_uniformly(n, align, p):
    keep = F.keep_count(n, p, align)
    assert keep % align == 0 and F.num_starts(n, keep, align) == n // align
    steps = 400 * (n // align)
    starts, kept = [], np.zeros(n)
    for s in range(steps):
        mask = F.draw_mask(n, p, seed=3, layer=7, step=s, align=align)
        ranges = mask.ranges
        assert all(lo % align == 0 and hi % align == 0 for lo, hi in ranges)
        assert sum(hi - lo for lo, hi in ranges) == keep
        starts.append(ranges[0][0])
        kept += mask.to_dense()
    values, counts = np.unique(starts, return_counts=True)
    assert values.tolist() == list(range(0, n, align)) and uniform_counts(counts)
    assert np.allclose(kept / steps, keep / n, atol=0.04)  # unbiased per unit


@pytest.mark.parametrize("n, align, p, valid", [
    (21, 8, 0.5, [0, 8]),         # keep = 8, n not a multiple of align
    (70, 32, 0.75, [0, 32]),      # keep = 32 (17.5 units round to one block)
    (13, 3, 0.3, [0, 3]),         # keep = 9
])
def test_aligned_starts_are_uniform_multiples_without_wrap(n, align, p, valid):
    keep = F.keep_count(n, p, align)
    assert keep % align == 0 and keep >= align
    assert F.num_starts(n, keep, align) == len(valid)
    seen = []
    for s in range(200 * len(valid)):
        ranges = draw_ranges(n, p, seed=3, layer=7, step=s, align=align)
        assert len(ranges) == 1
        (lo, hi), = ranges
        assert lo % align == 0 and hi - lo == keep and hi <= n
        seen.append(lo)
    values, counts = np.unique(seen, return_counts=True)
    assert values.tolist() == valid
    assert uniform_counts(counts)


def test_aligned_keep_counts_and_auto_align():
    assert F.keep_count(4096, 0.5, 32) == 2048 and F.keep_count(100, 0.5, 32) == 64
    assert F.keep_count(100, 0.0, 32) == 100  # p == 0 keeps every unit, aligned or not
    assert F.keep_count(50, 0.99, 8) == 8     # at least one block
    assert [F.auto_align(n) for n in (4096, 256, 200, 64, 16, 10)] == [32, 32, 8, 8, None, None]
    layer = nn_sliceout.SliceOutLinear(256, 8, p=0.5)
    assert layer.align == 32
    assert nn_sliceout.SliceOutLinear(256, 8, p=0.5, align=None).align is None


def test_same_coordinates_same_slice_and_steps_differ():
    n = 16
    draw = lambda seed=0, layer=0, step=0: draw_ranges(n, 0.5, seed=seed, layer=layer, step=step)
    assert all(draw(step=s) == draw(step=s) for s in range(20))
    per_step = [draw(step=s) for s in range(400)]
    assert np.mean([a == b for a, b in zip(per_step, per_step[1:])]) < 0.15  # expect 1/16
    assert np.mean([draw(step=s) == draw(step=s, layer=1) for s in range(400)]) < 0.15
    assert np.mean([draw(step=s) == draw(step=s, seed=1) for s in range(400)]) < 0.15


# ---- ops against the dense formula --------------------------------------------------------

@given(sl=slices(), lead=st.sampled_from([(3,), (1,), (2, 3), ()]),
       axis=st.sampled_from(["last", "first"]), seed=st.integers(0, 2**16))
def test_sliceout_is_mask_times_x(xp, sl, lead, axis, seed):
    n = sl.n_units
    rng = np.random.default_rng(seed)
    shape, ax = (lead + (n,), -1) if axis == "last" else ((n,) + lead, 0)
    x = normal(xp, rng, shape)
    mq = scaled_mask(xp, sl).reshape((n,) + (1,) * len(lead) if ax == 0 else (n,))
    fn = lambda x_: ag.sliceout(x_, mask=sl, axis=ax)
    y, (gx,) = compare(xp, rng, fn, lambda x_: x_ * mq, [x])
    off = dropped(sl)
    assert (np.moveaxis(host(y), ax, 0)[off] == 0).all()
    assert (np.moveaxis(host(gx), ax, 0)[off] == 0).all()
    check_grad(fn, x)


@pytest.mark.parametrize("n, ranges", FIXED)
def test_sliceout_channels_of_nchw(xp, n, ranges):
    x = normal(xp, np.random.default_rng(0), (2, n, 3, 2))
    mask = mk(n, ranges)
    y = ag.sliceout(x, mask=mask, axis=1)
    close(y, x * scaled_mask(xp, mask)[None, :, None, None])
    assert (host(y.data)[:, dropped(mask)] == 0).all()


@given(sl=slices(), m=st.integers(1, 4), n_out=st.integers(1, 5), bias=st.booleans(),
       three_d=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_input_slicing_matches_dense(xp, sl, m, n_out, bias, three_d, seed):
    k = sl.n_units
    rng = np.random.default_rng(seed)
    x = normal(xp, rng, (2, m, k) if three_d else (m, k))
    w = normal(xp, rng, (k, n_out))
    b = normal(xp, rng, (n_out,)) if bias else None
    mq = scaled_mask(xp, sl)
    fn = lambda x_, w_, *b_: ag.sliceout_linear(x_, w_, b_[0] if b_ else None, mask=sl)
    dense = lambda x_, w_, *b_: ((x_ * mq) @ w_ + b_[0]) if b_ else (x_ * mq) @ w_
    _, (gx, gw, *_) = compare(xp, rng, fn, dense, opt(x, w, b))
    off = dropped(sl)
    assert (host(gw)[off] == 0).all()  # exact zeros, not just small
    assert (host(gx)[..., off] == 0).all()
    check_grad(fn, *opt(x, w, b))


@given(sl=slices(), m=st.integers(1, 4), k=st.integers(1, 5), bias=st.booleans(),
       three_d=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_output_slicing_matches_dense(xp, sl, m, k, bias, three_d, seed):
    n = sl.n_units
    rng = np.random.default_rng(seed)
    x = normal(xp, rng, (2, m, k) if three_d else (m, k))
    w = normal(xp, rng, (k, n))
    b = normal(xp, rng, (n,)) if bias else None
    mq = scaled_mask(xp, sl)
    fn = lambda x_, w_, *b_: ag.sliceout_linear_out(x_, w_, b_[0] if b_ else None, mask=sl)
    dense = lambda x_, w_, *b_: ((x_ @ w_ + b_[0]) * mq) if b_ else (x_ @ w_) * mq
    y, (gx, gw, *gb) = compare(xp, rng, fn, dense, opt(x, w, b))
    off = dropped(sl)
    assert (host(y)[..., off] == 0).all()
    assert (host(gw)[:, off] == 0).all()
    if bias:
        assert (host(gb[0])[off] == 0).all()
    check_grad(fn, *opt(x, w, b))


def selection(xp, mask):
    """The (keep, n) 0/1 float64 matrix that embeds a mask's kept units in all n (row j: the
    j-th kept unit), counted here from the ranges."""
    kept = [u for lo, hi in mask.ranges for u in range(lo, hi)]
    sel = np.zeros((len(kept), mask.n_units))
    sel[np.arange(len(kept)), kept] = 1.0
    return xp.asarray(sel)


@given(sl_in=st.none() | slices(), sl_out=st.none() | slices(), m=st.integers(1, 4),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_compact_matches_dense(xp, sl_in, sl_out, m, bias, seed):
    """sliceout_linear_compact on the kept units equals the dense Linear of the full
    activation with the input mask applied (m / q), restricted to the kept output units;
    every gradient too, and the weight and bias gradients are exact zeros outside the block."""
    rng = np.random.default_rng(seed)
    k = 5 if sl_in is None else sl_in.n_units
    n = 4 if sl_out is None else sl_out.n_units
    x = normal(xp, rng, (m, k if sl_in is None else sl_in.keep))
    w = normal(xp, rng, (k, n))
    b = normal(xp, rng, (n,)) if bias else None
    p_in = None if sl_in is None else selection(xp, sl_in)
    p_out = None if sl_out is None else selection(xp, sl_out)
    mq = None if sl_in is None else scaled_mask(xp, sl_in)

    def dense(x_, w_, *b_):
        h = x_ if p_in is None else (x_ @ p_in) * mq  # the full activation, dropped and scaled
        y = h @ w_ + b_[0] if b_ else h @ w_
        return y if p_out is None else y @ p_out.T  # its kept output units

    fn = lambda x_, w_, *b_: ag.sliceout_linear_compact(  # noqa: E731
        x_, w_, b_[0] if b_ else None, in_mask=sl_in, out_mask=sl_out)
    _, (gx, gw, *gb) = compare(xp, rng, fn, dense, opt(x, w, b))
    if sl_in is not None:
        assert (host(gw)[dropped(sl_in)] == 0).all()
    if sl_out is not None:
        assert (host(gw)[:, dropped(sl_out)] == 0).all()
        if bias:
            assert (host(gb[0])[dropped(sl_out)] == 0).all()
    check_grad(fn, *opt(x, w, b))


def test_linear_compact_rejects_mismatched_masks_and_widths():
    x, w = np.zeros((2, 3)), np.zeros((6, 4))
    half = mk(6, ((0, 3),))
    with pytest.raises(ValueError, match="in_mask must be a SliceMask over w's 6 input"):
        F.sliceout_linear_compact(x, w, in_mask=mk(5, ((0, 3),)))
    with pytest.raises(ValueError, match="out_mask must be a SliceMask over w's 4 output"):
        F.sliceout_linear_compact(x, w, in_mask=half, out_mask=half)
    with pytest.raises(ValueError, match="x must hold 6 features"):
        F.sliceout_linear_compact(x, w)
    with pytest.raises(ValueError, match="gy must have the output's shape"):
        _, saved = F.sliceout_linear_compact(x, w, in_mask=half)
        F.sliceout_linear_compact_backward(np.zeros((2, 3)), saved)


def test_linear_compact_gemms_run_on_the_kept_block_only(xp, rec):
    """A hidden layer between two slices: every product is kept_in x kept_out sized."""
    m, k, n = 6, 40, 24
    s_in, s_out = mk(k, ((30, 40), (0, 10))), mk(n, ((4, 16),))
    rng = np.random.default_rng(0)
    _fwd_bwd(lambda x, w: ag.sliceout_linear_compact(x, w, None, in_mask=s_in, out_mask=s_out),
             normal(xp, rng, (m, s_in.keep)), normal(xp, rng, (k, n)))
    assert len(rec.shapes) == 3
    assert rec.flops() == 3 * 2 * m * s_in.keep * s_out.keep


@pytest.mark.parametrize("hidden,align", [((48, 40), None), ((64, 64, 64), 8)])
def test_chain_equals_the_plain_sequential(xp, hidden, align):
    """models.mlp(dropout='sliceout') is a SliceOutChain: trained with compact activations it
    gives the plain Sequential's losses and gradients (the same masks: each SliceOutLinear
    draws its own) over several steps, and eval mode is the same dense network."""
    from cudrop import models, nn

    def build():
        model = models.mlp(12, 5, hidden=hidden, dropout="sliceout", p=0.5, seed=3,
                           dtype=np.float64)
        if align is not None:
            for m in model:
                if isinstance(m, SliceOutLinear):
                    m.align = align
        return model.to("gpu" if xp is not np else "cpu")

    chain = build()
    assert isinstance(chain, nn.SliceOutChain)
    plain = nn.Sequential(*list(build()))
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = normal(xp, rng, (7, 12))
        y = xp.asarray(rng.integers(0, 5, 7))
        losses = []
        for model in (chain, plain):
            model.zero_grad()
            loss = cd.cross_entropy(model(Tensor(x)), y)
            loss.backward()
            losses.append(float(loss.data))
        np.testing.assert_allclose(losses[0], losses[1], rtol=1e-12)
        for (name, a), (_, b) in zip(chain.named_parameters(), plain.named_parameters()):
            close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert [m.step for m in chain if isinstance(m, SliceOutLinear)] == [3] * len(hidden)
    chain.eval()
    plain.eval()
    x = normal(xp, rng, (4, 12))
    close(chain(Tensor(x)), plain(Tensor(x)))


def test_chain_rejects_layers_that_cannot_run_on_compact_activations():
    from cudrop import nn
    with pytest.raises(TypeError, match="layer 2 is a LayerNorm"):
        nn.SliceOutChain(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4), SliceOutLinear(4, 2))
    with pytest.raises(ValueError, match="mode 'output'"):
        nn.SliceOutChain(nn.Linear(4, 4), SliceOutLinear(4, 2, mode="output"))
    with pytest.raises(ValueError, match="no Linear"):
        nn.SliceOutChain(nn.ReLU())
    with pytest.raises(ValueError, match="the first Linear .layer 0. is a SliceOutLinear"):
        nn.SliceOutChain(SliceOutLinear(8, 4), nn.ReLU(), SliceOutLinear(4, 2))


@given(sl=slices(max_n=6), nb=st.integers(1, 2), c=st.integers(1, 3), hw=st.integers(3, 5),
       ksize=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 1),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv2d_output_channel_slicing_matches_dense(xp, sl, nb, c, hw, ksize, stride, padding,
                                                     bias, seed):
    o = sl.n_units
    rng = np.random.default_rng(seed)
    x = normal(xp, rng, (nb, c, hw, hw + 1))
    w = normal(xp, rng, (o, c, ksize, ksize))
    b = normal(xp, rng, (o,)) if bias else None
    mq = scaled_mask(xp, sl)[None, :, None, None]
    fn = lambda x_, w_, *b_: ag.sliceout_conv2d(x_, w_, b_[0] if b_ else None, mask=sl,
                                                stride=stride, padding=padding)
    dense = lambda x_, w_, *b_: ag.conv2d(x_, w_, b_[0] if b_ else None, stride, padding) * mq
    y, (gx, gw, *gb) = compare(xp, rng, fn, dense, opt(x, w, b))
    off = dropped(sl)
    assert (host(y)[:, off] == 0).all()
    assert (host(gw)[off] == 0).all()
    if bias:
        assert (host(gb[0])[off] == 0).all()
    check_grad(fn, *opt(x, w, b))


@pytest.mark.parametrize("n, ranges", FIXED)
def test_hand_picked_slices_match_dense(xp, n, ranges):
    rng = np.random.default_rng(n)
    mask = mk(n, ranges)
    mq = scaled_mask(xp, mask)
    args = [normal(xp, rng, s) for s in ((3, n), (n, 4), (4,))]
    compare(xp, rng, lambda x, w, b: ag.sliceout_linear(x, w, b, mask=mask),
            lambda x, w, b: (x * mq) @ w + b, args)
    args = [normal(xp, rng, s) for s in ((3, 4), (4, n), (n,))]
    compare(xp, rng, lambda x, w, b: ag.sliceout_linear_out(x, w, b, mask=mask),
            lambda x, w, b: (x @ w + b) * mq, args)
    args = [normal(xp, rng, s) for s in ((2, 3, 4, 4), (n, 3, 3, 3), (n,))]
    compare(xp, rng, lambda x, w, b: ag.sliceout_conv2d(x, w, b, mask=mask, padding=1),
            lambda x, w, b: ag.conv2d(x, w, b, 1, 1) * mq[None, :, None, None], args)


def dense_attention(x, wq, bq, wp, bp, heads, head_mq, causal):
    """Multi-head self-attention from autograd ops, head outputs scaled by ``head_mq``."""
    bsz, t, d = x.shape
    hd = d // heads
    qkv = x @ wq if bq is None else x @ wq + bq
    qkv = ag.transpose(ag.reshape(qkv, (bsz, t, 3, heads, hd)), (2, 0, 3, 1, 4))
    q, k, v = qkv[0], qkv[1], qkv[2]
    s = ag.matmul(q, ag.transpose(k, (0, 1, 3, 2))) * (1.0 / math.sqrt(hd))
    if causal:
        s = s + x.xp.asarray(np.triu(np.full((t, t), np.finfo(np.float64).min / 2), k=1))
    o = ag.matmul(ag.softmax(s, axis=-1), v) * head_mq.reshape(1, heads, 1, 1)
    y = ag.reshape(ag.transpose(o, (0, 2, 1, 3)), (bsz, t, d)) @ wp
    return y if bp is None else y + bp


@given(sl=slices(max_n=4), bsz=st.integers(1, 2), t=st.integers(1, 4), hd=st.integers(1, 3),
       causal=st.booleans(), biases=st.booleans(), seed=st.integers(0, 2**16))
def test_attention_head_slicing_matches_dense(xp, sl, bsz, t, hd, causal, biases, seed):
    heads = sl.n_units
    d = heads * hd
    rng = np.random.default_rng(seed)
    x = normal(xp, rng, (bsz, t, d))
    wq, wp = normal(xp, rng, (d, 3 * d)), normal(xp, rng, (d, d))
    bq = normal(xp, rng, (3 * d,)) if biases else None
    bp = normal(xp, rng, (d,)) if biases else None
    mq = scaled_mask(xp, sl)

    def split(a):
        return (a[0], a[1], a[2], a[3], a[4]) if biases else (a[0], a[1], None, a[2], None)

    fn = lambda *a: ag.sliceout_attention(*split(a), mask=sl, causal=causal)
    dense = lambda *a: dense_attention(*split(a), heads, mq, causal)
    _, grads = compare(xp, rng, fn, dense, opt(x, wq, bq, wp, bp))
    gwq, gwp = host(grads[1]), host(grads[3 if biases else 2])
    off_heads = dropped(sl)
    off = np.repeat(off_heads, hd)  # per feature of one of q, k, v
    assert (gwq[:, np.tile(off, 3)] == 0).all()
    assert (gwp[off] == 0).all()
    if biases:
        assert (host(grads[2])[np.tile(off, 3)] == 0).all()
    check_grad(fn, *opt(x, wq, bq, wp, bp))


def test_attention_layer_keeping_every_head_is_multi_head_attention(xp):
    dev = "cpu" if xp is np else "gpu"
    for causal in (False, True):
        so = SliceOutMultiHeadAttention(8, 4, p=0.0, causal=causal, rng=3).to(dev, np.float64)
        ref = MultiHeadAttention(8, 4, causal=causal, rng=3).to(dev, np.float64)
        x = normal(xp, np.random.default_rng(1), (2, 5, 8))
        close(so(Tensor(x)), ref(Tensor(x)))
        assert so.last_mask.ranges == ((0, 4),)


# ---- the skipping -------------------------------------------------------------------------

class Recorder:
    """Wraps a matmul and records its operand shapes."""

    def __init__(self, real):
        self.real, self.shapes = real, []

    def __call__(self, a, b):
        self.shapes.append((a.shape, b.shape))
        return self.real(a, b)

    def flops(self):
        total = 0
        for sa, sb in self.shapes:
            batch = int(np.prod(np.broadcast_shapes(sa[:-2], sb[:-2]), dtype=np.int64))
            total += 2 * batch * sa[-2] * sa[-1] * sb[-1]
        return total


@pytest.fixture
def rec(monkeypatch):
    """Records the products of the SliceOut ops and of the Linear and attention pairs they
    call."""
    from cudrop.functional import _act, _attention
    r = Recorder(F.matmul)
    monkeypatch.setattr(F, "matmul", r)
    monkeypatch.setattr(_act, "matmul", r)
    monkeypatch.setattr(_attention, "matmul", r)
    return r


def _fwd_bwd(fn, *arrays):
    ts = [Tensor(a, requires_grad=True) for a in arrays]
    y = fn(*ts)
    y.backward(y.xp.ones(y.shape))
    return y


@pytest.mark.parametrize("align", [None, 8])
def test_linear_input_gemms_run_on_kept_rows_only(xp, rec, align):
    m, k, n, p = 6, 40, 5, 0.5
    mask = F.draw_mask(k, p, seed=0, layer=0, step=1, align=align)
    if align is None:
        mask = mk(k, ((30, 40), (0, 10)))  # force a wrapped slice: two pieces
    keep = mask.keep
    rng = np.random.default_rng(0)
    _fwd_bwd(lambda x, w: ag.sliceout_linear(x, w, None, mask=mask),
             normal(xp, rng, (m, k)), normal(xp, rng, (k, n)))
    # Forward x_S @ w_S, backward g @ w_S^T and x_S^T @ g: each on the kept K only, one GEMM
    # per product even for a wrapped slice (its pieces are gathered into one operand).
    assert len(rec.shapes) == 3
    assert all(k not in sa + sb for sa, sb in rec.shapes)  # no product sees the full K
    assert rec.flops() == 3 * 2 * m * keep * n == 3 * 2 * m * k * n * keep // k


@pytest.mark.parametrize("ranges", [((3, 9),), ((10, 12), (0, 4))])
def test_linear_output_gemms_run_on_kept_columns_only(xp, rec, ranges):
    m, k, n = 4, 7, 12
    keep = sum(hi - lo for lo, hi in ranges)
    rng = np.random.default_rng(0)
    _fwd_bwd(lambda x, w, b: ag.sliceout_linear_out(x, w, b, mask=mk(n, ranges)),
             normal(xp, rng, (m, k)), normal(xp, rng, (k, n)), normal(xp, rng, (n,)))
    assert rec.flops() == 3 * 2 * m * k * keep
    assert all(n not in sa + sb for sa, sb in rec.shapes)  # no product sees the full N


@pytest.mark.parametrize("ranges", [((2, 5),), ((6, 8), (0, 1))])
def test_conv_gemms_run_on_kept_channels_only(xp, monkeypatch, ranges):
    r = Recorder(fconv.matmul)
    monkeypatch.setattr(fconv, "matmul", r)
    nb, c, o, hw, ks = 2, 3, 8, 5, 3
    keep = sum(hi - lo for lo, hi in ranges)
    rng = np.random.default_rng(0)
    _fwd_bwd(lambda x, w: ag.sliceout_conv2d(x, w, None, mask=mk(o, ranges), padding=1),
             normal(xp, rng, (nb, c, hw, hw)), normal(xp, rng, (o, c, ks, ks)))
    # One im2col GEMM per pass even for a wrapped slice; each has the kept channels as one side.
    assert len(r.shapes) == 3
    assert all(o not in sa + sb for sa, sb in r.shapes)
    dense = 2 * o * c * ks * ks * nb * hw * hw
    assert r.flops() == 3 * dense * keep // o


@pytest.mark.parametrize("ranges", [((1, 3),), ((3, 4), (0, 1))])
def test_attention_runs_only_kept_heads(xp, rec, ranges):
    bsz, t, heads, hd = 2, 5, 4, 3
    d, kh = heads * hd, sum(hi - lo for lo, hi in ranges)
    rng = np.random.default_rng(0)
    _fwd_bwd(lambda *a: ag.sliceout_attention(*a, mask=mk(heads, ranges)),
             normal(xp, rng, (bsz, t, d)), normal(xp, rng, (d, 3 * d)),
             normal(xp, rng, (3 * d,)), normal(xp, rng, (d, d)), normal(xp, rng, (d,)))
    dense_fwd = (2 * bsz * t * d * 3 * d + 2 * 2 * bsz * heads * t * t * hd
                 + 2 * bsz * t * d * d)
    assert rec.flops() == 3 * dense_fwd * kh // heads  # backward = 2x forward, all per head
    batched = [sa for sa, sb in rec.shapes if len(sa) == 4]
    assert batched and all(sa[1] == kh for sa in batched)


# ---- layers -------------------------------------------------------------------------------

def _dev(xp):
    return "cpu" if xp is np else "gpu"


@pytest.mark.parametrize("mode", ["input", "output"])
@pytest.mark.parametrize("align", [None, 4])
def test_linear_layer_draws_per_step_and_eval_is_dense(xp, mode, align):
    lin = SliceOutLinear(12, 10, p=0.5, mode=mode, align=align, seed=7, layer=3,
                         rng=0).to(_dev(xp), np.float64)
    dense = Linear(12, 10, rng=0).to(_dev(xp), np.float64)
    x = normal(xp, np.random.default_rng(0), (2, 3, 12))
    n = 12 if mode == "input" else 10
    op = F.sliceout_linear if mode == "input" else F.sliceout_linear_out
    for step in range(4):
        y = lin(Tensor(x))
        mask = F.draw_mask(n, 0.5, seed=7, layer=3, step=step, align=align)
        assert lin.last_mask == mask and lin.step == step + 1
        close(y, op(x, lin.weight.data, lin.bias.data, mask=mask)[0])
    lin.eval()
    close(lin(Tensor(x)), dense(Tensor(x)))
    assert lin.step == 4
    lin.train()
    with cd.eval_mode():
        close(lin(Tensor(x)), dense(Tensor(x)))
    assert lin.step == 4


def test_layer_step_resumes_from_state_dict():
    a = SliceOutLinear(16, 4, p=0.5, layer=1)
    for _ in range(3):
        a(Tensor(np.ones((1, 16), np.float32)))
    b = SliceOutLinear(16, 4, p=0.5, layer=1)
    b.load_state_dict(a.state_dict())
    a(Tensor(np.ones((1, 16), np.float32)))
    b(Tensor(np.ones((1, 16), np.float32)))
    assert b.step == 4 and a.last_mask == b.last_mask


def test_conv_layer_train_and_eval(xp):
    conv = SliceOutConv2d(2, 6, 3, p=0.5, padding=1, seed=1, layer=2,
                          rng=0).to(_dev(xp), np.float64)
    dense = Conv2d(2, 6, 3, padding=1, rng=0).to(_dev(xp), np.float64)
    x = normal(xp, np.random.default_rng(0), (2, 2, 4, 4))
    y = conv(Tensor(x))
    mask = F.draw_mask(6, 0.5, seed=1, layer=2, step=0, align=conv.align)
    assert conv.last_mask == mask
    close(y, dense(Tensor(x)) * scaled_mask(xp, mask)[None, :, None, None])
    conv.eval()
    close(conv(Tensor(x)), dense(Tensor(x)))


def test_attention_layer_train_and_eval(xp):
    att = SliceOutMultiHeadAttention(8, 4, p=0.5, layer=5, rng=2).to(_dev(xp), np.float64)
    ref = MultiHeadAttention(8, 4, rng=2).to(_dev(xp), np.float64)
    x = normal(xp, np.random.default_rng(0), (2, 3, 8))
    y = att(Tensor(x))
    mask = F.draw_mask(4, 0.5, seed=0, layer=5, step=0)
    assert att.last_mask == mask
    mq = scaled_mask(xp, mask)
    close(y, dense_attention(Tensor(x), ref.qkv.weight, ref.qkv.bias, ref.proj.weight,
                             ref.proj.bias, 4, mq, False))
    att.eval()
    close(att(Tensor(x)), ref(Tensor(x)))


def test_sliceout_layer_train_and_eval(xp):
    layer = SliceOut(p=0.5, seed=2, layer=9)
    x = normal(xp, np.random.default_rng(0), (3, 10))
    y = layer(Tensor(x))
    close(y, x * scaled_mask(xp, F.draw_mask(10, 0.5, seed=2, layer=9, step=0)))
    x4 = Tensor(normal(xp, np.random.default_rng(1), (2, 6, 3, 3)))
    y4 = layer(x4)  # channels of NCHW
    mask = F.draw_mask(6, 0.5, seed=2, layer=9, step=1)
    close(y4, x4.data * scaled_mask(xp, mask)[None, :, None, None])
    layer.eval()
    t = Tensor(x)
    assert layer(t) is t and layer.step == 2


# ---- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_bad_p_is_rejected(p):
    with pytest.raises(ValueError, match=r"\bp\b"):
        SliceOutLinear(8, 4, p=p)
    with pytest.raises(ValueError, match=r"\bp\b"):
        SliceOut(p)
    with pytest.raises(ValueError, match=r"\bp\b"):
        F.keep_count(8, p)


@pytest.mark.parametrize("align", [0, -4, 2.5, True, "8"])
def test_bad_align_is_rejected(align):
    with pytest.raises(ValueError, match="align"):
        SliceOutLinear(64, 4, p=0.5, align=align)
    with pytest.raises(ValueError, match="align"):
        F.slice_start(64, 32, seed=0, layer=0, step=0, align=align)


def test_align_incompatible_with_units_is_rejected():
    with pytest.raises(ValueError, match=r"align \(32\) must not exceed .* \(16\)"):
        SliceOutLinear(16, 4, p=0.5, align=32)
    with pytest.raises(ValueError, match="single valid slice start"):
        SliceOutConv2d(3, 40, 3, p=0.5, align=32)  # keep 20: only start 0 fits
    with pytest.raises(ValueError, match="align"):
        SliceOutMultiHeadAttention(8, 2, p=0.5, align=4)
    with pytest.raises(ValueError, match="align"):
        SliceOut(0.5, align=16)(Tensor(np.ones((2, 8))))
    SliceOutLinear(16, 4, p=0.0, align=16)  # keeping everything is fine


def test_bad_mode_and_coordinates_are_rejected():
    with pytest.raises(ValueError, match="mode"):
        SliceOutLinear(8, 4, mode="rows")
    with pytest.raises(ValueError, match="step"):
        F.slice_start(8, 4, seed=0, layer=0, step=-1)
    with pytest.raises(ValueError, match="seed"):
        F.slice_start(8, 4, seed=2**32, layer=0, step=0)
    with pytest.raises(ValueError, match="start"):
        F.slice_ranges(8, 4, 8)
    with pytest.raises(ValueError, match="keep"):
        F.num_starts(8, 9)


@pytest.mark.parametrize("ranges", [(), ((0, 9),), ((3, 3),), ((0, 4), (2, 6)), ((1.5, 3),),
                                    "ab", None])
def test_bad_ranges_are_rejected(ranges):
    x, w = np.ones((2, 8)), np.ones((8, 3))
    with pytest.raises(ValueError, match="ranges"):
        F.sliceout_linear(x, w, None, mask=F.SliceMask(8, 0.5, ranges))
    with pytest.raises(ValueError, match="ranges"):
        F.SliceMask.from_ranges(8, ranges)


def test_mismatched_shapes_are_rejected():
    r = ((0, 2),)
    with pytest.raises(ValueError, match="x has 5 features"):
        F.sliceout_linear(np.ones((2, 5)), np.ones((4, 3)), None, mask=mk(4, r))
    with pytest.raises(ValueError, match="b must have shape"):
        F.sliceout_linear_out(np.ones((2, 4)), np.ones((4, 3)), np.ones(4), mask=mk(3, r))
    with pytest.raises(ValueError, match="b must have shape"):
        F.sliceout_conv2d(np.ones((1, 2, 4, 4)), np.ones((3, 2, 3, 3)), np.ones(2), mask=mk(3, r))
    with pytest.raises(ValueError, match="channels"):
        F.sliceout_conv2d(np.ones((1, 3, 4, 4)), np.ones((3, 2, 3, 3)), None, mask=mk(3, r))
    with pytest.raises(ValueError, match="divisible"):
        F.sliceout_attention(np.ones((1, 2, 6)), np.ones((6, 18)), None, np.ones((6, 6)), None,
                             mask=mk(4, r))
    with pytest.raises(ValueError, match="w_proj"):
        F.sliceout_attention(np.ones((1, 2, 6)), np.ones((6, 18)), None, np.ones((6, 5)), None,
                             mask=mk(2, r))
    with pytest.raises(ValueError, match="axis"):
        F.sliceout(np.ones((2, 4)), mask=mk(4, r), axis=2)
    with pytest.raises(ValueError, match="12 features"):
        SliceOutLinear(12, 3)(Tensor(np.ones((2, 5), np.float32)))


# ---- the op convention: op(arrays..., p=None, *, mask=None, seed, layer, step, align, ...) ----

def op_cases(xp, rng):
    """(name, forward, backward, arrays, unit count, options) for every SliceOut op."""
    n = lambda *s: normal(xp, rng, s)
    return [
        ("sliceout", F.sliceout, F.sliceout_backward, (n(3, 8, 2),), 8, dict(axis=1)),
        ("sliceout_linear", F.sliceout_linear, F.sliceout_linear_backward,
         (n(2, 3, 16), n(16, 5), n(5)), 16, {}),
        ("sliceout_linear_out", F.sliceout_linear_out, F.sliceout_linear_out_backward,
         (n(4, 6), n(6, 16), n(16)), 16, {}),
        ("sliceout_conv2d", F.sliceout_conv2d, F.sliceout_conv2d_backward,
         (n(2, 3, 5, 5), n(8, 3, 3, 3), n(8)), 8, dict(stride=2, padding=1)),
        ("sliceout_attention", F.sliceout_attention, F.sliceout_attention_backward,
         (n(2, 3, 8), n(8, 24), n(24), n(8, 8), n(8)), 4, dict(num_heads=4, causal=True)),
    ]


def _equal(a, b):
    if a is None or b is None:
        assert a is None and b is None
    else:
        np.testing.assert_array_equal(host(a), host(b))


@pytest.mark.parametrize("align", [None, 4])
def test_drawing_inside_the_op_equals_passing_draw_mask(xp, align):
    rng = np.random.default_rng(0)
    for name, fwd, bwd, arrays, units, options in op_cases(xp, rng):
        for step in range(3):
            coords = dict(seed=5, layer=2, step=step, align=align)
            mask = F.draw_mask(units, 0.5, **coords)
            y1, s1 = fwd(*arrays, 0.5, **coords, **options)
            y2, s2 = fwd(*arrays, mask=mask, **options)
            y3, _ = fwd(*arrays, 0.5, mask=mask, align=align, **options)  # p, align matching
            assert s1.mask == s2.mask == mask, name
            _equal(y1, y2)
            _equal(y1, y3)
            g = normal(xp, rng, y1.shape)
            g1, g2 = bwd(g, s1), bwd(g, s2)
            for a, b in zip(g1 if isinstance(g1, tuple) else (g1,),
                            g2 if isinstance(g2, tuple) else (g2,)):
                _equal(a, b)


def test_saved_is_a_named_tuple_holding_the_mask():
    rng = np.random.default_rng(0)
    kinds = {"sliceout": F.SliceOutSaved, "sliceout_linear": F.SliceOutLinearSaved,
             "sliceout_linear_out": F.SliceOutLinearOutSaved,
             "sliceout_conv2d": F.SliceOutConv2dSaved,
             "sliceout_attention": F.SliceOutAttentionSaved}
    for name, fwd, _, arrays, units, options in op_cases(np, rng):
        mask = F.draw_mask(units, 0.25, seed=1, step=4)
        _, saved = fwd(*arrays, mask=mask, **options)
        assert type(saved) is kinds[name] and saved.mask == mask
        assert type(saved).__doc__ and "mask" in type(saved)._fields


def test_mask_scale_is_n_over_keep():
    mask = F.draw_mask(10, 0.35, seed=0, step=3)  # keep round(6.5) = 7
    assert mask.keep == 7 and mask.scale == 10 / 7
    y, _ = F.sliceout(np.ones((1, 10)), mask=mask)
    assert set(np.unique(y).tolist()) == {0.0, 10 / 7}
    assert F.SliceMask.from_ranges(10, ((8, 10), (0, 2))).p == 0.6


def test_p_is_required_without_a_mask():
    rng = np.random.default_rng(0)
    for name, fwd, _, arrays, _, options in op_cases(np, rng):
        with pytest.raises(TypeError, match=rf"^{name}: p is required when no mask is given"):
            fwd(*arrays, seed=1, step=2, **options)
    x, wq, bq, wp, bp = op_cases(np, rng)[-1][3]
    with pytest.raises(TypeError, match="sliceout_attention: num_heads is required"):
        F.sliceout_attention(x, wq, bq, wp, bp, 0.5)


def test_mask_and_p_or_align_must_agree():
    rng = np.random.default_rng(0)
    for name, fwd, _, arrays, units, options in op_cases(np, rng):
        mask = F.draw_mask(units, 0.5, seed=1, step=2, align=2)
        with pytest.raises(ValueError, match=rf"{name}: mask was drawn with p=0.5 but p=0.25"):
            fwd(*arrays, 0.25, mask=mask, **options)
        with pytest.raises(ValueError, match=rf"{name}: mask was drawn with align=2 but align=4"):
            fwd(*arrays, mask=mask, align=4, **options)
        with pytest.raises(TypeError, match=rf"{name}: mask must be a SliceMask"):
            fwd(*arrays, mask=mask.ranges, **options)


def test_mask_over_the_wrong_unit_count_is_rejected():
    rng = np.random.default_rng(0)
    where = {"sliceout": "x has 8 units along axis 1", "sliceout_linear": "x and w have 16 input",
             "sliceout_linear_out": "w has 16 output units", "sliceout_conv2d": "w has 8 output",
             "sliceout_attention": "num_heads is 4"}
    for name, fwd, _, arrays, units, options in op_cases(np, rng):
        mask = F.draw_mask(units // 2, 0.5, seed=1, step=2)
        with pytest.raises(ValueError, match=rf"{name}: mask.n_units is {units // 2} but "
                                             rf"{where[name]}"):
            fwd(*arrays, mask=mask, **options)
    x, wq, bq, wp, bp = op_cases(np, rng)[-1][3]
    with pytest.raises(ValueError, match="divisible"):  # num_heads from a 3-unit mask
        F.sliceout_attention(x, wq, bq, wp, bp, mask=F.draw_mask(3, 0.5))
