"""Index checks that never make the host wait (cudrop._checks): a bad class target of
cross_entropy or a bad embedding index raises IndexRangeError naming the op, the argument, the
position, the value and the range, at once on NumPy and at the next check point on the GPU
(``cudrop.check_errors``, ``Tensor.item``, the Trainer), where the op itself neither raised nor
waited; the first failure wins, a check point clears it, and the garbage in between never
reads outside the arrays."""
from types import SimpleNamespace

import numpy as np
import pytest

import cudrop
from cudrop import _checks, models, optim
from cudrop.functional import _embedding as Femb
from cudrop.functional import _loss as Floss
from cudrop.train import ClassifierTask, Trainer
from conftest import raises_at_check

CE_17 = r"^cross_entropy: targets\[17\] = 12 is outside \[0, 10\)$"


def _logits(xp, n=20, c=10):
    return xp.asarray(np.random.default_rng(0).normal(size=(n, c)))


def _targets(xp, n=20, c=10, bad=None):
    t = np.arange(n) % c
    for pos, v in (bad or {}).items():
        t[pos] = v
    return xp.asarray(t)


def test_cross_entropy_bad_target(xp):
    logits, targets = _logits(xp), _targets(xp, bad={17: 12})
    assert issubclass(cudrop.IndexRangeError, IndexError)
    assert issubclass(cudrop.IndexRangeError, ValueError)  # as before: an argument error
    raises_at_check(xp, CE_17, lambda: Floss.cross_entropy(logits, targets))
    # the Tensor op, through the backward too: the garbage stays inside the arrays
    x = cudrop.Tensor(logits, requires_grad=True)

    def step():
        loss = cudrop.cross_entropy(x, targets)
        loss.backward()
        return loss
    loss = raises_at_check(xp, CE_17, step)
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()  # no CUDA error: nothing read out of bounds
        assert loss.shape == () and x.grad.shape == logits.shape


def test_cross_entropy_position_is_a_multi_index(xp):
    logits = xp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4)))
    targets = xp.asarray(np.array([[0, 1, 2], [3, -1, 0]]))
    raises_at_check(xp, r"cross_entropy: targets\[1, 1\] = -1 is outside \[0, 4\)",
                    lambda: cudrop.cross_entropy(logits, targets))


def test_embedding_bad_index(xp):
    w = cudrop.Tensor(xp.asarray(np.random.default_rng(2).normal(size=(5, 3))),
                      requires_grad=True)
    idx = xp.asarray(np.array([[0, 1, 4], [2, 3, 7]]))

    def step():
        out = cudrop.embedding(idx, w)
        out.sum().backward()  # add.at with the bad index: wraps on CuPy, never out of bounds
        return out
    out = raises_at_check(xp, r"^embedding: indices\[1, 2\] = 7 is outside \[0, 5\)$", step)
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()
        assert out.shape == (2, 3, 3) and w.grad.shape == (5, 3)
    raises_at_check(xp, r"embedding: indices\[0\] = -1 is outside \[0, 5\)",
                    lambda: Femb.embedding(xp.asarray([-1, 0]), w.data))


def test_lowest_bad_position_of_a_chunk_is_reported(xp):
    # Several bad values in one GPU block's chunk (4096 elements): its lowest position, in the
    # first chunk and past it. (Bad values in several chunks of one call: any chunk's lowest
    # may win, the chunks race; NumPy always gives the lowest.)
    logits = _logits(xp, 10000)
    targets = _targets(xp, n=10000, bad={1: 11, 3: 10, 4: -1})
    raises_at_check(xp, r"targets\[1\] = 11 is outside",
                    lambda: cudrop.cross_entropy(logits, targets))
    targets = _targets(xp, n=10000, bad={7777: -5, 7800: 10})
    raises_at_check(xp, r"targets\[7777\] = -5 is outside",
                    lambda: cudrop.cross_entropy(logits, targets))
    targets = _targets(xp, n=10000, bad={9999: 10})  # the last, partial chunk
    raises_at_check(xp, r"targets\[9999\] = 10 is outside",
                    lambda: cudrop.cross_entropy(logits, targets))


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64",
                                   "uint8", "uint16", "uint32", "uint64"])
