"""Launch every RawKernel on small ragged shapes; run under compute-sanitizer
(memcheck, racecheck) by scripts/device_run.sh."""
import sys

import numpy as np

sys.path.insert(0, ".")
import cupy as cp  # noqa: E402

from cudrop import masks  # noqa: E402
from cudrop.functional import _conv as Fconv, _norm as Fnorm
from cudrop.variants import dropout as F  # noqa: E402

for n in (1, 31, 127, 129, 1000, 70000):
    for dt in (np.float16, np.float32, np.float64):
        x = cp.ones(n, dt)
        y, saved = F.dropout(x, 0.3, seed=1, layer=2, step=n)
        F.dropout_backward(y, saved)
        F.dropout(x, 0.3, seed=1, layer=2, step=cp.asarray(n, dtype=np.uint32))  # device step
for shape, block in [((1, 1), (1, 1)), ((130, 70), (128, 32)), ((700, 300), (1, 1)),
                     ((5, 3000), (2, 3))]:
    masks.block_mask(shape, block, 0.5, seed=0, layer=0, step=0, xp=cp)
    masks.block_mask(shape, block, 0.5, seed=0, layer=0, step=cp.asarray(1, dtype=np.uint32),
                     xp=cp)
# conv2d (im2col, swap01, col2im; 1x1 stride-1 convolutions both as cuBLASLt GEMMs and through
# im2col) and batch norm (stats, fwd, backward sums and apply, and the in-kernel merges of split
# reductions; with and without the fused ReLU) on ragged shapes: strides and paddings that leave
# edge windows partial, odd channel counts, (N, C) input. The reductions split each channel over
# S CTAs where C is small: the host's rule (S = N on the small-N shapes, 53 and 14 on 132 SMs for
# (300, 5) and (40, 20, 9)), then S forced to 3 (N not a multiple of S); S = 1 where C alone
# fills the GPU or exceeds what the merge holds in shared memory, (4, 600).
try:
    import ml_dtypes
    bf16 = [ml_dtypes.bfloat16]
    cp.zeros(1, bf16[0])
except Exception:
    bf16 = []


def conv_and_norm(dt):
    for xs, ws, stride, pad in [((1, 1, 1, 1), (1, 1, 1, 1), 1, 0),
                                ((3, 5, 7, 9), (6, 5, 3, 2), (2, 1), (1, 2)),
                                ((2, 3, 11, 5), (4, 3, 4, 4), 3, 2),
                                ((5, 7, 6, 6), (3, 7, 1, 1), 2, 0),
                                ((3, 2, 5, 7), (3, 2, 3, 3), 1, (0, 1)),  # unrolled 3x3 paths
                                ((2, 3, 7, 5), (4, 3, 3, 3), 2, 1),
                                ((3, 5, 4, 7), (6, 5, 1, 1), 1, 0),  # 1x1, stride 1: GEMMs
                                ((1, 3, 1, 1), (2, 3, 1, 1), 1, 0)]:
        x = cp.asarray(np.random.default_rng(0).standard_normal(xs)).astype(dt)
        w = cp.asarray(np.random.default_rng(1).standard_normal(ws)).astype(dt)
        for conv in (Fconv.conv2d, Fconv._conv2d_cols):
            y, saved = conv(x, w, w[:, 0, 0, 0].copy(), stride, pad)
            Fconv.conv2d_backward(y, saved)
    rule = Fnorm._bn_split
    for shape in [(2, 1), (3, 5), (2, 3, 7), (5, 3, 7, 3), (4, 17, 33, 35), (16, 3, 33, 35),
                  (300, 5), (40, 20, 9), (4, 600), (6, 5, 4, 4), (3, 4, 2, 12)]:
        x = cp.asarray(np.random.default_rng(2).standard_normal(shape)).astype(dt)
        c = shape[1]
        gamma, beta = cp.ones(c, dt), cp.zeros(c, dt)
        for split in (rule, lambda nb, c: min(3, nb)):
            Fnorm._bn_split = split
            try:
                for training in (True, False):
                    for act in (None, "relu"):
                        rm, rv = cp.zeros(c, np.float32), cp.ones(c, np.float32)
                        y, saved = Fnorm.batch_norm(x, gamma, beta, rm, rv, training, act=act)
                        Fnorm.batch_norm_backward(y, saved)
                for act in (None, "relu"):
                    y, saved = Fnorm.batch_norm(x, None, None, None, None, True, act=act)
                    Fnorm.batch_norm_backward(y, saved)
            finally:
                Fnorm._bn_split = rule


