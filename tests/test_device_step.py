"""Device steps: the Philox step as a 0-d uint32 CuPy array, which the mask kernels read when
they run, so a captured CUDA graph draws a new mask per replay once the host writes the step.
On CuPy the draws equal those of the int step bit for bit and follow a rewrite of the array;
on NumPy an array step is a TypeError, as is a device step of the wrong dtype or shape, or one
given to a draw decided on the host (the slice of SliceOut's ops that slice on the host; the
slice of sliceout_linear and element gyro's sub-networks are decided on the device from one,
test_sliceout_device.py and test_gyro_device.py)."""
import numpy as np
import pytest

import cudrop
import cudrop.functional as F
from cudrop import backend, masks, philox, random
from cudrop.variants import blockwise, gyro, sliceout
from cudrop.variants import sparsedrop as Fsd


def _np(a):
    return backend.asnumpy(a)


def _x(xp, shape, seed=0):
    # strictly positive values: a kept element is never 0
    return xp.asarray(np.random.default_rng(seed).uniform(1.0, 2.0, shape).astype(np.float32))


def _draw_dropout(xp, step):
    x = _x(xp, (37, 53))  # 1961 elements: a ragged last vector and a partial last bit word
    y, saved = F.dropout(x, 0.5, seed=1, layer=2, step=step)
    return {"y": y, "bits": saved.mask.bits}


def _draw_dropout_tensor(xp, step):
    return {"y": cudrop.dropout(cudrop.Tensor(_x(xp, (9, 70))), 0.3, seed=4, step=step).data}


def _mask_arrays(m):
    return {f: getattr(m, f) for f in ("bits", "row_count", "row_index", "col_count",
                                       "col_index")}


def _draw_block_mask(xp, step):
    # 7 x 300 blocks: more than 256 per row (the kernel's multi-chunk scan), partial edges
    return _mask_arrays(masks.block_mask((100, 600), (16, 2), 0.5, seed=11, layer=3, step=step,
                                         xp=xp))


def _draw_sparsedrop_linear(xp, step):
    x, w = _x(xp, (70, 90), 1), _x(xp, (90, 24), 2)
    y, saved = Fsd.sparsedrop_linear(x, w, None, 0.5, block=(16, 8), seed=3, layer=1, step=step)
    return {"y": y, **_mask_arrays(saved.mask)}


def _draw_sliceout_linear(xp, step):
    # wrap mode over 53 input units (slices (6, 33) at step 7, (11, 38) at step 8), and the
    # output-unit form; forward and backward
    x, w, gy = _x(xp, (37, 53), 1), _x(xp, (53, 29), 2), _x(xp, (37, 29), 3)
    y, saved = sliceout.sliceout_linear(x, w, None, 0.5, seed=3, layer=1, step=step)
    gx, gw, _ = sliceout.sliceout_linear_backward(gy, saved)
    yo, saved = sliceout.sliceout_linear_out(w.T.copy(), x.T.copy(), None, 0.3, seed=3, layer=1,
                                             step=step)
    gxo, gwo, _ = sliceout.sliceout_linear_out_backward(_x(xp, (29, 37), 4), saved)
    return {"y": y, "gx": gx, "gw": gw, "yo": yo, "gxo": gxo, "gwo": gwo}


def _draw_gyro_dropout(xp, step):
    # ragged groups of a 3-D input (units in the middle), the random schedule; forward and
    # backward
    x, gy = _x(xp, (10, 13, 3), 1), _x(xp, (10, 13, 3), 2)
    y, saved = F.gyro_dropout(x, 0.5, seed=3, layer=1, step=step, num_subnets=64,
                              co_scheduled=4, schedule="random", unit_axis=1, ragged=True)
    return {"y": y, "gx": F.gyro_dropout_backward(gy, saved)}


def _draw_blockwise(xp, step):
    # block-wise gyro: 6 row blocks (a ragged last one) over τ = 4 slots, a new set of
    # sub-networks each step; input pruning forward and backward, and output pruning
    x, w, gy = _x(xp, (90, 64), 1), _x(xp, (64, 24), 2), _x(xp, (90, 24), 3)
    kw = dict(seed=3, layer=1, step=step, block=(16, 8), num_subnets=64, co_scheduled=4)
    y, saved = blockwise.blockwise_linear(x, w, None, 0.5, **kw)
    gx, gw, _ = blockwise.blockwise_linear_backward(gy, saved)
    yo, _ = blockwise.blockwise_linear_out(x, w, None, 0.3, act="relu", **kw)
    return {"y": y, "gx": gx, "gw": gw, "yo": yo, **_mask_arrays(saved.mask)}