def test_every_integer_dtype(xp, dtype):
    info = np.iinfo(dtype)
    for value in (info.min, info.max):
        if 0 <= value < 10:
            continue
        a = np.zeros(6, dtype)
        a[4] = value
        raises_at_check(xp, rf"^op: arg\[4\] = {value} is outside \[0, 10\)$",
                        lambda: _checks.check_index_range("arg", xp.asarray(a), 0, 10, op="op"))
    good = xp.asarray(np.arange(10).astype(dtype))
    _checks.check_index_range("arg", good, 0, 10, op="op")
    cudrop.check_errors()  # nothing recorded


def test_launch_geometry_matches_the_kernel():
    # the host sizes the grid by checks.cu's chunk and block: they must agree
    import re
    from cudrop import raw_kernels
    src = raw_kernels.source("checks.cu")
    defined = dict(re.findall(r"#define (CD_CHECK_\w+) (\d+)", src))
    assert int(defined["CD_CHECK_THREADS"]) == _checks._THREADS
    assert int(defined["CD_CHECK_CHUNK"]) == _checks._CHUNK


def test_zero_d_and_empty_indices(xp):
    raises_at_check(xp, r"^op: arg = 7 is outside \[0, 5\)$",
                    lambda: _checks.check_index_range("arg", xp.asarray(7), 0, 5, op="op"))
    _checks.check_index_range("arg", xp.zeros((0, 3), np.int64), 0, 0, op="op")
    cudrop.check_errors()
    with pytest.raises(ValueError, match="low <= high"):
        _checks.check_index_range("arg", xp.asarray([1]), 5, 0, op="op")
    with pytest.raises(TypeError, match="integer"):
        _checks.check_index_range("arg", xp.asarray([1.0]), 0, 5, op="op")


def test_first_failure_wins_and_a_check_clears_it(xp):
    logits = _logits(xp)
    bad_ce = _targets(xp, bad={17: 12})
    w = xp.ones((5, 3))
    bad_idx = xp.asarray([0, 9])
    emb = r"embedding: indices\[1\] = 9 is outside \[0, 5\)"
    cudrop.check_errors()  # nothing pending
    if xp is np:  # each op raises its own at once; nothing is recorded
        with pytest.raises(cudrop.IndexRangeError, match=CE_17):
            cudrop.cross_entropy(logits, bad_ce)
        with pytest.raises(cudrop.IndexRangeError, match=emb):
            cudrop.embedding(bad_idx, w)
        cudrop.check_errors()
        return
    cudrop.cross_entropy(logits, bad_ce)
    cudrop.embedding(bad_idx, w)
    cudrop.cross_entropy(logits, _targets(xp, bad={3: -4}))
    with pytest.raises(cudrop.IndexRangeError, match=CE_17):  # the first of the three
        cudrop.check_errors()
    cudrop.check_errors()  # cleared: the later two are not reported again
    cudrop.embedding(bad_idx, w)
    with pytest.raises(cudrop.IndexRangeError, match=emb):
        cudrop.check_errors()
    cudrop.check_errors()


def test_tensor_item_is_a_check_point(xp):
    logits, targets = _logits(xp), _targets(xp, bad={17: 12})
    if xp is np:
        with pytest.raises(cudrop.IndexRangeError, match=CE_17):
            cudrop.cross_entropy(cudrop.Tensor(logits), targets)
        return
    loss = cudrop.cross_entropy(cudrop.Tensor(logits), targets)
    with pytest.raises(cudrop.IndexRangeError, match=CE_17):
        loss.item()
    loss.item()  # cleared
    cudrop.cross_entropy(cudrop.Tensor(logits), targets)
    with pytest.raises(cudrop.IndexRangeError, match=CE_17):
        loss.numpy()


_SPIN = r"""
extern "C" __global__ void spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
"""