def conv_batch_norm_fused():
    """conv_norm.cu: the fused 1x1 convolution + batch norm, both directions, with and without
    the ReLU and running statistics: a ragged last tile (35 pixels), fewer pixels than a pixel
    group (3), odd and the most channels (64), rows past O and columns past C of the tiles."""
    from cudrop.functional import _conv_norm as Fcn
    rng = np.random.default_rng(3)
    for dt in [np.float32, np.float16] + bf16:
        for (n, c, h, w, o) in [(5, 3, 7, 5, 4), (7, 2, 1, 3, 3), (3, 64, 6, 6, 64),
                                (9, 33, 4, 8, 17)]:
            x = cp.asarray(rng.standard_normal((n, c, h, w))).astype(dt)
            wt = cp.asarray(rng.standard_normal((o, c, 1, 1))).astype(dt)
            gamma, beta = cp.ones(o, dt), cp.zeros(o, dt)
            for act, run in ((None, True), ("relu", False)):
                rm, rv = (cp.zeros(o, np.float32), cp.ones(o, np.float32)) if run else (None, None)
                z, saved = Fcn.conv_batch_norm(x, wt, gamma, beta, rm, rv, True, act=act)
                assert saved.conv is None  # the fused kernels ran
                Fcn.conv_batch_norm_backward(z, saved)


def block_sparse_gemms(dt, kernel):
    """dsd, dsd_t, sdd on ragged shapes with dropped blocks, rows with every block dropped and a
    transposed operand, through one forced kernel (None: the dispatcher's choice, the tensor-core
    kernels where they apply, and the dense fallback's masked copy, block_apply, under 32-row
    and 32-wide blocks and at K = 37, its one-element path)."""
    from cudrop import bsmm
    rng = np.random.default_rng(3)
    for m, k, n, block in [(200, 136, 264, (64, 64)), (128, 64, 8, (128, 32)),
                           (136, 520, 72, (128, 128)), (130, 37, 40, (32, 8))]:
        a = cp.asarray(rng.standard_normal((m, k))).astype(dt)
        b = cp.asarray(rng.standard_normal((n, k))).astype(dt).T  # K-major view
        dy = cp.asarray(rng.standard_normal((m, n))).astype(dt)
        for p in (0.0, 0.5, 0.99):
            mk = masks.block_mask((m, k), block, p, seed=5, layer=0, step=1, xp=cp)
            with bsmm.use_kernel(kernel):
                bsmm.dsd(a, b, mk, 2.0, bias=cp.ones(n, dt), act="relu")
                bsmm.dsd_t(a, dy, mk, 2.0)
                bsmm.sdd(dy, b.T, mk, 2.0)


def tma_persistent():
    """The tma kernel's persistent grid under masks, with more tiles than SMs so that each CTA
    walks several tiles of uneven work (its producer running ahead into the next tile): dsd
    9 x 17 tiles, sdd 9 x 33, dsd_t 9 x 17, half the blocks dropped and none."""
    from cudrop import bsmm
    if cp.cuda.Device().compute_capability != "90":
        return
    rng = np.random.default_rng(4)
    m, k, n = 1032, 128, 4104
    a = cp.asarray(rng.standard_normal((m, k))).astype(np.float16)
    b = cp.asarray(rng.standard_normal((k, n))).astype(np.float16)
    c = cp.asarray(rng.standard_normal((k, m))).astype(np.float16)
    dy = cp.asarray(rng.standard_normal((k, n))).astype(np.float16)
    for p in (0.0, 0.5):
        with bsmm.use_kernel("tma"):
            bsmm.dsd(a, b, masks.block_mask((m, k), (128, 64), p, seed=1, layer=0, step=0,
                                            xp=cp), 2.0)
            bsmm.sdd(a, b, masks.block_mask((m, n), (128, 128), p, seed=2, layer=0, step=0,
                                            xp=cp), 2.0)
            bsmm.dsd_t(c, dy, masks.block_mask((k, m), (64, 128), p, seed=3, layer=0, step=0,
                                               xp=cp), 2.0)


