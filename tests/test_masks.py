"""Block masks: bits, ELL lists and dense form agree; the GPU kernel equals the NumPy reference
bit for bit; edge blocks are partial; explicit grids (gyro) go through from_blocks."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from cudrop import backend, masks, philox
from conftest import poison_pool


def _np(a):
    return backend.asnumpy(a)


def _check_consistent(m):
    keep = _np(m.keep_blocks())
    nm, nk = m.grid
    assert keep.shape == (nm, nk)
    for r in range(nm):
        idx = np.nonzero(keep[r])[0]
        assert _np(m.row_count)[r] == len(idx)
        assert _np(m.row_index)[r, :len(idx)].tolist() == idx.tolist()
        assert (_np(m.row_index)[r, len(idx):] == -1).all()
    for c in range(nk):
        idx = np.nonzero(keep[:, c])[0]
        assert _np(m.col_count)[c] == len(idx)
        assert _np(m.col_index)[c, :len(idx)].tolist() == idx.tolist()
        assert (_np(m.col_index)[c, len(idx):] == -1).all()
    # bits past the last column block are zero
    words = _np(m.bits)
    tail = nk % 64
    if tail:
        assert (words[:, -1] >> np.uint64(tail) == 0).all()


@given(m=st.integers(1, 700), k=st.integers(1, 700), mb=st.sampled_from([1, 16, 32, 128]),
       kb=st.sampled_from([1, 8, 32, 128]), p=st.sampled_from([0.0, 0.25, 0.5, 0.9]),
       step=st.integers(0, 2**32 - 1))
def test_gpu_equals_reference_and_lists_match_bits(xp, m, k, mb, kb, p, step):
    poison_pool(xp)
    got = masks.block_mask((m, k), (mb, kb), p, seed=11, layer=3, step=step, xp=xp)
    ref = masks.block_mask((m, k), (mb, kb), p, seed=11, layer=3, step=step)
    for f in ("bits", "row_count", "row_index", "col_count", "col_index"):
        np.testing.assert_array_equal(_np(getattr(got, f)), getattr(ref, f), err_msg=f)
    _check_consistent(got)
    want = philox.keep_grid(11, 3, step, philox.TAG_BLOCK, *ref.grid, p)
    np.testing.assert_array_equal(ref.keep_blocks(), want)


def test_wide_grid_crosses_scan_chunks(xp):
    # more than 256 blocks per line exercises the kernel's multi-chunk scan and word writes
    got = masks.block_mask((3 * 700, 600), (3, 1), 0.5, seed=1, layer=1, step=1, xp=xp)
    ref = masks.block_mask((3 * 700, 600), (3, 1), 0.5, seed=1, layer=1, step=1)
    np.testing.assert_array_equal(_np(got.row_index), ref.row_index)
    np.testing.assert_array_equal(_np(got.col_index), ref.col_index)
    np.testing.assert_array_equal(_np(got.bits), ref.bits)


def test_partial_edge_blocks_in_dense_form():
    m = masks.block_mask((130, 70), (128, 32), 0.5, seed=0, layer=0, step=0)
    assert m.grid == (2, 3)
    dense, keep = m.to_dense(), m.keep_blocks()
    assert dense.shape == (130, 70)
    assert (dense[128:, 64:] == keep[1, 2]).all() and (dense[:128, :32] == keep[0, 0]).all()


def test_row_ids_share_masks_between_rows(xp):
    ids = np.array([5, 9, 5, 9], np.uint32)
    m = masks.block_mask((4 * 16, 200), (16, 8), 0.5, seed=2, layer=0, step=0, xp=xp,
                         row_ids=ids, tag=philox.TAG_GYRO)
    keep = _np(m.keep_blocks())
    assert (keep[0] == keep[2]).all() and (keep[1] == keep[3]).all()
    assert (keep[0] != keep[1]).any()
    ref = masks.block_mask((4 * 16, 200), (16, 8), 0.5, seed=2, layer=0, step=0, row_ids=ids,
                           tag=philox.TAG_GYRO)
    np.testing.assert_array_equal(_np(m.bits), ref.bits)


def test_keep_rate_within_binomial_bounds():
    m = masks.block_mask((128 * 64, 32 * 64), (128, 32), 0.3, seed=5, layer=1, step=2)
    n = 64 * 64
    assert abs(m.keep_blocks().sum() - 0.7 * n) < 5 * np.sqrt(n * 0.21)


def test_from_blocks_and_p_zero(xp):
    keep = xp.asarray(np.array([[1, 0, 1], [0, 0, 0]], bool))
    m = masks.BlockMask.from_blocks(keep, (5, 9), (3, 3), 0.5)
    _check_consistent(m)
    assert _np(m.row_count).tolist() == [2, 0]
    full = masks.block_mask((10, 10), (3, 3), 0.0, seed=0, layer=0, step=0, xp=xp)
    assert _np(full.keep_blocks()).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="block"):
        masks.block_mask((4, 4), (0, 2), 0.5, seed=0, layer=0, step=0)
    with pytest.raises(ValueError, match="shape"):
        masks.block_mask((4, 0), (2, 2), 0.5, seed=0, layer=0, step=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        masks.block_mask((4, 4), (2, 2), 1.0, seed=0, layer=0, step=0)
    with pytest.raises(ValueError, match="keep grid"):
        masks.BlockMask.from_blocks(np.ones((3, 3), bool), (4, 4), (2, 2), 0.5)
    with pytest.raises(ValueError, match="row_ids"):
        masks.block_mask((4, 4), (2, 2), 0.5, seed=0, layer=0, step=0, row_ids=[1])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@given(m=st.integers(1, 300), k=st.integers(1, 300), mb=st.sampled_from([1, 16, 128]),
       kb=st.sampled_from([1, 8, 32]), scale=st.sampled_from([1.0, 1 / 0.7, 2.0]),
       odd_out=st.booleans())
def test_apply_block_equals_float32_math_and_gpu_equals_host(xp, dtype, m, k, mb, kb, scale,
                                                             odd_out):
    """``x ⊙ m · scale``: kept cells ``x · scale`` in float32 (float64 for float64) rounded once,
    dropped blocks exact zeros even over inf and NaN; ragged edges and K off the kernel's
    16-byte vectors; into a poisoned ``out`` at an odd offset. On CuPy (the one-pass kernel)
    equal to the host's result bit for bit."""
    if dtype == "bfloat16":
        dt = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    else:
        dt = np.dtype(dtype)
    poison_pool(xp)
    rng = np.random.default_rng(m * 1000 + k)
    host = rng.standard_normal((m, k)).astype(np.float32)
    host[rng.random((m, k)) < 0.05] = np.inf
    host[rng.random((m, k)) < 0.05] = np.nan
    host = host.astype(dt)
    mask_h = masks.block_mask((m, k), (mb, kb), 0.4, seed=5, layer=1, step=m, xp=np)
    keep = mask_h.to_dense()
    wide = np.float64 if dt == np.float64 else np.float32
    want = np.where(keep, (host.astype(wide) * wide(scale)).astype(dt), dt.type(0))
    assert not np.isnan(want[~keep].astype(wide)).any()
    want = want.astype(wide)  # compared as values: NaN payloads may differ between devices
    got_h = masks.apply_block(host, mask_h, scale)
    assert got_h.dtype == dt
    np.testing.assert_array_equal(got_h.astype(wide), want)
    if xp is np:
        return
    mask = masks.block_mask((m, k), (mb, kb), 0.4, seed=5, layer=1, step=m, xp=xp)
    x = xp.asarray(host)
    out = None
    if odd_out:
        buf = xp.full((m, k + 1), np.nan, dt)
        out = buf[:, 1:]
    got = masks.apply_block(x, mask, scale, out=out)
    assert out is None or got is out
    np.testing.assert_array_equal(backend.asnumpy(got.astype(wide)), want)
    if odd_out:
        assert xp.isnan(buf[:, 0].astype(np.float32)).all()


def test_apply_block_rejects_mismatched_shapes():
    mask = masks.block_mask((8, 8), (4, 4), 0.5, seed=0, layer=0, step=0)
    with pytest.raises(ValueError, match="block mask is over"):
        masks.apply_block(np.zeros((8, 9), np.float32), mask, 1.0)
    with pytest.raises(ValueError, match="out must be"):
        masks.apply_block(np.zeros((8, 8), np.float32), mask, 1.0,
                          out=np.zeros((8, 8), np.float64))