@pytest.mark.parametrize("op", ["cross_entropy", "embedding"])
def test_a_bad_index_call_does_not_wait_for_the_device(xp, op):
    if xp is np:
        pytest.skip("NumPy checks at once; only the GPU defers")
    # every input is on the device before the spin: an upload from pageable host memory would
    # itself wait for it
    if op == "cross_entropy":
        logits, good, bad = _logits(xp), _targets(xp), _targets(xp, bad={17: 12})
        call = lambda t: cudrop.cross_entropy(logits, t)  # noqa: E731
    else:
        w, good, bad = xp.ones((5, 3)), xp.asarray([0, 4]), xp.asarray([0, 9])
        call = lambda i: cudrop.embedding(i, w)  # noqa: E731
    call(good)  # compile and cache everything first
    spin = xp.RawKernel(_SPIN, "spin")
    spin((1,), (1,), (np.uint64(0),))
    stream = xp.cuda.get_current_stream()
    stream.synchronize()
    spin((1,), (1,), (np.uint64(2_000_000_000),))  # 2 s on the device
    call(bad)
    # a host read anywhere in the call would have waited for the spin
    assert not stream.done, "the op waited for the device"
    with pytest.raises(cudrop.IndexRangeError, match="is outside"):
        cudrop.check_errors()


# ---- the training loop -------------------------------------------------------------------

def _data(n=48, classes=4, bad_split="train"):
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, size=3 * n)
    x = rng.normal(size=(3 * n, 1, 4, 4)).astype(np.float32)
    split = {"train": 0, "val": n, "test": 2 * n}[bad_split]
    y[split + 5] = classes  # one label = num_classes
    return SimpleNamespace(x_train=x[:n], y_train=y[:n], x_val=x[n:2 * n], y_val=y[n:2 * n],
                           x_test=x[2 * n:], y_test=y[2 * n:], input_shape=(1, 4, 4),
                           num_classes=classes)


@pytest.mark.parametrize("bad_split", ["train", "val"])
def test_trainer_stops_on_a_bad_label(xp, bad_split, tmp_path):
    device = "cpu" if xp is np else "gpu"
    data = _data(bad_split=bad_split)
    model = models.mlp(data.input_shape, data.num_classes, hidden=(8,), dropout="none", seed=0)
    model.to(device)
    opt = optim.SGD(model.parameters(), 0.1)
    ckpt = tmp_path / "run.ckpt"
    trainer = Trainer(model, opt, ClassifierTask(data, 8, device), progress=False,
                      log=lambda s: None, save=ckpt)
    with pytest.raises(cudrop.IndexRangeError,
                       match=r"^cross_entropy: targets\[\d+\] = 4 is outside \[0, 4\)$"):
        trainer.fit(2)
    assert trainer.history.epochs == []  # stopped in epoch 1, before its row
    assert not ckpt.exists()  # no checkpoint holds the garbage
    cudrop.check_errors()  # the Trainer consumed the failure


@pytest.mark.gpu
@pytest.mark.parametrize("opt_cls, kw", [(optim.SGD, dict(lr=0.1, momentum=0.9)),
                                         (optim.Adam, dict(lr=0.01))])
def test_a_step_that_saw_a_bad_label_leaves_parameters_and_state_untouched(opt_cls, kw):
    """On the GPU the bad label is raised later, at the check point; the fused optimizer reads
    the device's error record and skips the update, so nothing is half-updated meanwhile."""
    from cudrop import backend
    if not backend.gpu_available():
        pytest.skip("no usable CUDA GPU")
    cp = backend.cupy
    model = models.mlp((8,), 10, hidden=(16,), seed=0).to("gpu")
    opt = opt_cls(model.parameters(), **kw)
    x = cp.asarray(np.random.default_rng(0).standard_normal((20, 8)), np.float32)

    def step(targets):
        loss = cudrop.cross_entropy(model(cudrop.Tensor(x)), targets)
        model.zero_grad()
        loss.backward()
        opt.step()

    step(_targets(cp))  # a good step: state exists, parameters moved
    before = [p.data.copy() for p in model.parameters()]
    state = [{k: v.copy() for k, v in st.items() if hasattr(v, "shape")} for st in opt.state]
    step(_targets(cp, bad={17: 12}))
    for b, p in zip(before, model.parameters()):
        np.testing.assert_array_equal(cp.asnumpy(p.data), cp.asnumpy(b))
    for old, st in zip(state, opt.state):
        for k, v in old.items():
            np.testing.assert_array_equal(cp.asnumpy(st[k]), cp.asnumpy(v), err_msg=k)
    with pytest.raises(cudrop.IndexRangeError, match=CE_17):
        cudrop.check_errors()
    step(_targets(cp))  # after the check point cleared the record, steps update again
    assert any(not cp.array_equal(b, p.data) for b, p in zip(before, model.parameters()))