def ffma_gemms():
    """The exact float32 kernel (ffma) on ragged edges: M, N, K not multiples of its tiles or of
    4 (one-float loads), kept blocks 13 wide (not multiples of its k-step of 8), a transposed
    operand, the tile skip of sdd and a partially kept tile; and on aligned extents (float4
    loads). The masked calls run the 64-row tiles (small problems); the 128x128 tile is forced
    on a dense product, aligned and ragged."""
    from cudrop import bsmm
    from cudrop.bsmm import dispatch
    rng = np.random.default_rng(4)
    for m, k, n, block in [(201, 77, 130, (128, 13)), (136, 64, 72, (64, 64))]:
        a = cp.asarray(rng.standard_normal((m, k)), np.float32)
        b = cp.asarray(rng.standard_normal((n, k)), np.float32).T  # K-major view
        dy = cp.asarray(rng.standard_normal((m, n)), np.float32)
        for p in (0.0, 0.5):
            mk = masks.block_mask((m, k), block, p, seed=6, layer=0, step=1, xp=cp)
            mo = masks.block_mask((m, k), block, p, seed=7, layer=0, step=1, xp=cp)  # sdd's out
            with bsmm.use_kernel("ffma"):
                bsmm.dsd(a, b, mk, 2.0, bias=cp.ones(n, np.float32), act="gelu")
                bsmm.sdd(dy, b.T, mo, 2.0, bias=cp.ones(k, np.float32), act="relu")
                bsmm.dsd_t(a, dy, masks.block_mask((m, k), block[::-1], p, seed=8, layer=0,
                                                   step=1, xp=cp), 2.0)
    for m, k, n in [(1032, 36, 264), (1030, 37, 259)]:
        a = cp.asarray(rng.standard_normal((m, k)), np.float32)
        b = cp.asarray(rng.standard_normal((k, n)), np.float32)
        dispatch.launch(a, b, cp.empty((m, n), np.float32), kernel="ffma", tile=(128, 128))


for dt in [np.float16, np.float32, np.float64]:
    conv_and_norm(dt)
    block_sparse_gemms(dt, "simple")
block_sparse_gemms(np.float32, None)  # the dispatcher's choice: ffma where a tile fits
ffma_gemms()
for dt in [np.float16] + bf16:
    block_sparse_gemms(dt, None)
tma_persistent()
for dt in bf16:  # CuPy's own bfloat16 ops (casts, sums) may lag: report, do not stop
    try:
        conv_and_norm(dt)
    except Exception as e:
        print(f"bfloat16 conv/norm launches stopped: {type(e).__name__}: {e}")


def index_checks():
    """checks.cu on ragged sizes and index dtypes, and the ops that consume a bad index (CuPy's
    wrapping take / take_along_axis / add.at): memcheck shows that nothing is read or written
    outside the arrays while the failure waits for its check point."""
    import cudrop
    from cudrop import _checks
    from cudrop.functional import _embedding as Femb, _loss as Floss

    def expect_failure():
        try:
            cudrop.check_errors()
        except cudrop.IndexRangeError:
            return
        raise AssertionError("a bad index was not recorded")

    for n in (1, 255, 4096, 4097, 70000):
        for dt in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32, np.uint64):
            a = cp.zeros(n, dt)
            _checks.check_index_range("a", a, 0, 10, op="sanitize")
            a[n - 1] = 100
            _checks.check_index_range("a", a, 0, 10, op="sanitize")
            expect_failure()
    logits = cp.ones((7, 5), np.float32)
    t = cp.asarray([0, 5, -1, 4, 1000, 2, -(1 << 40)])
    loss, saved = Floss.cross_entropy(logits, t, reduction="none")
    Floss.cross_entropy_backward(cp.ones_like(loss), saved)
    expect_failure()
    w = cp.ones((5, 3), np.float32)
    i = cp.asarray([[0, 5], [-7, 1 << 40]])
    out, saved = Femb.embedding(i, w)
    Femb.embedding_backward(cp.ones_like(out), saved)
    expect_failure()


