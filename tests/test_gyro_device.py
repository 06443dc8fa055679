"""Element gyro dropout decided on the device (``raw_kernels/gyro.cu``): a mask drawn with a
device step has no ``keep`` or ``subnets`` but its ``GyroDraw``; one kernel derives the
sub-networks and their keep bits from it (``gyro_keep_table``), another each row's group and
``x * keep / q`` (``gyro_apply``); results equal the int step's bit for bit. Block-wise gyro's
row blocks' sub-networks decided on the device (``gyro_block_row_ids``).

On the CPU: the kernels' integer arithmetic (``gyro.cuh`` over ``philox.cuh``, compiled for the
host with the system C++ compiler) against ``scheduled_subnets``, ``subnet_keep``,
``GyroMask.row_bounds``, ``blockwise_row_ids`` and ``philox.words`` over hypothesis-drawn
parameters and at the extremes; the Python side of the launches (the kernels emulated from
their arguments) against the host path; the mask's Python side; the argument errors; block-wise
gyro's refusal of a capture on NumPy. On a GPU: the kernels against the host path, forward and
backward, every dtype, ragged groups and a rank's rows included; ``nn.GyroDropout``'s eager
steps on CuPy taking the device path, equal to the NumPy layer's host path (the captured-step
test is in test_graph.py).
"""
import pickle
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, strategies as st

import cudrop
from cudrop import backend, graph, philox, raw_kernels
from cudrop.nn.gyro import BlockwiseDropout, BlockwiseLinear, GyroDropout
from cudrop.variants import gyro as Fg
from cudrop.variants import gyro_schedule as gyro
from conftest import host_harness, same_bits, low_precision_dtype, poison_pool


