"""Block-sparse GEMMs (dsd, dsd_t, sdd) against float64 dense math with the materialised mask,
over hypothesis-drawn shapes (ragged edges included), block sizes, sparsities, dtypes, operand
layouts (transposed views), epilogues and, on the GPU, every kernel. The output is poisoned with
NaN before the call (passed as ``out=``), so an element no kernel wrote fails the test."""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from cudrop import backend, masks
from cudrop import bsmm
from cudrop.bsmm import dispatch as bsmm_gpu
from conftest import low_precision_dtype

# relative Frobenius error allowed per dtype (float32 is exact fp32 arithmetic, no TF32)
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 4e-3, "bfloat16": 2.5e-2}
FORMS = ("dsd", "dsd_t", "sdd")


def _dense(a64, b64, keep, form, scale, bias, act):
    """float64 reference: the form's formula with the materialised mask."""
    if form == "dsd":
        y = scale * (a64 * keep) @ b64
    elif form == "dsd_t":
        y = scale * (a64 * keep).T @ b64
    else:
        y = scale * a64 @ b64
    if bias is not None:
        y = y + bias
    if act == "relu":
        y = np.maximum(y, 0)
    elif act == "gelu":
        from scipy.special import erf
        y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    return y * keep if form == "sdd" else y


def _rand(xp, shape, dtype, rng, transposed=False):
    """A random array of ``shape``; as a transposed view of a contiguous array if asked."""
    h = rng.standard_normal(shape[::-1] if transposed else shape)
    a = xp.asarray(h.astype(np.float32)).astype(dtype)
    return a.T if transposed else a


def check(xp, form, m, k, n, block, p, dtype, *, seed=0, kernel=None, trans_a=False,
          trans_b=False, bias=False, act=None, keep=None, tol=None):
    """Run ``form`` once and compare with float64 dense math. (m, k) is the masked operand for
    dsd and dsd_t, (m, n) the masked output for sdd."""
    rng = np.random.default_rng(seed)
    dtype = low_precision_dtype(xp, dtype) if dtype == "bfloat16" else np.dtype(dtype)
    if form == "dsd":
        a, b, mshape, oshape = (m, k), (k, n), (m, k), (m, n)
    elif form == "dsd_t":
        a, b, mshape, oshape = (m, k), (m, n), (m, k), (k, n)
    else:
        a, b, mshape, oshape = (m, k), (k, n), (m, n), (m, n)
    a = _rand(xp, a, dtype, rng, trans_a)
    b = _rand(xp, b, dtype, rng, trans_b)
    if form == "dsd_t":  # a gradient: no epilogue
        bias, act = False, None
    bvec = _rand(xp, (oshape[1],), dtype, rng) if bias else None
    if keep is None:
        mask = masks.block_mask(mshape, block, p, seed=seed, layer=1, step=2, xp=xp)
    else:
        mask = masks.BlockMask.from_blocks(xp.asarray(keep), mshape, block, p)
    scale = 1.0 / (1.0 - p)
    out = xp.full(oshape, np.nan, dtype)
    fn = getattr(bsmm, form)
    kw = {} if form == "dsd_t" else dict(bias=bvec, act=act)
    with bsmm.use_kernel(kernel):
        res = fn(a, b, mask, scale, out=out, **kw)
    assert res is out
    def f64(x):  # 16-bit types through float32 (CuPy casts bfloat16 only to float32)
        if x is None:
            return None
        return backend.asnumpy(x.astype(np.float32) if x.itemsize == 2 else x).astype(np.float64)
    ref = _dense(f64(a), f64(b), backend.asnumpy(mask.to_dense()), form, scale, f64(bvec), act)
    got = f64(out)
    assert not np.isnan(got).any(), "unwritten (poisoned) elements"
    err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err <= (tol or TOL[dtype.name]), (form, err)
    if form == "sdd":  # dropped blocks are exact zeros
        assert (got[~backend.asnumpy(mask.to_dense())] == 0).all()


BLOCKS = [(128, 128), (64, 32), (128, 32), (3, 5), (16, 8), (1, 4)]
shapes = st.integers(1, 200)
probs = st.sampled_from([0.0, 0.3, 0.7, 0.99])


@given(form=st.sampled_from(FORMS), m=shapes, k=shapes, n=shapes, block=st.sampled_from(BLOCKS),
       p=probs, ta=st.booleans(), tb=st.booleans(), bias=st.booleans(),
       act=st.sampled_from([None, "relu", "gelu"]), seed=st.integers(0, 2**16))
def test_float64_any_shape(xp, form, m, k, n, block, p, ta, tb, bias, act, seed):
    check(xp, form, m, k, n, block, p, "float64", seed=seed, trans_a=ta, trans_b=tb,
          bias=bias, act=act)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@given(form=st.sampled_from(FORMS), m=shapes, k=shapes, n=shapes, block=st.sampled_from(BLOCKS),
       p=probs, seed=st.integers(0, 2**16))