def optimizers_and_activations():
    """optim.cu (fused SGD / Adam, with and without a master copy; the multi-parameter
    launches over views and sizes 0-70001), act.cu's ReLU backward, add, add + ReLU, the gated
    ends (the end with its ReLU, the start's backward) and tanh GELU, and softmax.cu's rows on
    ragged sizes (the grid-stride tails, rows of 1, 31, 33 and 300 elements, more rows than one
    grid of warps covers)."""
    from cudrop.autograd import Tensor
    from cudrop.functional import _act, _gate
    from cudrop.optim import SGD, Adam
    for n in (1, 255, 257, 70001):
        for dt in [np.float32, np.float64, np.float16] + bf16:
            x = cp.asarray(np.linspace(-1, 1, n)).astype(dt)
            y, saved = _act.relu(x)
            _act.relu_backward(cp.ones_like(y), saved)
            y, saved = _act.add_relu(x, x[::-1].copy())
            _act.add_relu_backward(cp.ones_like(y), saved)
            y = _act.add(x, x[::-1].copy())
            for s in (1.0, 0.0):  # the gated end with its ReLU (a kept and a skipped body)
                scale = cp.asarray(np.asarray(s, dtype=dt))
                y, saved = _gate.gate_out(x, y, scale, act="relu")
                _gate.gate_out_backward(cp.ones_like(y), saved)
                _gate.gate_in_backward(y, _gate.gate_in(x, scale)[1])
            y, saved = _act.gelu_tanh(x)
            _act.gelu_tanh_backward(y, saved)
            for opt in (SGD, Adam):
                p = Tensor(cp.ones(n, dt), requires_grad=True)
                o = opt([p], lr=0.1, **({"momentum": 0.9} if opt is SGD else {}))
                for _ in range(2):
                    p.grad = cp.ones(n, dt)
                    o.step()
    for dt in [np.float32, np.float64] + bf16:  # the multi-parameter launches (48 a launch)
        for opt in (SGD, Adam):
            ps = [Tensor(cp.ones(n, dt)[n % 2:], requires_grad=True) for n in (1, 2, 255, 257,
                                                                                70001) * 11]
            o = opt(ps, lr=0.1, **({"momentum": 0.9} if opt is SGD else {}))
            for _ in range(2):
                for p in ps:
                    p.grad = cp.ones(p.data.size, dt)
                o.step()


def last_axis_rows():
    """lastaxis.cu: softmax and layer norm (with and without gamma/beta) on rows shorter and
    longer than a warp and more rows than the grid's warps."""
    from cudrop.functional import _norm, _softmax
    for shape in [(1, 1), (3, 31), (2, 3, 33), (5, 300), (4096 * 8 + 3, 2)]:
        for dt in [np.float32, np.float64, np.float16] + bf16:
            x = cp.asarray(np.random.default_rng(0).standard_normal(shape)).astype(dt)
            y, saved = _softmax.softmax(x)
            _softmax.softmax_backward(y, saved)
            for affine in (cp.ones(shape[-1], dt), None):
                y, saved = _norm.layer_norm(x, affine, affine)
                _norm.layer_norm_backward(y, saved)