# One command per line; each prints one number from gyro.cuh / philox.cuh:
#   S seed layer step sigma tau period random slot -> cd_gyro_subnet
#   K seed layer subnet unit thresh                 -> cd_gyro_kept
#   R row tau total                                 -> cd_gyro_slot
#   I seed layer step sigma tau period random offset total r
#     -> the sub-network of block-wise row block r (gyro_block_row_ids' per-thread work)
#   W seed layer step tag row col                   -> cd_mask_word
#   E n row_len inner n_units row0 total seed layer step sigma tau period random thresh V wide
#     -> the keep bit of every element as the kernels find it (the keep table's words by
#        cd_gyro_table_word, then cd_gyro_table_keep for V elements a thread, 64-bit indices
#        when wide), as a string of 0/1, with an X where a call set a bit past n
_HARNESS = r"""
#include <cstdio>
#include <vector>
#include "gyro.cuh"
template <int V, typename I>
unsigned int keep_of(long long i0, long long n, long long row_len, long long inner,
                     long long n_units, long long row0, long long total,
                     unsigned long long tau, const unsigned int* table,
                     unsigned long long words) {
    return cd_gyro_table_keep<V, I>((I)i0, (I)n, (I)row_len, (I)inner, (I)n_units, (I)row0,
                                    (I)total, (I)tau, table, words);
}
template <typename I>
unsigned int keep_v(int v, long long i0, long long n, long long row_len, long long inner,
                    long long n_units, long long row0, long long total, unsigned long long tau,
                    const unsigned int* table, unsigned long long words) {
    if (v == 2) return keep_of<2, I>(i0, n, row_len, inner, n_units, row0, total, tau, table, words);
    if (v == 4) return keep_of<4, I>(i0, n, row_len, inner, n_units, row0, total, tau, table, words);
    return keep_of<8, I>(i0, n, row_len, inner, n_units, row0, total, tau, table, words);
}
int main() {
    char op;
    while (std::scanf(" %c", &op) == 1) {
        if (op == 'S') {
            unsigned int seed, layer, step; unsigned long long sigma, tau, period, slot; int random;
            std::scanf("%u %u %u %llu %llu %llu %d %llu", &seed, &layer, &step, &sigma, &tau,
                       &period, &random, &slot);
            std::printf("%u\n", cd_gyro_subnet(seed, layer, step, slot, sigma, tau, period,
                                               random != 0));
        } else if (op == 'K') {
            unsigned int seed, layer, subnet, thresh; unsigned long long unit;
            std::scanf("%u %u %u %llu %u", &seed, &layer, &subnet, &unit, &thresh);
            std::printf("%d\n", (int)cd_gyro_kept(seed, layer, subnet, unit, thresh));
        } else if (op == 'I') {
            unsigned int seed, layer, step; unsigned long long sigma, tau, period, offset, total, r;
            int random;
            std::scanf("%u %u %u %llu %llu %llu %d %llu %llu %llu", &seed, &layer, &step, &sigma,
                       &tau, &period, &random, &offset, &total, &r);
            std::printf("%u\n", cd_gyro_subnet(seed, layer, step,
                                               cd_gyro_block_slot(step, r, offset, total, tau),
                                               sigma, tau, period, random != 0));
        } else if (op == 'R') {
            unsigned long long row, tau, total;
            std::scanf("%llu %llu %llu", &row, &tau, &total);
            std::printf("%llu\n", cd_gyro_slot(row, tau, total));
        } else if (op == 'E') {
            long long n, row_len, inner, n_units, row0, total;
            unsigned int seed, layer, step, thresh; unsigned long long sigma, tau, period;
            int random, v, wide;
            std::scanf("%lld %lld %lld %lld %lld %lld %u %u %u %llu %llu %llu %d %u %d %d", &n,
                       &row_len, &inner, &n_units, &row0, &total, &seed, &layer, &step, &sigma,
                       &tau, &period, &random, &thresh, &v, &wide);
            const unsigned long long words = (n_units + 31) / 32;
            std::vector<unsigned int> table(tau * words);
            for (unsigned long long t = 0; t < tau * words; ++t)
                table[t] = cd_gyro_table_word(seed, layer, step, t / words, t % words, n_units,
                                              sigma, tau, period, random != 0, thresh);
            for (long long i0 = 0; i0 < n; i0 += v) {
                const unsigned int k = wide
                    ? keep_v<unsigned long long>(v, i0, n, row_len, inner, n_units, row0, total,
                                                 tau, table.data(), words)
                    : keep_v<unsigned int>(v, i0, n, row_len, inner, n_units, row0, total, tau,
                                           table.data(), words);
                const int m = n - i0 < v ? (int)(n - i0) : v;
                for (int j = 0; j < m; ++j) std::putchar('0' + ((k >> j) & 1u));
                if (k >> m) std::putchar('X');
            }
            std::printf("\n");
        } else {
            unsigned int seed, layer, step, tag, row; unsigned long long col;
            std::scanf("%u %u %u %u %u %llu", &seed, &layer, &step, &tag, &row, &col);
            std::printf("%u\n", cd_mask_word(seed, layer, step, tag, row, col));
        }
    }
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    run = host_harness(tmp_path_factory, "gyro_harness", _HARNESS)
    return lambda lines, raw=False: (run(lines).split() if raw
                                     else [int(v) for v in run(lines).split()])


def _subnet_line(seed, layer, step, sigma, tau, period, schedule, slot):
    # the period as the launch passes it (variants/gyro.py): steps are below 2**32
    return ("S", seed, layer, step, sigma, tau, min(period, 2 ** 32), int(schedule == "random"),
            slot)


def _device_subnets(harness, step, *, num_subnets, co_scheduled, period, schedule, seed, layer):
    return harness([_subnet_line(seed, layer, step, num_subnets, co_scheduled, period, schedule,
                                 t) for t in range(co_scheduled)])


@st.composite
def _schedules(draw):
    schedule = draw(st.sampled_from(["consecutive", "random"]))
    tau = draw(st.integers(1, 40))
    if schedule == "consecutive":
        sigma = tau * draw(st.one_of(st.integers(1, 300), st.just(2 ** 32 // tau // 2)))
    else:
        sigma = draw(st.one_of(st.integers(tau, 5000), st.just(2 ** 32), st.just(2 ** 31 + 7)))
    period = draw(st.one_of(st.integers(1, 50), st.integers(1, 2 ** 40)))
    return dict(num_subnets=sigma, co_scheduled=tau, period=period, schedule=schedule)


_u32 = st.integers(0, 2 ** 32 - 1)


@given(sched=_schedules(), seed=_u32, layer=_u32, steps=st.lists(_u32, min_size=1, max_size=8),
       n=st.integers(1, 70), p=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.75, 0.9, 0.999]))
def test_device_schedule_and_keep_bits_equal_the_python(harness, sched, seed, layer, steps, n,
                                                        p):
    thresh = philox.threshold(p)
    for step in steps:
        want = gyro.scheduled_subnets(step, seed=seed, layer=layer, **sched)
        got = _device_subnets(harness, step, seed=seed, layer=layer, **sched)
        assert got == want.tolist(), (step, sched)
        keep = gyro.subnet_keep(want, n, p, seed=seed, layer=layer)
        bits = harness([("K", seed, layer, s, u, thresh) for s in want.tolist()
                        for u in range(n)])
        assert bits == keep.astype(int).reshape(-1).tolist(), (step, sched, p)


def test_device_schedule_at_the_extremes(harness):
    """Σ = 2**32 (the largest), steps near 2**32, periods beyond 2**32 (passed as 2**32), sets
    that wrap the cycle, against the Python in exact integers."""
    cases = [dict(num_subnets=2 ** 32, co_scheduled=1, period=1, schedule="consecutive"),
             dict(num_subnets=2 ** 32, co_scheduled=2 ** 16, period=3, schedule="consecutive"),
             dict(num_subnets=2 ** 32, co_scheduled=8, period=1, schedule="random"),
             dict(num_subnets=1024, co_scheduled=8, period=2 ** 33, schedule="consecutive"),
             dict(num_subnets=1024, co_scheduled=8, period=2 ** 32 - 1, schedule="consecutive"),
             dict(num_subnets=16, co_scheduled=16, period=5, schedule="consecutive"),
             dict(num_subnets=1, co_scheduled=1, period=7, schedule="random")]
    for sched in cases:
        tau = min(sched["co_scheduled"], 64)  # the first slots of τ = 2**16
        for step in (0, 1, 2, 2 ** 31, 2 ** 32 - 2, 2 ** 32 - 1):
            want = gyro.scheduled_subnets(step, seed=5, layer=6, **sched)[:tau]
            got = harness([_subnet_line(5, 6, step, sched["num_subnets"], sched["co_scheduled"],
                                        sched["period"], sched["schedule"], t)
                           for t in range(tau)])
            assert got == want.tolist(), (sched, step)


def test_device_row_slots_equal_the_row_groups(harness):
    """Every row of ragged and even batches, B < τ (empty groups) included, and a rank's rows
    of a global batch: the slot formula gives the group ``row_bounds`` puts the row in."""
    lines, want = [], []
    for total in range(1, 70):
        for tau in range(1, 19):
            mask = gyro.GyroMask(np.ones((tau, 1), bool), tuple(range(tau)), 0.5)
            for t, (a, b) in enumerate(mask.row_bounds(total, ragged=True)):
                for r in range(a, b):
                    lines.append(("R", r, tau, total))
                    want.append(t)
    for total, tau in ((2 ** 40, 2 ** 23 - 1), (10 ** 9 + 7, 1024)):  # large, still exact
        for r in (0, 1, total // 3, total // 2, total - 2, total - 1):
            lines.append(("R", r, tau, total))
            lo, hi = 0, tau - 1  # the last group starting at or before r (starts increase)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if mid * total // tau <= r else (lo, mid - 1)
            want.append(lo)
    assert harness(lines) == want


def _row_id_lines(step, n, sched, seed, layer, offset, total):
    """Harness lines for row blocks 0 .. n - 1, the arguments as the launch passes them
    (gyro_schedule._device_row_ids: the period capped at 2**32, offset and total mod τ)."""
    tau = sched["co_scheduled"]
    return [("I", seed, layer, step, sched["num_subnets"], tau, min(sched["period"], 2 ** 32),
             int(sched["schedule"] == "random"), offset % tau, total % tau, r)
            for r in range(n)]


@given(sched=_schedules(), seed=_u32, layer=_u32, step=_u32, n=st.integers(1, 40),
       before=st.one_of(st.integers(0, 50), st.integers(0, 2 ** 40)),
       after=st.integers(0, 50))
def test_device_row_block_ids_equal_the_host_schedule(harness, sched, seed, layer, step, n,
                                                      before, after):
    """Each row block's sub-network (gyro_block_row_ids' work) against blockwise_row_ids, for a
    whole batch and for a rank's row blocks of a larger global batch; steps up to 2**32 - 1 and
    offsets up to 2**40, where step * total leaves 64 bits."""
    for offset, total in ((0, None), (before, before + n + after)):
        want = gyro.blockwise_row_ids(step, n, block=(1, 1), seed=seed, layer=layer,
                                      row_block_offset=offset, total_row_blocks=total, **sched)
        got = harness(_row_id_lines(step, n, sched, seed, layer, offset,
                                    n if total is None else total))
        assert got == want.tolist(), (sched, step, offset, total)


@st.composite
def _layouts(draw):
    """(shape, unit_axis, ragged, rows): 2-4 axes, units on any non-batch axis (on the last
    one up to 70, so that a thread's V units cross a table word), ragged groups and B < τ, and
    a rank's rows of a global batch."""
    shape = draw(st.lists(st.integers(1, 9), min_size=2, max_size=4))
    unit_axis = draw(st.integers(1, len(shape) - 1))
    if unit_axis == len(shape) - 1 and draw(st.booleans()):
        shape[-1] = draw(st.integers(25, 70))
    shape = tuple(shape)
    ragged = draw(st.booleans())
    rows = None
    if draw(st.booleans()):
        before, after = draw(st.integers(0, 12)), draw(st.integers(0, 12))
        rows = (before, before + shape[0] + after)
    return shape, unit_axis, ragged, rows


@given(layout=_layouts(), sched=_schedules(), step=_u32, seed=_u32,
       p=st.sampled_from([0.1, 0.5, 0.9]), v=st.sampled_from([2, 4, 8]), wide=st.booleans())
def test_device_keep_bits_of_every_element_equal_the_host_mask(harness, layout, sched, step,
                                                               seed, p, v, wide):
    """The kernels' per-thread work -- the keep table's words (sub-networks, Philox words), then
    each thread's V elements read from it (coordinates, row groups; 32- and 64-bit indices) --
    against the host mask materialised over x's shape."""
    shape, unit_axis, ragged, rows = layout
    sched = dict(sched, co_scheduled=min(sched["co_scheduled"], 12))
    if sched["schedule"] == "consecutive":
        sched["num_subnets"] = sched["co_scheduled"] * 5
    offset, total = (0, shape[0]) if rows is None else rows
    if total % sched["co_scheduled"] and not ragged:
        ragged = True  # the host refuses the layout otherwise, and so does the launch
    mask = _host_mask(shape[unit_axis], p, step, rows, seed=seed, layer=3, **sched)
    want = mask.to_dense(shape, unit_axis, ragged).reshape(-1)
    n = want.size
    line = ("E", n, n // shape[0], int(np.prod(shape[unit_axis + 1:])), shape[unit_axis], offset,
            total, seed, 3, step, sched["num_subnets"], sched["co_scheduled"],
            min(sched["period"], 2 ** 32), int(sched["schedule"] == "random"),
            philox.threshold(p), v, int(wide))
    got = harness([line], raw=True)[0]
    assert "X" not in got
    assert got == "".join("1" if k else "0" for k in want), (layout, sched)


def test_host_compiled_philox_equals_philox_words(harness):
    rng = np.random.default_rng(0)
    lines, want = [], []
    for _ in range(300):
        seed, layer, step, row = (int(v) for v in rng.integers(0, 2 ** 32, 4))
        tag, col = int(rng.integers(0, 7)), int(rng.integers(0, 2 ** 34))
        lines.append(("W", seed, layer, step, tag, row, col))
        want.append(int(philox.words(seed, layer, step, tag, row, col)))
    assert harness(lines) == want


# ---- the Python side of the launch, the kernel emulated in NumPy ----------------------------

def _emulated_table(source, fn):
    """gyro_keep_table in NumPy, reading the arguments in its order; the schedule and the keep
    bits from the Python functions (gyro.cuh's arithmetic is checked against them above)."""
    assert (source, fn) == ("gyro.cu", "gyro_keep_table")

    def run(grid, block, args):
        (table, slots, words, n_units, seed, layer, step, step_ptr, sigma, tau, period, random,
         thresh) = args
        assert step_ptr is None and table.dtype == np.uint32
        assert table.shape == (int(slots), int(words)) and int(slots) == int(tau)
        assert int(grid[0]) * int(block[0]) >= table.size and int(words) * 32 >= int(n_units)
        ids = gyro.scheduled_subnets(int(step), num_subnets=int(sigma), co_scheduled=int(tau),
                                     period=int(period), schedule="random" if random else
                                     "consecutive", seed=int(seed), layer=int(layer))
        w = philox.grid_words(int(seed), int(layer), 0, philox.TAG_GYRO, int(tau), int(n_units),
                              row_ids=ids)
        keep = np.zeros((int(tau), int(words) * 32), np.uint64)
        keep[:, :int(n_units)] = w >= np.uint32(thresh)
        shifts = np.arange(32, dtype=np.uint64)
        table[...] = (keep.reshape(int(tau), int(words), 32) << shifts).sum(-1).astype(np.uint32)
    return run


def _emulated_launch(source, fn, dtype, grid, block, args):
    """gyro_apply in NumPy, reading the arguments in their order and the keep bits from the
    table: with ``_emulated_table``, catches a mistake in how the Python side lays out either
    launch before any GPU run."""
    assert source == "gyro.cu" and fn == "gyro_apply"
    (x, y, n, row_len, inner, n_units, row0, total, tau, table, words, scale) = args
    assert isinstance(scale, np.float64) and x.dtype == y.dtype == dtype
    assert int(grid[0]) * int(block[0]) * (16 // x.itemsize) >= int(n) and x.flags.c_contiguous
    assert table.shape == (int(tau), int(words))
    e = np.arange(int(n))
    rows = e // int(row_len)
    units = (e // int(inner)) % int(n_units)
    slots = ((int(row0) + rows + 1) * int(tau) - 1) // int(total)
    keep = (table[slots, units // 32] >> (units % 32).astype(np.uint32)) & 1 == 1
    flat = x.reshape(-1)
    if x.dtype == np.float64:
        v = flat * scale
    else:  # the kernel computes in float and rounds to the dtype
        v = (flat.astype(np.float32) * np.float32(scale)).astype(x.dtype)
    y.reshape(-1)[...] = np.where(keep, v, x.dtype.type(0))


def _device_mask(n_units, p, step, rows=None, seed=4, layer=1, **sched):
    """A mask decided on the device, built by hand (draw_mask makes one on CuPy only), with an
    int step as the layer's eager steps draw it."""
    sched = dict(dict(num_subnets=32, co_scheduled=4, period=3, schedule="consecutive"), **sched)
    draw = gyro.GyroDraw(seed, layer, step, n_units, sched["num_subnets"],
                         sched["co_scheduled"], sched["period"], sched["schedule"])
    return gyro.GyroMask(None, None, p, rows, draw)


def _host_mask(n_units, p, step, rows=None, seed=4, layer=1, **sched):
    sched = dict(dict(num_subnets=32, co_scheduled=4, period=3, schedule="consecutive"), **sched)
    return replace(gyro.gyro_mask(n_units, p, step=step, seed=seed, layer=layer, **sched),
                   rows=rows)


# (shape, unit_axis, ragged, rows): units last (a multiple of 4 and not), in the middle (inner
# > 1), channels of NCHW, ragged groups, B < τ, a rank's rows of a global batch (even and
# ragged), a single unit
CASES = [((8, 53), None, False, None), ((12, 64), None, False, None), ((10, 7), None, True, None),
         ((3, 9), None, True, None), ((8, 6, 5), 1, False, None), ((4, 3, 2, 5), None, False, None),
         ((6, 2, 3, 5), 2, True, None), ((8, 1), None, False, None),
         ((4, 11), None, False, (8, 16)), ((5, 11), None, True, (5, 17)),
         ((3, 2, 9), 2, True, (0, 10))]


@pytest.mark.parametrize("shape, unit_axis, ragged, rows", CASES)
@pytest.mark.parametrize("schedule", ["consecutive", "random"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_device_launch_lays_out_the_arguments_as_the_host_path_masks(monkeypatch, shape,
                                                                     unit_axis, ragged, rows,
                                                                     schedule, dtype):
    monkeypatch.setattr(Fg, "launch", _emulated_launch)
    monkeypatch.setattr(Fg, "kernel", _emulated_table)
    monkeypatch.setattr(Fg, "aligned", lambda a, nbytes: np.ascontiguousarray(a))
    x = np.random.default_rng(2).standard_normal(shape).astype(dtype)
    ax = gyro.unit_axis_of(shape, unit_axis)
    for p in (0.3, 0.5):
        for step in (0, 2, 3, 10, 2 ** 32 - 1):
            dev = _device_mask(shape[ax], p, step, rows, schedule=schedule)
            host = _host_mask(shape[ax], p, step, rows, schedule=schedule)
            want, none = Fg._apply_gyro(x, host, ax, ragged)
            table = Fg._keep_table(np, dev, shape[0])
            got = Fg._apply_on_device(x, dev, ax, x.dtype.type(1.0 / dev.q), table)
            assert none is None and table.shape == (4, -(-shape[ax] // 32))
            same_bits(got, want, f"step {step} p {p}")


# ---- the mask's Python side (no GPU needed) ------------------------------------------------

def test_a_device_mask_knows_its_shape_and_reads_back_to_the_host_mask():
    m = _device_mask(10, 0.3, 7, rows=(4, 8))
    assert m.on_device and m.keep is None and m.subnets is None
    assert (m.n_units, m.co_scheduled, m.q) == (10, 4, 0.7)
    h = m.host()
    want = _host_mask(10, 0.3, 7, rows=(4, 8))
    assert not h.on_device and h.subnets == want.subnets and h.rows == (4, 8)
    np.testing.assert_array_equal(h.keep, want.keep)
    np.testing.assert_array_equal(m.to_dense((4, 10)), want.to_dense((4, 10)))
    assert want.host() is want and not want.on_device
    # the draw names the arrays' device (not their module): host() draws there, and a mask
    # copies and pickles (a model holding it in last_mask deep-copies)
    named = replace(m, draw=m.draw._replace(device="cpu"))
    assert pickle.loads(pickle.dumps(named)) == named
    np.testing.assert_array_equal(named.host().keep, want.keep)


def test_the_device_path_refuses_numpy_arrays_and_keeps_the_host_checks():
    x = np.ones((8, 10))
    with pytest.raises(TypeError, match="decided on the device.*NumPy"):
        Fg.gyro_dropout(x, mask=_device_mask(10, 0.5, 3))
    with pytest.raises(ValueError, match=r"τ = 4\) must divide the batch size \(10\)"):
        Fg.gyro_dropout(np.ones((10, 10)), mask=_device_mask(10, 0.5, 3))
    with pytest.raises(ValueError, match="units"):
        Fg.gyro_dropout(np.ones((8, 12)), mask=_device_mask(10, 0.5, 3))
    with pytest.raises(TypeError, match="needs CuPy inputs"):
        Fg.draw_mask(10, 0.5, seed=1, step=np.asarray(3, np.uint32))
    with pytest.raises(TypeError, match="needs CuPy inputs"):
        Fg.gyro_dropout(x, 0.5, seed=1, step=np.asarray(3, np.uint32))
    with pytest.raises(TypeError, match="on_device=True needs xp=cupy"):
        Fg.draw_mask(10, 0.5, seed=1, step=3, on_device=True)
    # without on_device an int step is decided on the host, on NumPy as on CuPy
    assert not Fg.draw_mask(10, 0.5, seed=1, step=3).on_device


@pytest.mark.parametrize("schedule", ["consecutive", "random"])
def test_row_id_launch_lays_out_the_arguments_as_the_host_schedule(monkeypatch, harness,
                                                                   schedule):
    """gyro_schedule._device_row_ids with the kernel emulated by the harness from the launch's
    arguments, in their order, against blockwise_row_ids: catches a mistake in how the Python
    side lays out the launch before any GPU run."""
    def emulated(source, fn):
        assert (source, fn) == ("gyro.cu", "gyro_block_row_ids")

        def run(grid, block, args):
            (ids, n, offset, total, seed, layer, step, step_ptr, sigma, tau, period,
             random) = args
            assert step_ptr is None and ids.dtype == np.uint32 and len(ids) == int(n)
            assert int(grid[0]) * int(block[0]) >= int(n)
            ids[...] = harness([("I", seed, layer, step, sigma, tau, period, random, offset,
                                 total, r) for r in range(int(n))])
        return run

    monkeypatch.setattr(raw_kernels, "kernel", emulated)
    sigma = 48 if schedule == "consecutive" else 2 ** 32
    sched = dict(num_subnets=sigma, co_scheduled=6, period=3, schedule=schedule)
    for step in (0, 2, 3, 17, 2 ** 32 - 1):
        for n, offset, total in ((5, 0, None), (4, 7, 30), (9, 2 ** 35, 2 ** 35 + 20)):
            want = gyro.blockwise_row_ids(step, n, block=(1, 1), seed=9, layer=2,
                                          row_block_offset=offset, total_row_blocks=total,
                                          **sched)
            got = gyro._device_row_ids(np, step, n, seed=9, layer=2, row_block_offset=offset,
                                       total_row_blocks=total, **sched)
            assert got.tolist() == want.tolist(), (step, n, offset)


def test_blockwise_gyro_on_numpy_refuses_a_capture(monkeypatch):
    """On NumPy the schedule is the host's (an int step), which a capture refuses; on CuPy
    block-wise gyro is captured (test_graph.py)."""
    x = cudrop.Tensor(np.ones((8, 64), np.float32))
    monkeypatch.setattr(graph, "_recorder", object())  # as while CapturedStep records
    for layer in (BlockwiseDropout(0.5, num_subnets=8, co_scheduled=4, layer=2),
                  BlockwiseLinear(64, 8, 0.5, num_subnets=8, co_scheduled=4, layer=2)):
        with pytest.raises(graph.CaptureError,
                           match=r"BlockwiseDropout\(layer 2\) decides its mask on the host"):
            layer(x)
    # element gyro on NumPy asks for a host step, which a capture refuses as before
    with pytest.raises(graph.CaptureError, match=r"GyroDropout\(layer 0\)"):
        GyroDropout(0.5, num_subnets=8, co_scheduled=4, layer=0)(x)


# ---- on the GPU -------------------------------------------------------------------------

def _gpu_case(cp, shape, dt, seed):
    return cp.asarray(np.random.default_rng(seed).standard_normal(shape)).astype(dt)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("shape, unit_axis, ragged, rows", CASES)
@pytest.mark.parametrize("schedule", ["consecutive", "random"])
@pytest.mark.gpu
def test_device_kernel_equals_the_host_path(dtype, shape, unit_axis, ragged, rows, schedule):
    cp = backend.cupy
    dt = low_precision_dtype(cp, dtype)
    x, gy = _gpu_case(cp, shape, dt, 0), _gpu_case(cp, shape, dt, 1)
    ax = gyro.unit_axis_of(shape, unit_axis)
    kw = dict(num_subnets=32, co_scheduled=4, period=2, schedule=schedule, seed=9, layer=2)
    d = cp.asarray(0, dtype=np.uint32)
    sets = set()
    for step in (0, 1, 2, 3, 11, 2 ** 32 - 1):
        d[...] = step  # one device step, rewritten: the kernel reads it when it runs
        dev = replace(Fg.draw_mask(shape[ax], 0.4, step=d, xp=cp, **kw), rows=rows)
        host = replace(Fg.draw_mask(shape[ax], 0.4, step=step, xp=cp, **kw), rows=rows)
        assert dev.on_device and dev.draw.step is d
        poison_pool(cp)  # an element the kernel leaves unwritten reads NaN
        y_d, saved_d = Fg.gyro_dropout(x, mask=dev, unit_axis=unit_axis, ragged=ragged)
        poison_pool(cp)
        g_d = Fg.gyro_dropout_backward(gy, saved_d)
        y_h, saved_h = Fg.gyro_dropout(x, mask=host, unit_axis=unit_axis, ragged=ragged)
        g_h = Fg.gyro_dropout_backward(gy, saved_h)
        same_bits(y_d, y_h, f"y at step {step}")
        same_bits(g_d, g_h, f"grad at step {step}")
        back = dev.host()
        assert back.subnets == host.subnets and back.rows == rows
        np.testing.assert_array_equal(backend.asnumpy(back.keep), backend.asnumpy(host.keep))
        sets.add(host.subnets)
    assert len(sets) > 2  # the steps ran different sub-networks


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.gpu
def test_device_kernel_zeroes_dropped_non_finite_cells_and_reads_odd_offset_views(dtype):
    cp = backend.cupy
    dt = low_precision_dtype(cp, dtype)
    host = np.random.default_rng(3).standard_normal(8 * 37 + 1)
    cells = host[1:].reshape(8, 37)
    cells[::2, ::3] = np.inf
    cells[1::2, ::5] = np.nan
    # contiguous, but at an offset not aligned for the vector loads: the op copies it
    x = cp.asarray(host).astype(dt)[1:].reshape(8, 37)
    kw = dict(num_subnets=16, co_scheduled=4, period=1, seed=1, layer=0)
    d = cp.asarray(5, dtype=np.uint32)
    y, _ = Fg.gyro_dropout(x, 0.5, step=d, **kw)
    keep = gyro.gyro_mask(37, 0.5, step=5, **kw).to_dense((8, 37))
    yn, xn = backend.asnumpy(y).astype(np.float64), backend.asnumpy(x).astype(np.float64)
    bits = backend.asnumpy(y).view(f"u{y.dtype.itemsize}")
    assert (bits[~keep] == 0).all()  # +0 exactly, inf and NaN included
    np.testing.assert_array_equal(np.isnan(yn[keep]), np.isnan(xn[keep]))
    np.testing.assert_array_equal(np.isinf(yn[keep]), np.isinf(xn[keep]))
    y_h, _ = Fg.gyro_dropout(x, 0.5, step=5, **kw)
    fin = np.isfinite(xn)
    same_bits(backend.asnumpy(y)[fin], backend.asnumpy(y_h)[fin], "finite cells")


def _no_host_draw(*args, **kwargs):
    raise AssertionError("an eager step on CuPy drew its sub-networks on the host")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("schedule", ["consecutive", "random"])
@pytest.mark.gpu
def test_the_layer_decides_on_the_device_eagerly_and_equals_the_host_path(monkeypatch, dtype,
                                                                         schedule):
    """Eager steps on CuPy (int steps) take the captured path: no host draw of the
    sub-networks (nor its upload of their ids), one keep-table launch and one masking pass
    each way. ``last_mask`` is decided on the device; its ``host()`` equals the NumPy layer's
    host-drawn mask, and the outputs and gradients equal the host path's (that mask applied by
    the two-pass op on CuPy; float32 also the NumPy layer's) bit for bit. The default period
    1 (a new set every step), ragged groups, a rank's rows; the kernels end up loaded for a
    later capture."""
    cp = backend.cupy
    dt = low_precision_dtype(cp, dtype)
    kw = dict(num_subnets=16, co_scheduled=4, schedule=schedule, seed=9, layer=2, ragged=True)
    shape = (10, 37)  # τ does not divide 10 (ragged); 37 units cross a table word
    x_d, g_d = _gpu_case(cp, shape, dt, 0), _gpu_case(cp, shape, dt, 1)
    x_h, g_h = backend.asnumpy(x_d), backend.asnumpy(g_d)
    calls = []
    real_kernel, real_launch = Fg.kernel, Fg.launch
    monkeypatch.setattr(Fg, "kernel", lambda *a: calls.append(a[1]) or real_kernel(*a))
    monkeypatch.setattr(Fg, "launch", lambda *a: calls.append(a[1]) or real_launch(*a))
    for world, rank in ((1, 0), (3, 1)):
        dev = cudrop.nn.set_shard(GyroDropout(0.5, **kw), rank, world)
        host = cudrop.nn.set_shard(GyroDropout(0.5, **kw), rank, world)
        assert dev.period == 1
        sets = set()
        for step in range(6):
            x = cudrop.Tensor(x_d, requires_grad=True)
            calls.clear()
            with monkeypatch.context() as m:
                m.setattr(gyro, "scheduled_subnets", _no_host_draw)
                m.setattr(gyro, "subnet_keep", _no_host_draw)
                poison_pool(cp)  # an element the kernel leaves unwritten reads NaN
                y = dev(x)
                y.backward(g_d)
            assert calls == ["gyro_keep_table", "gyro_apply", "gyro_apply"], calls
            mask = dev.last_mask
            assert mask.on_device and mask.keep is None and mask.subnets is None
            assert mask.draw.step == step and dev.step == step + 1 and mask.draw.device == "gpu"
            assert pickle.loads(pickle.dumps(mask)) == mask  # no module or array in it
            assert mask.rows == (None if world == 1 else (rank * 10, world * 10))
            xn = cudrop.Tensor(x_h.copy(), requires_grad=True)
            yn = host(xn)  # NumPy: the host path
            yn.backward(g_h)
            want = host.last_mask
            assert not want.on_device and want.rows == mask.rows
            back = mask.host()  # the host form, drawn on the GPU at the mask's step
            assert back.subnets == want.subnets and back.rows == want.rows
            assert backend.get_array_module(back.keep) is cp
            np.testing.assert_array_equal(backend.asnumpy(back.keep), want.keep)
            y_h, saved = Fg.gyro_dropout(x_d, mask=back, ragged=True)  # two passes
            g_want = Fg.gyro_dropout_backward(g_d, saved)
            assert saved.table is None
            same_bits(y.data, y_h, f"y at step {step}")
            same_bits(x.grad, g_want, f"grad at step {step}")
            if dt == np.float32:
                same_bits(y.data, yn.data, f"y against NumPy at step {step}")
                same_bits(x.grad, xn.grad, f"grad against NumPy at step {step}")
            sets.add(want.subnets)
        assert len(sets) > 2  # the steps ran different sub-networks
    key = ("gyro.cu", "gyro_apply", dt, (), cp.cuda.runtime.getDevice())
    assert key in raw_kernels._FUNCS  # loaded before any capture needs it