def test_low_precision_any_shape(xp, dtype, form, m, k, n, block, p, seed):
    check(xp, form, m, k, n, block, p, dtype, seed=seed)


# ---- the GPU kernels, each forced -------------------------------------------------------------

gpu = pytest.mark.gpu
mult8 = st.integers(1, 48).map(lambda i: 8 * i)  # the tensor-core kernels' alignment
TC_BLOCKS = [(128, 128), (128, 32), (64, 64), (128, 8), (64, 200), (256, 128)]


def _gpu_or_skip(kernel):
    cp = pytest.importorskip("cupy")
    if not backend.gpu_available():
        pytest.skip("no usable CUDA GPU")
    if kernel in ("sm90", "tma") and cp.cuda.Device().compute_capability != "90":
        pytest.skip(f"the {kernel} kernel needs a Hopper GPU")
    return cp


# the smallest tile rows of each kernel (a tile's rows lie in one row block of the mask) and the
# multiple of the kept blocks' width along K it needs
MIN_BM = {"simple": 1, "ffma": 64, "mma": 64, "sm90": 128, "tma": 64}
KBLK = {"simple": 1, "ffma": 1, "mma": 8, "sm90": 8, "tma": 64}


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kernel", ["simple", "mma", "sm90", "tma"])
@given(form=st.sampled_from(FORMS), m=mult8, k=mult8, n=mult8, block=st.sampled_from(TC_BLOCKS),
       p=probs, tb=st.booleans(), bias=st.booleans(), act=st.sampled_from([None, "relu"]),
       seed=st.integers(0, 2**16))
def test_gpu_kernels(dtype, kernel, form, m, k, n, block, p, tb, bias, act, seed):
    cp = _gpu_or_skip(kernel)
    # dsd_t reads a transposed (M-major) operand; the others K-major; b either way except for
    # dsd_t, whose M-major a with a K-major b has no tensor-core instance. The tensor-core tiles
    # need the mask's row blocks (the output's, Kb for dsd_t) in multiples of 64 rows.
    rblk, kblk = block[::-1] if form == "dsd_t" else block
    assume(rblk % MIN_BM[kernel] == 0 and (form == "sdd" or kblk % KBLK[kernel] == 0))
    check(cp, form, m, k, n, block, p, dtype, seed=seed, kernel=kernel,
          trans_b=tb and form != "dsd_t", bias=bias, act=act)


@gpu
@given(form=st.sampled_from(FORMS), m=mult8, k=mult8, n=mult8, block=st.sampled_from(TC_BLOCKS),
       p=probs, tb=st.booleans(), seed=st.integers(0, 2**16))
def test_gpu_float32_on_tf32_when_opted_in(form, m, k, n, block, p, tb, seed, monkeypatch):
    """CUPY_TF32=1 (CuPy's switch) sends float32 to the tensor cores: TF32 operands (10-bit
    mantissa) with float32 accumulation, an error near 1e-3 instead of float32's."""
    cp = _gpu_or_skip("mma")
    rblk, kblk = block[::-1] if form == "dsd_t" else block
    assume(rblk % 64 == 0 and (form == "sdd" or kblk % 4 == 0))
    monkeypatch.setenv("CUPY_TF32", "1")
    check(cp, form, m, k, n, block, p, "float32", seed=seed, kernel="mma",
          trans_b=tb and form != "dsd_t", tol=3e-3)


@gpu
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kernel", ["simple", "ffma", "mma", "sm90", "tma"])
def test_gpu_rows_with_every_block_dropped(form, kernel):
    cp = _gpu_or_skip(kernel)
    dtype = "float32" if kernel == "ffma" else "float16"
    keep = np.array([[0, 0, 0], [1, 0, 1], [0, 0, 0], [1, 1, 1]], bool)
    m, k = 4 * 128 - 24, 3 * 128 - 8  # ragged last blocks
    if form == "sdd":
        check(cp, form, m, 72, k, (128, 128), 0.5, dtype, kernel=kernel, keep=keep)
    else:
        check(cp, form, m, k, 40, (128, 128), 0.5, dtype, kernel=kernel, keep=keep,
              bias=form == "dsd")


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kernel", ["mma", "sm90", "tma"])
def test_gpu_large_tiles(dtype, form, kernel):
    """Shapes large enough that the dispatcher picks each of the bigger tiles; for the tma
    kernel's persistent grid also more tiles than SMs (each CTA walks several tiles of uneven
    work, its producer running ahead into the next tile): 153 to 561 tiles; sdd's live-first
    schedule with 128- and 64-row tiles (297 and 165 tiles)."""
    cp = _gpu_or_skip(kernel)
    shapes = ((1032, 520, 2056), (512, 1024, 512))
    if kernel == "tma":
        shapes += ((1032, 2056, 4104), (264, 520, 4104))
    for m, k, n in shapes:
        check(cp, form, m, k, n, (128, 128), 0.5, dtype, kernel=kernel)