def column_sums():
    """reduce.cu: sums over leading axes (plain, of products, both at once, written as g's
    dtype and as float32/float64) on ragged shapes, with the host's row chunks and with them
    forced to 3 ragged chunks and to 1000 (1-row chunks on the small shapes): the merge."""
    from cudrop.functional import _reduce as R
    rule = R._row_chunks

    def forced(split):
        def chunks(r, c, bx):
            rows = -(-r // min(split, r))
            return -(-r // rows), rows
        return chunks

    for shape in [(1, 1), (1, 7), (7, 1), (33, 7), (7, 33), (1000, 33), (70001, 7), (3, 1000)]:
        for dt in [np.float32, np.float64, np.float16] + bf16:
            rng = np.random.default_rng(7)
            g = cp.asarray(rng.standard_normal(shape)).astype(dt)
            acc = R.compute_dtype(g.dtype)
            x = cp.asarray(rng.standard_normal(shape)).astype(acc)
            for chunks in (rule, forced(3), forced(1000)):
                R._row_chunks = chunks
                try:
                    R.sum_leading(g)
                    R.sum_leading(g, 1, x, with_plain=True)
                    R.sum_leading(g, 1, x, dtype=acc)
                finally:
                    R._row_chunks = rule


def slices_on_the_device():
    """slice.cu: SliceOut's gather and scatter with the start decided on the device, on ragged
    shapes (wrap mode over odd unit counts, aligned mode, slices that wrap, keep == n, a single
    unit), forward and backward of the three Linear forms (the compact one: a weight block
    sliced along both axes), and the start kernel."""
    from cudrop.variants import sliceout as S
    rng = np.random.default_rng(5)

    def valid(units, p, align):
        try:
            S.num_starts(units, S.keep_count(units, p, align), align)
            return True
        except ValueError:
            return False

    for (m, k, n), p, align in [((1, 1, 1), 0.5, None), ((37, 53, 29), 0.5, None),
                                ((5, 21, 3), 0.5, 8), ((130, 100, 70), 0.0, None),
                                ((3, 1000, 7), 0.999, None), ((64, 256, 96), 0.3, 32)]:
        for dt in [np.float16, np.float32, np.float64] + bf16:
            x = cp.asarray(rng.standard_normal((m, k))).astype(dt)
            w = cp.asarray(rng.standard_normal((k, n))).astype(dt)
            b = cp.asarray(rng.standard_normal(n)).astype(dt)
            for step in (0, 7):
                d = cp.asarray(step, dtype=np.uint32)
                y, saved = S.sliceout_linear(x, w, b, p, seed=1, layer=2, step=d, align=align)
                S.sliceout_linear_backward(y, saved)
                if valid(m, p, align):  # the output form slices the m units of x.T
                    y, saved = S.sliceout_linear_out(w.T.copy(), x.T.copy(), None, p, seed=1,
                                                     layer=2, step=d, align=align)
                    S.sliceout_linear_out_backward(y, saved)
                if valid(k, p, align) and valid(n, p, align):  # the compact form
                    mi = S.draw_mask(k, p, seed=1, layer=2, step=d, align=align)
                    mo = S.draw_mask(n, p, seed=1, layer=3, step=d, align=align)
                    y, saved = S.sliceout_linear_compact(x[:, :mi.keep].copy(), w, b,
                                                         in_mask=mi, out_mask=mo)
                    S.sliceout_linear_compact_backward(y, saved)
        S._device_starts(k, p, seed=1, layer=2, steps=cp.arange(300, dtype=np.uint32),
                         align=align)


def gyro_on_the_device():
    """gyro.cu: element gyro dropout with the sub-networks decided on the device, on ragged
    shapes (ragged row groups, B < τ, a rank's rows of a global batch, units last and in the
    middle, sizes that leave a partial last vector), both schedules, forward and backward, and
    a contiguous view at an odd offset (copied for the vector loads)."""
    from dataclasses import replace
    from cudrop.variants import gyro as G, gyro_schedule
    rng = np.random.default_rng(6)
    kw = dict(seed=1, layer=2, num_subnets=64, co_scheduled=4, period=3)
    for shape, axis, ragged, rows in [((1, 1), None, True, None), ((3, 9), None, True, None),
                                      ((10, 7), None, True, None), ((8, 6, 5), 1, False, None),
                                      ((6, 2, 3, 5), None, True, None),
                                      ((130, 1001), None, True, None),
                                      ((5, 11), None, True, (5, 17))]:
        for dt in [np.float16, np.float32, np.float64] + bf16:
            x = cp.asarray(rng.standard_normal(shape)).astype(dt)
            for schedule in ("consecutive", "random"):
                d = cp.asarray(7, dtype=np.uint32)
                units = shape[gyro_schedule.unit_axis_of(shape, axis)]
                mask = replace(G.draw_mask(units, 0.5, step=d, schedule=schedule, xp=cp,
                                           **kw), rows=rows)
                y, saved = G.gyro_dropout(x, mask=mask, unit_axis=axis, ragged=ragged)
                G.gyro_dropout_backward(y, saved)
    buf = cp.ones(8 * 37 + 1, np.float32)
    G.gyro_dropout(buf[1:].reshape(8, 37), 0.5, step=cp.asarray(1, dtype=np.uint32), **kw)
    # block-wise gyro's row-block ids (gyro_block_row_ids), then the block mask read from them:
    # one row block, several with a ragged last one, a rank's blocks of a global batch
    for shape, offset, total in [((1, 1), 0, None), ((300, 70), 0, None),
                                 ((1000, 300), 3, 20)]:
        for schedule in ("consecutive", "random"):
            gyro_schedule.blockwise_mask(shape, 0.5, step=cp.asarray(5, dtype=np.uint32),
                                         xp=cp, schedule=schedule, row_block_offset=offset,
                                         total_row_blocks=total, **kw)


def fused_attention():
    """attention.cu: forward, the row dot and both backward kernels, every head dim, lengths
    below, at and across the 64-row blocks, causal or not, and a misaligned view (copied)."""
    from cudrop.functional import _attention as A
    rng = np.random.default_rng(7)
    for dt in [np.float16] + bf16:
        for (b, t, h, hd) in [(1, 1, 1, 16), (2, 17, 3, 32), (1, 64, 2, 64), (2, 130, 1, 64),
                              (1, 197, 2, 16)]:
            qkv = cp.asarray(rng.standard_normal((b, t, 3 * h * hd))).astype(dt)
            for causal in (False, True):
                y, saved = A.attention(qkv, h, causal=causal)
                A.attention_backward(y, saved)
        flat = cp.ones(2 * 5 * 3 * 64 + 1, dt)
        y, saved = A.attention(flat[1:].reshape(2, 5, 192), 1)
        A.attention_backward(y, saved)


index_checks()
conv_batch_norm_fused()
fused_attention()
optimizers_and_activations()
last_axis_rows()
column_sums()
slices_on_the_device()
gyro_on_the_device()
cp.cuda.Device().synchronize()
print("sanitize run ok")
