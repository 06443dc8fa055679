"""SliceOut slices decided on the device (``raw_kernels/slice.cu``): a mask drawn with a device
step has ``ranges=None`` and its ``SliceDraw``; the kernels compute the start from it and gather
and scatter the kept units; results equal the int step's bit for bit.

On the CPU: the kernels' integer arithmetic (``slice.cuh``, compiled for the host with the
system C++ compiler) against ``slice_start`` / ``slice_ranges`` over many (n, keep, align, step)
combinations; the Python side of the launches (``_take`` / ``_put`` with the kernels emulated
in NumPy) against the host path's slicing; the mask's Python side; the argument errors. On a GPU: the start kernel against
``slice_start``, and ``sliceout_linear`` / ``sliceout_linear_out`` forward and backward with a
device step against the int step, bit for bit (the captured-step test is in test_graph.py).
"""

import numpy as np
import pytest

from conftest import host_harness, same_bits, low_precision_dtype
from cudrop import backend, philox
from cudrop.nn import SliceOutConv2d, SliceOutLinear, SliceOutMultiHeadAttention
from cudrop.nn.sliceout import SliceOut
from cudrop.variants import sliceout as F


# The harness reads "word n keep count unit" lines and prints, per line, the start, the unit
# at every compact position and the compact position (or -1) of every unit, from slice.cuh.
_HARNESS = r"""
#include <cstdio>
#include "slice.cuh"
int main() {
    unsigned int word; long long n, keep, count, unit;
    while (std::scanf("%u %lld %lld %lld %lld", &word, &n, &keep, &count, &unit) == 5) {
        const long long start = cd_slice_start_of(word, n, keep, count, unit);
        std::printf("%lld |", start);
        if (n <= 512) {
            for (long long j = 0; j < keep; ++j) std::printf(" %lld", cd_slice_unit(start, j, n));
            std::printf(" |");
            for (long long u = 0; u < n; ++u) std::printf(" %lld", cd_slice_pos(start, u, n, keep));
        }
        std::printf("\n");
    }
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    run = host_harness(tmp_path_factory, "slice_harness", _HARNESS)
    return lambda lines: run(lines).splitlines()


def _combos():
    """(n, keep, align) for every p of a grid, n ragged and round, wrap and aligned modes; the
    configurations num_starts refuses are left out."""
    out = set()
    for n in list(range(1, 70)) + [96, 100, 127, 128, 256, 257, 1000, 4096, 100003]:
        for p in (0.0, 0.1, 0.3, 0.5, 0.75, 0.9):
            for align in (None, 1, 2, 3, 8, 16, 32):
                try:
                    keep = F.keep_count(n, p, align)
                    F.num_starts(n, keep, align)
                except ValueError:
                    continue
                out.add((n, keep, align))
    return sorted(out, key=lambda c: (c[0], c[1], c[2] or 0))


def test_device_start_and_index_maps_equal_the_host_draw(harness):
    lines, want = [], []
    for i, (n, keep, align) in enumerate(_combos()):
        count = F.num_starts(n, keep, align)
        for step in (0, 1, 2, 7, 1000 + i, 2 ** 32 - 1):
            seed, layer = 3 + i % 5, i % 7
            word = int(philox.words(seed, layer, step, philox.TAG_SLICE, 0, 0))
            start = F.slice_start(n, keep, seed=seed, layer=layer, step=step, align=align)
            lines.append((word, n, keep, count, align or 1))
            want.append((n, keep, start))
    got = harness(lines)
    assert len(got) == len(want) > 10000
    for line, (n, keep, start) in zip(got, want):
        ranges = F.slice_ranges(n, keep, start)
        parts = line.split("|")
        # keep == n: the host's range is (0, n) whatever the drawn start; the device's start is 0
        assert int(parts[0]) == (0 if keep == n else start), (n, keep, start, line)
        if n > 512:
            continue
        units = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
        assert [int(v) for v in parts[1].split()] == units.tolist(), (n, keep, start)
        pos = np.full(n, -1)
        pos[units] = np.arange(keep)
        assert [int(v) for v in parts[2].split()] == pos.tolist(), (n, keep, start)


def test_device_start_arithmetic_at_the_extremes(harness):
    """Words 0 and 2**32 - 1 against the exact Python integer arithmetic, up to n = 2**31 - 1
    (the largest the host lets through to the device path): no overflow, no rounding."""
    lines, want = [], []
    for n in (2, 3, 1000, 2 ** 20 + 7, 2 ** 31 - 1):
        for keep, unit in ((1, 1), (n - 1, 1)):
            for word in (0, 1, 2 ** 31, 2 ** 32 - 1):
                lines.append((word, n, keep, n, unit))
                want.append(((word * n) >> 32) * unit)
    got = harness(lines)
    assert [int(line.split("|")[0]) for line in got] == want


# ---- the mask's Python side (no GPU needed) ------------------------------------------------

def _device_mask(n=10, p=0.5, align=None):
    """A device-decided mask built by hand (draw_mask makes one from a CuPy step only)."""
    return F.SliceMask(n, p, None, align, F.SliceDraw(1, 2, np.zeros((), np.uint32)))


def test_a_device_mask_knows_its_shape_but_not_its_ranges():
    m = _device_mask(10, 0.3)
    assert m.on_device and m.keep == F.keep_count(10, 0.3) == 7 and m.scale == 10 / 7
    m = _device_mask(64, 0.5, 8)
    assert m.keep == 32 and m.scale == 2.0
    host = F.draw_mask(10, 0.3, seed=1, layer=2, step=4)
    assert not host.on_device and host.draw is None and host.host() is host


def test_ops_refuse_a_device_mask_on_numpy_and_where_they_slice_on_the_host():
    x, w = np.ones((3, 10)), np.ones((10, 4))
    with pytest.raises(TypeError, match="decided on the device.*NumPy"):
        F.sliceout_linear(x, w, None, mask=_device_mask(10))
    with pytest.raises(TypeError, match="decided on the device.*NumPy"):
        F.sliceout_linear_out(np.ones((3, 4)), np.ones((4, 10)), None, mask=_device_mask(10))
    with pytest.raises(TypeError, match="decides its slice on the host"):
        F.sliceout(x, mask=_device_mask(10))
    with pytest.raises(TypeError, match="decides its slice on the host"):
        F.sliceout_conv2d(np.ones((1, 2, 4, 4)), np.ones((10, 2, 3, 3)), None,
                          mask=_device_mask(10))
    with pytest.raises(TypeError, match="decides its slice on the host"):
        F.sliceout_attention(np.ones((1, 3, 8)), np.ones((8, 24)), None, np.ones((8, 8)),
                             mask=_device_mask(2), num_heads=2)
    with pytest.raises(ValueError, match="ranges=None must carry its draw"):
        F.sliceout_linear(x, w, None, mask=F.SliceMask(10, 0.5, None))
    with pytest.raises(ValueError, match="mask.n_units is 10"):
        F.sliceout_linear(np.ones((3, 12)), np.ones((12, 4)), None, mask=_device_mask(10))


def test_only_the_linear_layer_asks_for_device_steps():
    assert SliceOutLinear._device_slices
    for cls in (SliceOut, SliceOutConv2d, SliceOutMultiHeadAttention):
        assert not cls._device_slices


def test_a_numpy_step_array_is_refused_by_the_draw():
    with pytest.raises(TypeError, match="needs CuPy inputs"):
        F.draw_mask(10, 0.5, seed=1, step=np.asarray(3, np.uint32))


# ---- on the GPU -------------------------------------------------------------------------

@pytest.mark.parametrize("n, p, align", [(7, 0.5, None), (10, 0.0, None), (1000, 0.3, None),
                                         (21, 0.5, 8), (256, 0.1, 32), (100003, 0.9, None),
                                         (96, 0.5, 16), (13, 0.3, 3)])
@pytest.mark.gpu
def test_start_kernel_equals_slice_start(n, p, align):
    cp = backend.cupy
    steps = np.concatenate([np.arange(300), [2 ** 32 - 1, 2 ** 31, 123456789]]).astype(np.uint32)
    got = backend.asnumpy(F._device_starts(n, p, seed=5, layer=3, steps=cp.asarray(steps),
                                           align=align))
    keep = F.keep_count(n, p, align)
    want = [0 if keep == n else F.slice_start(n, keep, seed=5, layer=3, step=int(s), align=align)
            for s in steps]
    assert got.tolist() == want


# ((..., K, N), align): ragged sizes, wrap mode, aligned mode where align divides the units
# (block-wise wrap) and where it does not (no wrap), a 3-D input; at p = 0.4 the six steps below
# draw several starts in each, wrapped and unwrapped slices both (checked on the host)
SHAPES = [((37, 53, 29), None), ((64, 256, 96), 32), ((5, 21, 3), 4), ((2, 7, 11, 40), None),
          ((130, 100, 70), 4)]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("shape, align", SHAPES)
@pytest.mark.parametrize("mode", ["input", "output"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.gpu
def test_linear_ops_with_a_device_step_equal_the_int_step(dtype, shape, align, mode, bias):
    cp = backend.cupy
    dt = low_precision_dtype(cp, dtype)
    *lead, k, n = shape
    units = k if mode == "input" else n
    if units < (align or 1):
        pytest.skip(f"align {align} exceeds the {units} units")
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal(tuple(lead) + (k,))).astype(dt)
    w = cp.asarray(rng.standard_normal((k, n))).astype(dt)
    b = cp.asarray(rng.standard_normal(n)).astype(dt) if bias else None
    gy = cp.asarray(rng.standard_normal(tuple(lead) + (n,))).astype(dt)
    op, op_bwd = ((F.sliceout_linear, F.sliceout_linear_backward) if mode == "input" else
                  (F.sliceout_linear_out, F.sliceout_linear_out_backward))
    d = cp.asarray(0, dtype=np.uint32)
    starts = set()
    for step in (0, 1, 2, 3, 11, 2 ** 32 - 1):
        d[...] = step  # one device step, rewritten: the kernels read it when they run
        y_d, saved_d = op(x, w, b, 0.4, seed=9, layer=2, step=d, align=align)
        assert saved_d.mask.on_device and saved_d.mask.draw.step is d
        g_d = op_bwd(gy, saved_d)
        y_h, saved_h = op(x, w, b, 0.4, seed=9, layer=2, step=step, align=align)
        g_h = op_bwd(gy, saved_h)
        starts.add(saved_h.mask.ranges[0][0])
        assert saved_d.mask.host() == saved_h.mask
        same_bits(y_d, y_h, f"y at step {step}")
        for name, gd, gh in zip(("gx", "gw", "gb"), g_d, g_h):
            if gh is None:
                assert gd is None
            else:
                same_bits(gd, gh, f"{name} at step {step}")
    assert len(starts) > 1  # the steps drew different slices


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("m, k, n, align", [(37, 53, 29, None), (64, 256, 96, 32), (5, 21, 12, 4)])
@pytest.mark.parametrize("sliced", ["in", "out", "both"])
@pytest.mark.gpu
def test_compact_linear_with_device_steps_equals_the_int_steps(dtype, m, k, n, align, sliced):
    """sliceout_linear_compact (an MLP's hidden layer between two slices) with masks decided
    on the device gives the host masks' results bit for bit, forward and backward."""
    cp = backend.cupy
    dt = low_precision_dtype(cp, dtype)
    rng = np.random.default_rng(0)
    w = cp.asarray(rng.standard_normal((k, n))).astype(dt)
    b = cp.asarray(rng.standard_normal(n)).astype(dt)
    d_in, d_out = cp.asarray(0, dtype=np.uint32), cp.asarray(0, dtype=np.uint32)
    for step in (0, 1, 5, 2 ** 32 - 8):
        d_in[...], d_out[...] = step, step + 7
        masks = {}
        for where, (s_in, s_out) in (("device", (d_in, d_out)), ("host", (step, step + 7))):
            masks[where] = (
                F.draw_mask(k, 0.4, seed=1, layer=0, step=s_in, align=align)
                if sliced in ("in", "both") else None,
                F.draw_mask(n, 0.6, seed=1, layer=1, step=s_out, align=align)
                if sliced in ("out", "both") else None)
        width = k if masks["host"][0] is None else masks["host"][0].keep
        x = cp.asarray(rng.standard_normal((m, width))).astype(dt)
        outs = {}
        for where, (mi, mo) in masks.items():
            y, saved = F.sliceout_linear_compact(x, w, b, in_mask=mi, out_mask=mo)
            gy = cp.asarray(np.random.default_rng(step % 97).standard_normal(y.shape)).astype(dt)
            outs[where] = (y,) + F.sliceout_linear_compact_backward(gy, saved)
        for name, gd, gh in zip(("y", "gx", "gw", "gb"), outs["device"], outs["host"]):
            same_bits(gd, gh, f"{name} at step {step}")


@pytest.mark.gpu
def test_a_device_mask_reads_back_to_the_host_mask():
    cp = backend.cupy
    for step in range(20):
        m = F.draw_mask(50, 0.5, seed=1, layer=4, step=cp.asarray(step, dtype=np.uint32))
        want = F.draw_mask(50, 0.5, seed=1, layer=4, step=step)
        assert m.on_device and m.host() == want
        np.testing.assert_array_equal(m.to_dense(), want.to_dense())


@pytest.mark.gpu
def test_the_linear_layer_stays_on_the_host_path_eagerly():
    import cudrop
    layer = SliceOutLinear(40, 24, 0.5, align=None).to("gpu")
    x = cudrop.Tensor(backend.cupy.ones((3, 40), np.float32))
    layer(x)
    assert not layer.last_mask.on_device and layer.step == 1  # eager: the int step


def _emulated_units(seed, layer, step, n, keep, count, unit):
    """The kept units in slice order, from the start the kernels compute (slice.cuh)."""
    word = int(philox.words(int(seed), int(layer), int(step), philox.TAG_SLICE, 0, 0))
    start = 0 if keep == n else ((word * int(count)) >> 32) * int(unit)
    return (start + np.arange(int(keep))) % int(n)


def _emulated_scale(v, scale, dtype):
    """``v * scale`` rounded as the kernels do (cd_scale_or_zero: float, double for float64)."""
    if dtype == np.float64:
        return (v.astype(np.float64) * scale).astype(dtype)
    return (v.astype(np.float32) * np.float32(scale)).astype(dtype)


def _emulated_launch(source, fn, dtype, grid, block, args):
    """slice.cu's gather and scatter in NumPy, reading the arguments in the kernels' order (the
    index arithmetic itself is slice.cuh's, checked above): catches a mistake in how the Python
    side lays out the launch before any GPU run."""
    assert source == "slice.cu" and fn in ("slice_gather", "slice_scatter")
    src, dst, outer, n, inner, keep, seed, layer, step, step_ptr, count, unit, group = args[:13]
    assert step_ptr is None and all(isinstance(v, np.int64) for v in (outer, n, inner, keep,
                                                                       count, unit, group))
    # the kernels walk units in groups: a group must divide every start, n and keep
    assert int(unit) % int(group) == 0 and int(n) % int(group) == 0 and int(keep) % int(group) == 0
    units = _emulated_units(seed, layer, step, n, keep, count, unit)
    s3 = src.reshape(int(outer), -1, int(inner))
    d3 = dst.reshape(int(outer), -1, int(inner))
    scale, scaled = args[13:]
    _emulated_move(fn == "slice_gather", s3, d3, (slice(None), units, slice(None)), scale,
                   scaled)


def _emulated_move(gather, src, dst, index, scale, scaled):
    """What both slice kernels do with the kept cells ``index``: gather them from ``src`` into
    ``dst``, or scatter ``src`` to them with every other cell of ``dst`` zeroed; times the
    dtype-rounded ``scale`` when ``scaled``."""
    v = src[index] if gather else src
    if scaled:
        v = _emulated_scale(v, scale, dst.dtype)
    if gather:
        dst[...] = v
    else:
        dst[...] = 0
        dst[index] = v


def _emulated_block_launch(source, fn, dtype, grid, block, args):
    """slice.cu's block gather and scatter in NumPy, reading the arguments in the kernels' order
    (the cd_block_axis structs field by field)."""
    assert source == "slice.cu" and fn in ("slice_block_gather", "slice_block_scatter")
    src, dst, rows, cols, ra, ca, scale, scaled = args
    assert isinstance(rows, np.int64) and isinstance(cols, np.int64)
    assert ra.dtype == F._BLOCK_AXIS and ca.dtype == F._BLOCK_AXIS
    tx, ty = block
    assert tx % 32 == 0 and 128 < tx * ty <= 256 and 1 <= grid[0] <= 8192

    def units(a, n):
        assert a["step_ptr"] == 0  # an int step stands in for the device step
        return _emulated_units(a["seed"], a["layer"], a["step"], n, int(a["keep"]), a["count"],
                               a["unit"])

    r, c = units(ra, int(rows)), units(ca, int(cols))
    _emulated_move(fn == "slice_block_gather", src, dst, np.ix_(r, c), scale, scaled)


@pytest.mark.parametrize("k, n, p, align", [(53, 29, 0.5, None), (21, 96, 0.4, 4),
                                            (64, 256, 0.5, 32), (7, 9, 0.0, None)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_device_block_take_and_put_lay_out_the_launch_as_the_host_path_slices(
        monkeypatch, k, n, p, align, dtype):
    """A weight block sliced on both axes by masks decided on the device (one block kernel
    each way) equals the host masks' two one-axis slices bit for bit."""
    monkeypatch.setattr(F, "launch", _emulated_block_launch)
    w = np.random.default_rng(2).standard_normal((k, n)).astype(dtype)
    for step in range(6):
        host = (F.draw_mask(k, p, seed=4, layer=1, step=step, align=align),
                F.draw_mask(n, p, seed=4, layer=2, step=step + 3, align=align))
        dev = (F.SliceMask(k, p, None, align, F.SliceDraw(4, 1, step)),
               F.SliceMask(n, p, None, align, F.SliceDraw(4, 2, step + 3)))
        for s in (None, w.dtype.type(host[0].scale)):
            got = F._take_block(w, *dev, np, s)
            same_bits(got, F._take_block(w, *host, np, s), f"take step {step} scale {s}")
            same_bits(F._put_block(got, *dev, w.shape, np, s),
                      F._put_block(got, *host, w.shape, np, s), f"put step {step} scale {s}")


@pytest.mark.parametrize("n, p, align", [(53, 0.5, None), (100, 0.3, None), (21, 0.4, 4),
                                         (96, 0.5, 16), (7, 0.0, None)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_device_take_and_put_lay_out_the_launch_as_the_host_path_slices(monkeypatch, n, p, align,
                                                                        dtype):
    monkeypatch.setattr(F, "launch", _emulated_launch)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, n, 5)).astype(dtype)
    for step in range(8):
        host = F.draw_mask(n, p, seed=4, layer=1, step=step, align=align)
        dev = F.SliceMask(n, p, None, align, F.SliceDraw(4, 1, step))  # an int stands in
        for axis, arr in ((1, a), (0, a[0].copy()), (1, a[:, :, 0].copy()), (0, a[0, :, 0])):
            for s in (None, arr.dtype.type(host.scale)):
                got = F._take(arr, dev, axis, np, s)
                want = F._take(arr, host, axis, np, s)
                same_bits(got, want, f"take axis {axis} step {step}")
            shape = arr.shape
            for s in (None, arr.dtype.type(host.scale)):
                got = F._put(F._take(arr, dev, axis, np), dev, axis, shape, np, s)
                same_bits(got, F._put(F._take(arr, host, axis, np), host, axis, shape, np, s),
                          f"put axis {axis} step {step} scale {s}")