# ---- the exact float32 kernel (ffma) ----------------------------------------------------------

# any extent, or multiples of 4 (the float4 path: dispatch._ffma_vec)
ffma_dims = st.one_of(st.integers(1, 300), st.integers(1, 75).map(lambda i: 4 * i))


@gpu
@given(form=st.sampled_from(FORMS), m=ffma_dims, k=ffma_dims, n=ffma_dims,
       rblk=st.sampled_from([64, 128, 192, 256]),
       other=st.sampled_from([1, 3, 5, 8, 13, 32, 40, 64, 128, 200]), p=probs, ta=st.booleans(),
       tb=st.booleans(), bias=st.booleans(), act=st.sampled_from([None, "relu", "gelu"]),
       seed=st.integers(0, 2**16))
def test_gpu_ffma_float32(form, m, k, n, rblk, other, p, ta, tb, bias, act, seed):
    """The exact float32 kernel forced, every layout (a and b either major order), ragged
    M, N, K, kept blocks of widths that are not multiples of its k-step of 8 (block splitting cuts
    the last step of each block), bias and ReLU/GELU, against float64 at float32 tolerance."""
    cp = _gpu_or_skip("ffma")
    # the row blocks (of the output: Kb for dsd_t) in multiples of 64, any other block side
    block = (other, rblk) if form == "dsd_t" else (rblk, other)
    check(cp, form, m, k, n, block, p, "float32", seed=seed, kernel="ffma", trans_a=ta,
          trans_b=tb, bias=bias, act=act)


@pytest.fixture
def ffma_tile(monkeypatch):
    """``ffma_tile(tile)`` makes the dispatcher's ffma tile list that one tile; launch plans are
    cleared around it so that no plan of another tile is reused or left behind."""
    def force(tile):
        bsmm_gpu._PLAN_MEMO.clear()
        monkeypatch.setattr(bsmm_gpu, "FFMA_TILES", (tile,))
    yield force
    bsmm_gpu._PLAN_MEMO.clear()


@gpu
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("tile", bsmm_gpu.FFMA_TILES)
@pytest.mark.parametrize("aligned", [True, False])
def test_gpu_ffma_each_tile(form, tile, aligned, ffma_tile):
    """Each ffma tile on a problem of more than 8 tile rows (the grouped CTA order's partial
    last group), with the float4 loads (extents multiples of 4) and without (ragged extents and
    a kept-block width of 13)."""
    cp = _gpu_or_skip("ffma")
    ffma_tile(tile)
    m, k, n = (1100, 200, 260) if aligned else (1101, 203, 259)
    other = 64 if aligned else 13
    if form == "dsd_t":  # the product's rows are the masked operand's columns
        m, k = k, m
    block = (other, 128) if form == "dsd_t" else (128, other)
    check(cp, form, m, k, n, block, 0.3, "float32", kernel="ffma", bias=form != "dsd_t",
          act="relu")
    check(cp, form, m, k, n, block, 0.3, "float32", kernel="ffma", trans_a=True, trans_b=True)