DRAWS = {"dropout": _draw_dropout, "dropout_tensor": _draw_dropout_tensor,
         "block_mask": _draw_block_mask, "sparsedrop_linear": _draw_sparsedrop_linear,
         "sliceout_linear": _draw_sliceout_linear, "gyro_dropout": _draw_gyro_dropout,
         "blockwise": _draw_blockwise}


def _assert_same(got, want):
    for name in want:
        np.testing.assert_array_equal(_np(got[name]), _np(want[name]), err_msg=name)


@pytest.mark.parametrize("op", sorted(DRAWS))
def test_device_step_draws_the_int_steps_mask(xp, op):
    draw = DRAWS[op]
    d = xp.asarray(7, dtype=np.uint32)
    if xp is np:
        with pytest.raises(TypeError, match="step as a device array needs CuPy inputs"):
            draw(xp, d)
        return
    first = draw(xp, d)
    d[...] = 8  # stream-ordered after the first draw's kernel, before the second's
    second = draw(xp, d)
    at7, at8 = draw(xp, 7), draw(xp, 8)
    _assert_same(first, at7)
    _assert_same(second, at8)
    # the kernel read the pointer at run time: the two steps' masks differ
    key = "y" if "y" in at7 else "bits"
    assert not np.array_equal(_np(at7[key]), _np(at8[key]))
    assert int(d) == 8  # the op neither wrote nor replaced the device step


@pytest.mark.parametrize("bad", [((), np.int32), ((), np.uint64), ((1,), np.uint32),
                                 ((2,), np.uint32)])
def test_device_step_of_wrong_dtype_or_shape_is_refused(xp, bad):
    shape, dtype = bad
    d = xp.full(shape, 7, dtype=dtype)
    for op in sorted(DRAWS):
        with pytest.raises(TypeError, match="step"):
            DRAWS[op](xp, d)


def test_host_decided_draws_refuse_a_device_step(xp):
    d = xp.asarray(7, dtype=np.uint32)
    # SliceOut's slice and element gyro's sub-networks are decided on the device with one
    # (test_sliceout_device.py, test_gyro_device.py), and block-wise gyro's mask (DRAWS above);
    # SliceOut's ops that slice on the host refuse such a mask
    if xp is np:
        with pytest.raises(TypeError, match="step"):
            sliceout.draw_mask(64, 0.5, seed=1, step=d)
        with pytest.raises(TypeError, match="step"):
            gyro.draw_mask(64, 0.5, seed=1, step=d, xp=xp)
    else:
        mask = sliceout.draw_mask(64, 0.5, seed=1, step=d)
        assert mask.on_device and mask.draw.step is d
        with pytest.raises(TypeError, match="decides its slice on the host"):
            sliceout.sliceout(_x(xp, (8, 64)), mask=mask)
        mask = gyro.draw_mask(64, 0.5, seed=1, step=d, xp=xp)
        assert mask.on_device and mask.draw.step is d


@pytest.mark.gpu
def test_captured_dropout_draws_the_written_step_per_replay():
    cp = backend.cupy
    x = _x(cp, (300, 257))
    d = cp.asarray(2, dtype=np.uint32)
    want = {k: F.dropout(x, 0.5, seed=1, layer=0, step=k) for k in (3, 4)}
    want = {k: (_np(y), _np(saved.mask.bits)) for k, (y, saved) in want.items()}
    # a non-blocking stream does not wait for the legacy default stream that made x and d
    cp.cuda.Device().synchronize()
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        # warm-up: compiles the kernel and leaves blocks of y's and the bits' sizes in the
        # pool of s, so the capture allocates without cudaMalloc
        F.dropout(x, 0.5, seed=1, layer=0, step=d)
        s.synchronize()
        s.begin_capture()
        y, saved = F.dropout(x, 0.5, seed=1, layer=0, step=d)
        g = s.end_capture()
    for k in (3, 4):
        with s:
            d[...] = k
        g.launch(s)
        s.synchronize()
        np.testing.assert_array_equal(_np(y), want[k][0], err_msg=f"step {k}")
        np.testing.assert_array_equal(_np(saved.mask.bits), want[k][1], err_msg=f"step {k}")
    assert not np.array_equal(want[3][0], want[4][0])


def test_resolve_passes_a_device_step_through_unread(xp):
    d = xp.asarray(7, dtype=np.uint32)
    state = random.get_state()
    if xp is np:
        with pytest.raises(TypeError, match="step as a device array needs CuPy inputs"):
            random.resolve(None, d)
        return
    seed, step = random.resolve(5, d)
    assert seed == 5 and step is d
    assert random.resolve(None, d)[1] is d and random.get_state() == state  # no offset used
    assert philox.check_step(d, xp) is d
    value, ptr = philox.step_args(d)
    assert ptr is d and value == 0
    assert philox.step_args(7) == (7, None)