@gpu
def test_gpu_ffma_unaligned_operand_views():
    """Operands as views one float into a buffer (4-byte aligned, leading dimensions not
    multiples of 4): the ffma kernel takes them with one-float loads, no copy."""
    cp = _gpu_or_skip("ffma")
    rng = np.random.default_rng(11)
    m, k, n = 200, 136, 264
    abuf = cp.asarray(rng.standard_normal((m, k + 1)), np.float32)
    bbuf = cp.asarray(rng.standard_normal((k, n + 1)), np.float32)
    a, b = abuf[:, 1:], bbuf[:, 1:]
    mask = masks.block_mask((m, k), (128, 64), 0.5, seed=2, layer=0, step=1, xp=cp)
    out = cp.full((m, n), np.nan, np.float32)
    with bsmm.use_kernel("ffma"):
        bsmm.dsd(a, b, mask, 2.0, out=out)
    ref = 2.0 * (cp.asnumpy(a).astype(np.float64) * backend.asnumpy(mask.to_dense())) \
        @ cp.asnumpy(b).astype(np.float64)
    got = cp.asnumpy(out).astype(np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < TOL["float32"]


def _fake(dtype, shape, ptr=0):
    """What the dispatcher's choice reads of an operand: shape, dtype, itemsize, device
    pointer."""
    from types import SimpleNamespace
    dt = np.dtype(dtype)
    return SimpleNamespace(shape=shape, dtype=dt, itemsize=dt.itemsize,
                           data=SimpleNamespace(ptr=ptr))


def test_float32_goes_to_ffma_where_a_tile_fits(monkeypatch):
    """float32 without TF32: the ffma kernel wherever its tile's rows fit the mask's row blocks,
    else simple; float64 stays on simple; with CUPY_TF32=1 the TF32 kernel first, ffma where it
    cannot take the operands."""
    monkeypatch.setattr(bsmm_gpu.raw_kernels, "device_facts", lambda: (132, False))
    monkeypatch.setattr(bsmm_gpu._gemm, "available", lambda: False)  # no dense fallback
    monkeypatch.delenv("CUPY_TF32", raising=False)

    def choose(dtype, m, n, k, rblk=1, kblk=1, masked=False, choice="auto", ptr=0):
        a, b = _fake(dtype, (m, k), ptr), _fake(dtype, (k, n))
        lists = (None, None) if masked else None
        pr = bsmm_gpu.Pruning(lists, None, rblk, kblk, 1)
        return bsmm_gpu._choose(choice, a, b, (True, k), (False, n), pr, c_row_major=True,
                                act=0)

    assert choose("float32", 1024, 4096, 4096) == ("ffma", (128, 128))
    assert choose("float32", 8192, 8192, 8192, 128, 128, True) == ("ffma", (128, 128))
    assert choose("float32", 1024, 1024, 1024, 128, 128, True) == ("ffma", (64, 64))
    assert choose("float32", 256, 1024, 1024, 128, 32, True) == ("ffma", (64, 64))
    assert choose("float32", 1024, 1024, 1024, 32, 32, True) == ("simple", None)
    with pytest.raises(ValueError, match="ffma kernel does not take.*multiples of 64"):
        choose("float32", 1024, 1024, 1024, 32, 32, True, choice="ffma")
    assert choose("float64", 1024, 1024, 1024) == ("simple", None)
    with pytest.raises(ValueError, match="ffma kernel does not take"):
        choose("float64", 1024, 1024, 1024, choice="ffma")
    assert choose("float16", 1024, 1024, 1024)[0] == "mma"
    monkeypatch.setenv("CUPY_TF32", "1")
    assert choose("float32", 1024, 1024, 1024)[0] == "mma"
    assert choose("float32", 1024, 1024, 1024, ptr=4) == ("ffma", (64, 64))  # unaligned
    assert choose("float32", 1024, 1024, 1024, choice="ffma") == ("ffma", (64, 64))


def test_the_dense_fallback_replaces_the_simple_kernel_and_narrow_kept_blocks(monkeypatch):
    """With cuBLASLt (nvmath-python), a pruned reduction that only the simple kernel would take
    (row blocks narrower than every tile: dsd_t under 32-unit blocks) runs densely on a masked
    copy in float16/bfloat16/float32, and so does a 16-bit one on Hopper whose kept blocks are
    narrower than the 64-wide k-step, and a 16-bit one on Hopper whose output (sdd) is pruned
    in blocks narrower than every tile without bias or activation; float64, the erf GELU and a
    forced kernel keep the kernels."""
    monkeypatch.setattr(bsmm_gpu._gemm, "available", lambda: True)
    monkeypatch.delenv("CUPY_TF32", raising=False)
    monkeypatch.setattr(bsmm_gpu.tma_mod, "available", lambda: True)

    ml_dtypes = pytest.importorskip("ml_dtypes")

    def choose(dtype, rblk, kblk, act=0, bits=None, choice="auto", sm90=True, cblk=1,
               bias=False):
        monkeypatch.setattr(bsmm_gpu.raw_kernels, "device_facts", lambda: (132, sm90))
        dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
        a, b = _fake(dtype, (4096, 1024)), _fake(dtype, (1024, 4096))
        lists = None if bits else (None, None)
        pr = bsmm_gpu.Pruning(lists, bits, rblk, kblk, cblk)
        return bsmm_gpu._choose(choice, a, b, (True, 1024), (False, 4096), pr,
                                c_row_major=True, act=act, has_bias=bias)

    for dtype in ("float32", "float16", "bfloat16"):
        assert choose(dtype, 32, 128) == ("dense", None)  # no tile's rows fit 32-row blocks
        assert choose(dtype, 32, 128, sm90=False) == ("dense", None)
    assert choose("float64", 32, 128) == ("simple", None)
    assert choose("float32", 32, 128, act=2) == ("simple", None)  # bsmm's GELU is erf's
    # sdd (bits, no lists): 32-wide output blocks skip no Hopper tile; 128-wide ones do
    assert choose("bfloat16", 128, 1, bits=(None,), cblk=32) == ("dense", None)
    assert choose("bfloat16", 128, 1, bits=(None,), cblk=128)[0] == "tma"
    assert choose("bfloat16", 128, 1, bits=(None,), cblk=32, bias=True)[0] == "tma"
    assert choose("bfloat16", 128, 1, bits=(None,), cblk=32, act=1)[0] == "tma"
    assert choose("bfloat16", 128, 1, bits=(None,), cblk=32, sm90=False)[0] == "mma"
    assert choose("float32", 128, 1, bits=(None,), cblk=32)[0] == "ffma"
    assert choose("float32", 32, 1, bits=(None,), cblk=32) == ("dense", None)  # no ffma tile
    assert choose("float32", 32, 128, choice="simple") == ("simple", None)
    # Hopper, 16-bit: 32-wide kept blocks go dense, 64-wide ones to the TMA kernel
    assert choose("bfloat16", 128, 32) == ("dense", None)
    assert choose("bfloat16", 128, 64)[0] == "tma"
    assert choose("bfloat16", 128, 32, act=2)[0] == "sm90"
    assert choose("bfloat16", 128, 32, sm90=False)[0] == "mma"  # not Hopper: the mma kernel
    assert choose("bfloat16", 128, 32, choice="sm90")[0] == "sm90"
    assert choose("float32", 128, 32) == ("ffma", (128, 128))  # ffma walks any kept width


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gpu_dense_fallback_equals_float64_math(dtype, monkeypatch):
    """The dense fallback (cuBLASLt on a masked copy; for sdd, cuBLASLt then the mask) where the
    dispatcher picks it: dsd with bias and ReLU, dsd_t and sdd under 128 x 32 and 32 x 24
    blocks, ragged edges, a C-contiguous, an odd-offset and a transposed output, against
    float64 math, the outputs poisoned. Every product whose pruned rows come in 32- or 24-row
    blocks runs densely (no kernel's tile fits); dsd and sdd under 128 x 32 blocks run ffma
    (float32), or densely where Hopper's kernels would take the output and mma where they would
    not (odd-offset and transposed outputs)."""
    cp = _gpu_or_skip("simple")
    from cudrop.functional import _gemm
    if not _gemm.available():
        pytest.skip("nvmath-python (cuBLASLt) not installed")
    ran = []
    launch = bsmm_gpu.launch

    def recorded(*a, **k):  # which kind each product ran, passed on to bsmm._run
        ran.append((form, block, launch(*a, **k)))
        return ran[-1][2]
    monkeypatch.setattr(bsmm_gpu, "launch", recorded)
    dt = low_precision_dtype(cp, dtype) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(3)
    for (m, k, n), block in (((264, 136, 200), (128, 32)), ((300, 96, 72), (32, 24))):
        a = cp.asarray(rng.standard_normal((m, k)).astype(np.float32)).astype(dt)
        w = cp.asarray(rng.standard_normal((k, n)).astype(np.float32)).astype(dt)
        g = cp.asarray(rng.standard_normal((m, n)).astype(np.float32)).astype(dt)
        bias = cp.asarray(rng.standard_normal(n).astype(np.float32)).astype(dt)
        mask = masks.block_mask((m, k), block, 0.4, seed=1, layer=2, step=3, xp=cp)
        keep = backend.asnumpy(mask.to_dense())
        f64 = lambda x: cp.asnumpy(x.astype(np.float32)).astype(np.float64)  # noqa: E731
        am = f64(a) * keep / 0.6
        want = {"dsd": np.maximum(am @ f64(w) + f64(bias), 0), "dsd_t": am.T @ f64(g),
                "sdd": f64(g) @ f64(w).T * keep / 0.6}
        for form, shape in (("dsd", (m, n)), ("dsd_t", (k, n)), ("sdd", (m, k))):
            plain = cp.full(shape, np.nan, dt)
            wide = cp.full((shape[0], shape[1] + 1), np.nan, dt)
            tall = cp.full(shape[::-1], np.nan, dt)
            for out in (plain, wide[:, 1:], tall.T):
                if form == "dsd":
                    bsmm.dsd(a, w, mask, 1 / 0.6, bias=bias, act="relu", out=out)
                elif form == "dsd_t":
                    bsmm.dsd_t(a, g, mask, 1 / 0.6, out=out)
                else:
                    bsmm.sdd(g, w.T, mask, 1 / 0.6, out=out)
                got = f64(out)
                assert not np.isnan(got).any(), (form, block)
                err = np.linalg.norm(got - want[form]) / np.linalg.norm(want[form])
                assert err < TOL[dtype], (form, block, err)
            assert cp.isnan(wide[:, 0]).all()
    assert len(ran) == 18
    assert all(kind == "dense" for form, block, kind in ran
               if form == "dsd_t" or block == (32, 24)), ran


def _dense_path_case(dtype, m, k, n, seed, monkeypatch):
    """Shared by the dense-path tests: ``(cp, x (m, k), w (k, n), b (n,), g (m, n), passes)``
    in ``dtype`` on a Hopper GPU with cuBLASLt, ``passes`` growing by one per
    ``masks.apply_block`` call (a masked pass over an operand)."""
    cp = _gpu_or_skip("sm90")
    from cudrop.functional import _gemm
    if not _gemm.available():
        pytest.skip("nvmath-python (cuBLASLt) not installed")
    dt = low_precision_dtype(cp, dtype)
    rng = np.random.default_rng(seed)
    x, w, b, g = (cp.asarray(rng.standard_normal(s).astype(np.float32)).astype(dt)
                  for s in ((m, k), (k, n), (n,), (m, n)))
    passes = []
    apply_block = masks.apply_block
    monkeypatch.setattr(masks, "apply_block", lambda *a, **kw: passes.append(1) or
                        apply_block(*a, **kw))
    return cp, x, w, b, g, passes


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_block_masked_linear_dense_path_masks_x_once(dtype, monkeypatch):
    """Under block-wise gyro's 128 x 32 blocks a 16-bit dsd runs densely on Hopper
    (``bsmm.runs_dense``), so ``block_masked_linear`` keeps its one masked copy of x for dW:
    one masked pass forward (x) and one backward (dX), where dsd + sdd + dsd_t would make
    three. Forward and gradients against float64 math, and against the block-sparse path
    (the simple kernel forced: no Hopper kernel takes dW's 32-row output blocks), ragged
    edges."""
    from cudrop.functional import _block_linear
    m, k, n = 300, 200, 136
    cp, x, w, b, g, passes = _dense_path_case(dtype, m, k, n, 4, monkeypatch)
    mask = masks.block_mask((m, k), (128, 32), 0.5, seed=2, layer=1, step=7, xp=cp)
    assert bsmm.runs_dense("dsd", x, w, mask, 2.0, bias=b)
    assert not bsmm.runs_dense("dsd", x.astype(np.float64), w.astype(np.float64), mask, 2.0)
    y, saved = _block_linear.block_masked_linear(x, w, b, mask)
    gx, gw, gb = _block_linear.block_masked_linear_backward(g, saved)
    assert saved.dense is not None and len(passes) == 2
    f64 = lambda a: cp.asnumpy(a.astype(np.float32)).astype(np.float64)  # noqa: E731
    keep = backend.asnumpy(mask.to_dense())
    xm = f64(x) * keep * 2.0
    want = {"y": xm @ f64(w) + f64(b), "gx": (f64(g) @ f64(w).T) * keep * 2.0,
            "gw": xm.T @ f64(g), "gb": f64(g).sum(axis=0)}
    with bsmm.use_kernel("simple"):
        assert not bsmm.runs_dense("dsd", x, w, mask, 2.0, bias=b)
        y2, saved2 = _block_linear.block_masked_linear(x, w, b, mask)
        grads2 = _block_linear.block_masked_linear_backward(g, saved2)
    assert saved2.dense is None
    for name, got, kernel_got in zip(("y", "gx", "gw", "gb"), (y, gx, gw, gb), (y2,) + grads2):
        for a in (got, kernel_got):
            err = np.linalg.norm(f64(a) - want[name]) / np.linalg.norm(want[name])
            assert err < TOL[dtype], (name, err)
    assert (f64(gx)[~keep] == 0).all()


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_blockwise_out_dense_backward_masks_g_once(dtype, monkeypatch):
    """Output pruning under 128 x 32 blocks on Hopper: its backward's products run densely, so
    g is masked once (not by dsd, dsd_t and the bias sum each); gradients against float64
    math, ragged edges."""
    from cudrop.variants import blockwise
    m, k, n = 300, 136, 200
    cp, x, w, b, g, passes = _dense_path_case(dtype, m, k, n, 6, monkeypatch)
    mask = masks.block_mask((m, n), (128, 32), 0.5, seed=2, layer=1, step=7, xp=cp)
    _, saved = blockwise.blockwise_linear_out(x, w, b, mask=mask)
    assert bsmm.runs_dense("dsd", g, w.T, mask, 2.0)
    passes.clear()  # count the backward's passes only
    gx, gw, gb = blockwise.blockwise_linear_out_backward(g, saved)
    assert len(passes) == 1
    f64 = lambda a: cp.asnumpy(a.astype(np.float32)).astype(np.float64)  # noqa: E731
    gm = f64(g) * backend.asnumpy(mask.to_dense()) * 2.0
    for name, got, want in (("gx", gx, gm @ f64(w).T), ("gw", gw, f64(x).T @ gm),
                            ("gb", gb, gm.sum(axis=0))):
        err = np.linalg.norm(f64(got) - want) / np.linalg.norm(want)
        assert err < TOL[dtype], (name, err)


def test_runs_dense_is_false_on_numpy():
    """The NumPy reference is never the dense fallback: block_masked_linear keeps x there."""
    from cudrop.functional import _block_linear
    x, w = np.ones((8, 64), np.float32), np.ones((64, 4), np.float32)
    mask = masks.block_mask((8, 64), (4, 32), 0.5, seed=0, layer=0, step=0)
    assert not bsmm.runs_dense("dsd", x, w, mask)
    _, saved = _block_linear.block_masked_linear(x, w, None, mask)
    assert saved.dense is None and saved.x is not None


def test_ffma_float4_loads_only_where_every_chunk_is_whole():
    vec = bsmm_gpu._ffma_vec
    k_major, n_major = (True, 4096), (False, 4096)
    assert vec(0, 0, k_major, n_major, 1024, 4096, 4096, 1, None)
    assert vec(0, 0, k_major, n_major, 1024, 4096, 4096, 128, ([0], [0]))
    assert not vec(4, 0, k_major, n_major, 1024, 4096, 4096, 1, None)  # 4-byte aligned base
    assert not vec(0, 0, (True, 4097), n_major, 1024, 4096, 4096, 1, None)  # lda
    assert not vec(0, 0, k_major, n_major, 1024, 4096, 4094, 1, None)  # K of a K-major operand
    assert not vec(0, 0, k_major, n_major, 1024, 4096, 4096, 13, ([0], [0]))  # kept width
    assert not vec(0, 0, k_major, (False, 4096), 1024, 4094, 4096, 1, None)  # N of N-major b
    # M-major a and N-major b (dsd_t): K and the kept width are not along a contiguous axis
    assert vec(0, 0, (False, 1024), n_major, 1024, 4096, 4093, 13, ([0], [0]))
    assert not vec(0, 0, (False, 1024), n_major, 1022, 4096, 4096, 1, None)


def test_pick_tile_respects_row_blocks():
    for rblk in (64, 128, 192, 256):
        for m, n in ((64, 64), (1024, 1024), (8192, 8192)):
            bm, bn, *_ = bsmm_gpu.pick_tile(m, n, rblk, True, 132)
            assert rblk % bm == 0
    assert bsmm_gpu.pick_tile(1024, 1024, 32, True, 132) is None
    assert bsmm_gpu.pick_tile(8192, 8192, 32, False, 132) == bsmm_gpu.MMA_TILES[0]
    assert bsmm_gpu.pick_tile(8192, 8192, 64, True, 132, bsmm_gpu.SM90_TILES) is None
    tma = bsmm_gpu.TMA_TILES
    assert bsmm_gpu.pick_tile(8192, 8192, 128, True, 132, tma)[:2] == (128, 256)
    # an output mask of 128-wide blocks: 128-wide tiles, so a dropped block is a skipped tile
    assert bsmm_gpu.pick_tile(8192, 8192, 128, True, 132, tma, cblk=128)[:2] == (128, 128)
    # small problems: the most CTAs (64-row tiles where the row blocks allow them)
    assert bsmm_gpu.pick_tile(1024, 1024, 128, True, 132, tma)[:2] == (64, 128)
    assert bsmm_gpu.pick_tile(1024, 1024, 128, True, 132, tma, cblk=128)[:2] == (64, 128)


def test_errors(xp):
    a, b = xp.ones((8, 4)), xp.ones((4, 3))
    mask = masks.block_mask((8, 4), (4, 4), 0.5, seed=0, layer=0, step=0, xp=xp)
    with pytest.raises(TypeError, match="BlockMask"):
        bsmm.dsd(a, b, "mask")
    with pytest.raises(ValueError, match="align"):
        bsmm.dsd(a, xp.ones((5, 3)), mask)
    with pytest.raises(TypeError, match="dtypes differ"):
        bsmm.dsd(a, b.astype(np.float32), mask)
    with pytest.raises(ValueError, match="mask covers"):
        bsmm.sdd(a, b, mask)
    with pytest.raises(ValueError, match="act must be"):
        bsmm.dsd(a, b, mask, act="tanh")
    with pytest.raises(ValueError, match="out must be"):
        bsmm.dsd(a, b, mask, out=xp.empty((3, 3)))
    with pytest.raises(ValueError, match="bias"):
        bsmm.dsd(a, b, mask, bias=xp.ones(4))


@gpu
@pytest.mark.parametrize("kernel", ["simple", "ffma", "mma", "sm90", "tma"])
def test_gpu_dense_launch_without_mask(kernel):
    """The kernels with neither lists nor bits (a plain GEMM; the tma kernel then runs a
    persistent grid, one CTA per SM walking several tiles: 17 x 17 tiles here) against float64
    math."""
    cp = _gpu_or_skip(kernel)
    dtype = np.float32 if kernel == "ffma" else np.float16
    rng = np.random.default_rng(7)
    for m, k, n in ((2056, 264, 4104), (136, 64, 264)):
        a = cp.asarray(rng.standard_normal((m, k))).astype(dtype)
        b = cp.asarray(rng.standard_normal((k, n))).astype(dtype)
        out = cp.full((m, n), np.nan, dtype)
        bsmm_gpu.launch(a, b, out, scale=0.5, kernel=kernel)
        ref = 0.5 * cp.asnumpy(a).astype(np.float64) @ cp.asnumpy(b).astype(np.float64)
        got = cp.asnumpy(out).astype(np.float64)
        assert not np.isnan(got).any()
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < TOL[np.dtype(dtype).name]


@gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gpu_output_views_odd_offset_and_transposed(dtype):
    """``out`` as a view: a column offset of one element (rows aligned to one element only) and
    a transposed view; every kernel the dispatcher picks (float32: ffma) must write exactly the
    view."""
    cp = _gpu_or_skip("simple")
    rng = np.random.default_rng(9)
    m, k, n = 264, 136, 200
    a = cp.asarray(rng.standard_normal((m, k))).astype(dtype)
    b = cp.asarray(rng.standard_normal((k, n))).astype(dtype)
    mask = masks.block_mask((m, k), (128, 64), 0.5, seed=1, layer=2, step=3, xp=cp)
    ref = (cp.asnumpy(a).astype(np.float64) * backend.asnumpy(mask.to_dense())) \
        @ cp.asnumpy(b).astype(np.float64)
    big = cp.full((m, n + 1), np.nan, dtype)
    bsmm.dsd(a, b, mask, out=big[:, 1:])
    tbig = cp.full((n, m), np.nan, dtype)
    bsmm.dsd(a, b, mask, out=tbig.T)
    for got in (big[:, 1:], tbig.T):
        g = cp.asnumpy(got).astype(np.float64)
        assert np.linalg.norm(g - ref) / np.linalg.norm(ref) < TOL[dtype]
    assert cp.isnan(big[:, 0]).all()  # the column outside the view is untouched


def test_use_kernel_validates_and_restores():
    assert bsmm._KERNEL.get() is None
    with pytest.raises(ValueError, match=r"use_kernel: name must be one of 'simple', 'ffma', "
                                         r"'mma', 'sm90', 'tma' or None, got 'fast'"):
        bsmm.use_kernel("fast")
    with bsmm.use_kernel("mma"):
        assert bsmm._KERNEL.get() == "mma"
        with bsmm.use_kernel(None):
            assert bsmm._KERNEL.get() is None
        assert bsmm._KERNEL.get() == "mma"
        with pytest.raises(RuntimeError):
            with bsmm.use_kernel("simple"):
                raise RuntimeError  # the choice is restored on the way out of an error too
        assert bsmm._KERNEL.get() == "mma"
    assert bsmm._KERNEL.get() is None


def test_use_kernel_leaves_the_numpy_reference_alone():
    """NumPy operands run the reference whatever the choice."""
    check(np, "dsd", 40, 24, 16, (8, 8), 0.5, "float64", kernel="tma", bias=True, act="relu")


def test_16_bit_products_the_tensor_cores_refuse_are_copied_into_a_layout_they_take():
    """A 10-class head (N = 10) in bf16: the mma kernel's 16-byte chunks do not fit an extent of
    10 along a contiguous axis. The automatic choice copies the cheapest operand(s) into the
    other major order instead of falling to the 16x16 simple kernel: forward copies the small
    weight, dX copies both small operands, the weight gradient copies x transposed."""
    from types import SimpleNamespace

    def fake(shape):
        return SimpleNamespace(dtype=np.dtype(np.float16), itemsize=2, size=int(np.prod(shape)),
                               data=SimpleNamespace(ptr=0))

    m, k, n = 1024, 4096, 10
    # dsd: x (m, k) K-major, w (k, n) N-major (row-major w: ld n)
    assert bsmm_gpu._relayout(fake((m, k)), fake((k, n)), (True, k), (False, n), m, n, k, 128,
                              ("c", "i")) == (None, True)
    # sdd for dX: g (m, n) K-major over K = n, wᵀ (n, k) viewed K-major with ld n
    assert bsmm_gpu._relayout(fake((m, n)), fake((n, k)), (True, n), (True, n), m, k, n, 1,
                              None) == (False, False)
    # dsd_t for dW: xᵀ (k, m) M-major (ld k), g (m, n) N-major (ld n)
    assert bsmm_gpu._relayout(fake((k, m)), fake((m, n)), (False, k), (False, n), k, n, m, 128,
                              ("c", "i")) == (True, True)
    # no copy helps kept blocks 3 wide along K (the lists need multiples of 8)
    assert bsmm_gpu._relayout(fake((m, 3)), fake((3, n)), (True, 3), (False, n), m, n, 3, 3,
                              ("c", "i")) is None
