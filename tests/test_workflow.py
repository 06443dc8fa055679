"""Checkpoints and resume: one file at the exact path, written atomically, checked before it
changes anything; a resumed run (at an epoch's end or mid-epoch) equals the uninterrupted one
for every variant, on NumPy and on the GPU."""
import os
from types import SimpleNamespace

import numpy as np
import pytest

import cudrop
from cudrop import checkpoint, models, optim
from cudrop.nn import DROPOUT_KINDS, set_total_steps
from cudrop.train import ClassifierTask, EarlyStopping, NonFiniteLoss, Trainer


def _data(n=96, classes=4, shape=(1, 8, 8), seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes,) + shape).astype(np.float32)
    y = rng.integers(0, classes, size=3 * n)
    x = (centers[y] + 0.5 * rng.normal(size=(3 * n,) + shape)).astype(np.float32)
    return SimpleNamespace(x_train=x[:n], y_train=y[:n], x_val=x[n:2 * n], y_val=y[n:2 * n],
                           x_test=x[2 * n:], y_test=y[2 * n:], input_shape=shape,
                           num_classes=classes)


def _setup(kind, device, data, epochs=2, batch=16, save=None, save_every=None):
    """A fresh run: model, optimizer, schedule and trainer, all from seed 0."""
    if kind in ("depth", "stochastic"):
        model = models.ResNet(8, num_classes=data.num_classes, in_channels=1, widths=(4, 8, 8),
                              p=0.0, seed=0, depth_dropout=0.5 if kind == "depth" else 0.0,
                              stochastic_depth=0.5 if kind == "stochastic" else 0.0)
        opt = optim.SGD(model.parameters(), 0.05, momentum=0.9)
    else:
        model = models.mlp(data.input_shape, data.num_classes, hidden=(64, 64), dropout=kind,
                           p=0.0 if kind == "none" else 0.5, seed=0)
        opt = optim.Adam(model.parameters(), 1e-3)
    model.to(device)
    task = ClassifierTask(data, batch, device)
    total = epochs * task.steps_per_epoch
    sched = optim.LinearWarmup(opt, 3, after=optim.CosineLR(opt, total_steps=total))
    set_total_steps(model, total)
    trainer = Trainer(model, opt, task, schedule=sched, progress=False, log=lambda s: None,
                      save=save, save_every=save_every)
    return trainer


def _params(model):
    return {k: v for k, v in model.state_dict().items()}


def _device(xp):
    return "cpu" if xp is np else "gpu"


class _Interrupt(Exception):
    pass


KINDS = [k for k in DROPOUT_KINDS] + ["depth", "stochastic"]


@pytest.mark.parametrize("kind", KINDS)
def test_resumed_run_equals_uninterrupted(kind, xp, tmp_path):
    data, dev = _data(), _device(xp)
    ref = _setup(kind, dev, data)
    hist_ref, final_ref = ref.fit(2)

    # Run 1: killed mid-epoch 2 (step 9 of 12), after the step-8 checkpoint.
    path = tmp_path / "run.ckpt"
    run = _setup(kind, dev, data, save=path, save_every=4)
    batches = run.task.batches

    def dying(seed, epoch, start):
        for i, b in enumerate(batches(seed, epoch, start), start):
            if epoch * run.task.steps_per_epoch + i == 9:
                raise _Interrupt
            yield b
    run.task.batches = dying
    with pytest.raises(_Interrupt):
        run.fit(2)
    assert os.listdir(tmp_path) == ["run.ckpt"]  # exact name, no temporary left behind

    # Run 2: fresh objects, resumed from the checkpoint of step 8.
    again = _setup(kind, dev, data, save=path)
    again.resume(path)
    assert again.step == 8
    hist, final = again.fit(2)
    assert [r["train_loss"] for r in hist.epochs] == [r["train_loss"] for r in hist_ref.epochs]
    assert [r["val_loss"] for r in hist.epochs] == [r["val_loss"] for r in hist_ref.epochs]
    assert final == final_ref
    want, got = _params(ref.model), _params(again.model)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_early_stopping_decides_from_the_history():
    stop = EarlyStopping("val_acc", patience=2)
    assert stop.maximise and not EarlyStopping("val_loss").maximise
    rows = [{"val_acc": a} for a in (0.5, 0.7, 0.7, 0.6)]
    assert stop.best(rows) == 1                       # the first to reach the best
    assert not stop.should_stop(rows[:3]) and stop.should_stop(rows)
    assert EarlyStopping("val_acc", 2, min_delta=0.25).best(rows) == 0
    with pytest.raises(KeyError, match="val_acc"):
        stop.best([{"val_loss": 1.0}])
    for bad in (dict(patience=0), dict(mode="up"), dict(min_delta=-1)):
        with pytest.raises(ValueError):
            EarlyStopping("val_acc", **bad)


def test_early_stopped_run_resumes_to_the_same_stop(tmp_path, monkeypatch):
    """Patience 1 on a validation loss forced to rise after epoch 2: the run ends after epoch
    3, and a run resumed from its final checkpoint trains no further epoch."""
    data = _data()
    losses = iter([1.0, 0.5, 0.6, 0.7, 0.8])
    real = ClassifierTask.evaluate

    def evaluate(self, model, split):
        m = real(self, model, split)
        return dict(m, val_loss=next(losses)) if split == "val" else m
    monkeypatch.setattr(ClassifierTask, "evaluate", evaluate)
    path = tmp_path / "run.ckpt"
    run = _setup("dropout", "cpu", data, epochs=5, save=path)
    run.early_stop = EarlyStopping("val_loss", patience=1)
    hist, _ = run.fit(5)
    assert [r["epoch"] for r in hist.epochs] == [1, 2, 3] and run.stopped_early
    again = _setup("dropout", "cpu", data, epochs=5, save=path)
    again.early_stop = EarlyStopping("val_loss", patience=1)
    again.resume(path)
    hist, _ = again.fit(5)
    assert len(hist.epochs) == 3 and again.stopped_early and again.step == run.step


@pytest.mark.parametrize("interval, saves", [(None, 4), (3600.0, 1)])
def test_save_interval_skips_epoch_end_checkpoints_but_never_the_last(tmp_path, monkeypatch,
                                                                      interval, saves):
    """3 epochs: a checkpoint at each epoch's end plus the final one; with a long
    ``save_interval`` only the final one, which holds the whole run."""
    path = tmp_path / "run.ckpt"
    run = _setup("dropout", "cpu", _data(), epochs=3, save=path)
    run.save_interval = interval
    calls = []
    real = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self, p: (calls.append(p), real(self, p)))
    run.fit(3)
    assert len(calls) == saves
    again = _setup("dropout", "cpu", _data(), epochs=3, save=path)
    again.resume(path)
    assert again.step == run.step and len(again.history.epochs) == 3


def test_checkpoint_round_trip_at_the_exact_path(tmp_path):
    run = _setup("sparsedrop", "cpu", _data())
    run.fit(1)
    path = tmp_path / "ckpt"  # no suffix added
    cudrop.save(path, run.model, run.optimizer, run.schedule, epoch=1, note="x")
    assert os.listdir(tmp_path) == ["ckpt"]
    other = _setup("sparsedrop", "cpu", _data())
    extra = cudrop.load(path, other.model, other.optimizer, other.schedule)
    assert extra == {"epoch": 1, "note": "x"}
    for k, v in _params(run.model).items():
        np.testing.assert_array_equal(_params(other.model)[k], v)
    assert other.optimizer.steps == run.optimizer.steps
    assert other.optimizer.lr == run.optimizer.lr
    assert other.schedule.last_step == run.schedule.last_step
    # Module.save / Module.load use the same format and path.
    run.model.save(tmp_path / "model.ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "model.ckpt"]
    other.model.load(tmp_path / "model.ckpt")


def test_a_write_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    run = _setup("dropout", "cpu", _data())
    path = tmp_path / "run.ckpt"
    cudrop.save(path, run.model, step=1)
    before = path.read_bytes()

    def killed(f, **arrays):
        f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        cudrop.save(path, run.model, step=2)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["run.ckpt"]
    monkeypatch.undo()
    assert checkpoint.read_meta(path)["state"] == {"step": 1}


def test_loading_another_model_names_the_difference_and_changes_nothing(tmp_path):
    path = tmp_path / "a.ckpt"
    small = models.mlp((1, 8, 8), 4, hidden=(64, 64), seed=0)
    cudrop.save(path, small)
    wide = models.mlp((1, 8, 8), 4, hidden=(32, 64), seed=1)
    before = _params(wide)
    with pytest.raises(checkpoint.CheckpointError, match=r"1\.weight has shape \(64, 64\) in "
                       r"the checkpoint, \(64, 32\)|shape"):
        cudrop.load(path, wide)
    for k, v in before.items():
        np.testing.assert_array_equal(_params(wide)[k], v)
    resnet = models.ResNet(8, num_classes=4, in_channels=1, widths=(4, 8, 8))
    with pytest.raises(checkpoint.CheckpointError, match="holds a Sequential, the model is a "
                                                        "ResNet"):
        cudrop.load(path, resnet)


def test_optimizer_schedule_and_version_mismatches_are_named(tmp_path, monkeypatch):
    run = _setup("dropout", "cpu", _data())
    path = tmp_path / "a.ckpt"
    cudrop.save(path, run.model, run.optimizer, run.schedule)
    sgd = optim.SGD(run.model.parameters(), 0.1)
    with pytest.raises(checkpoint.CheckpointError, match="holds a Adam optimizer, not a SGD"):
        cudrop.load(path, run.model, sgd)
    with pytest.raises(checkpoint.CheckpointError, match="LinearWarmup schedule, not a StepLR"):
        cudrop.load(path, run.model, run.optimizer, optim.StepLR(run.optimizer, 5))
    monkeypatch.setattr(cudrop, "__version__", "9.9.9")
    with pytest.raises(checkpoint.CheckpointError, match=r"written by cudrop 0\.1\.0, this is "
                                                        r"cudrop 9\.9\.9"):
        cudrop.load(path, run.model)
    cudrop.load(path, run.model, check_version=False)


def test_foreign_and_missing_files_get_clear_errors(tmp_path):
    m = models.mlp((1, 8, 8), 4, hidden=(8,))
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(checkpoint.CheckpointError, match="not a cudrop checkpoint"):
        cudrop.load(tmp_path / "plain.npz", m)
    (tmp_path / "junk").write_bytes(b"not a zip")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        cudrop.load(tmp_path / "junk", m)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        cudrop.load(tmp_path / "nothing", m)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cudrop.save(tmp_path / "no" / "dir" / "x", m)


def test_non_finite_loss_stops_the_run():
    data = _data()
    data.x_train[5] = np.nan
    run = _setup("none", "cpu", data)
    with pytest.raises(NonFiniteLoss, match="the training loss became nan"):
        run.fit(1)


def test_a_batch_of_another_dtype_names_the_layer_and_the_fix():
    m = models.mlp((1, 8, 8), 4, hidden=(16,))
    x = np.zeros((2, 1, 8, 8), np.float64)
    with pytest.raises(TypeError, match=r"Linear\(64, 16, bias=True\) got a float64 input but "
                                        r"its weight is float32: cast the batch "
                                        r"\(x.astype\('float32'\)\) or the model"):
        m(cudrop.Tensor(x))
    conv = models.ResNet(8, num_classes=4, in_channels=1, widths=(4, 8, 8))
    with pytest.raises(TypeError, match="Conv2d.* got a float64 input"):
        conv(cudrop.Tensor(x))
    assert m(cudrop.Tensor(x.astype(np.float32))).shape == (2, 4)


def test_bfloat16_parameters_survive_a_checkpoint(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    model = models.mlp((1, 8, 8), 4, hidden=(16,), seed=0).to(dtype=bf16)
    cudrop.save(tmp_path / "bf16.ckpt", model)
    other = models.mlp((1, 8, 8), 4, hidden=(16,), seed=1).to(dtype=bf16)
    cudrop.load(tmp_path / "bf16.ckpt", other)
    for k, v in model.state_dict().items():
        got = other.state_dict()[k]
        assert got.dtype == v.dtype
        np.testing.assert_array_equal(got.view(np.uint16) if v.dtype == bf16 else got,
                                      v.view(np.uint16) if v.dtype == bf16 else v)


def test_the_epoch_loss_of_16_bit_steps_is_summed_in_float32():
    """200 bfloat16 losses of 0.9 average 0.898 (bfloat16's 0.9), not 0.97 as a bfloat16 sum
    (8 significant bits) would give; a copy is kept, not the step's buffer."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    run = _setup("none", "cpu", _data())
    loss = np.asarray(0.9, dtype=ml_dtypes.bfloat16)
    for _ in range(200):
        run._add_loss(np, loss)
    assert run._epoch_loss is not loss and run._epoch_loss.dtype == np.float32
    assert run._global_loss() / 200 == pytest.approx(float(loss), rel=1e-6)


class _FixedLogits:
    """A stand-in model whose logits are a float16 table looked up by the input (a token, or an
    image's first pixel): the task's loss can be checked against float64 math on them."""

    def __init__(self, table):
        self.table = table

    def __call__(self, x):
        x = x.data if isinstance(x, cudrop.autograd.Tensor) else x
        return cudrop.autograd.Tensor(self.table[self.index(x)])

    @staticmethod
    def index(x):
        return (x[:, 0, 0, 0] if x.ndim == 4 else x).astype(np.int64)

    def eval(self):
        pass

    def train(self):
        pass


def _loss64(logits, targets):
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return lse - np.take_along_axis(z, targets[..., None], -1)[..., 0]


def test_validation_losses_of_16_bit_logits_are_summed_in_float32():
    """Before the fix the loss of each batch came back in the logits' dtype and was summed in
    it: the GPT runs' bfloat16 validation losses were quantised to steps of 0.0125."""
    from cudrop.data import text_batches
    rng = np.random.default_rng(0)
    model = _FixedLogits((3 * rng.normal(size=(37, 4))).astype(np.float16))
    data = _data(n=300)
    data.x_val = np.broadcast_to(rng.integers(0, 37, size=(300, 1, 1, 1)),
                                 (300, 1, 8, 8)).astype(np.float32)
    got = ClassifierTask(data, 16, "cpu").evaluate(model, "val")["val_loss"]
    want = _loss64(model.table[model.index(data.x_val)], data.y_val).mean()
    assert got == pytest.approx(want, rel=1e-6)

    tokens = rng.integers(0, 4, size=2000)  # the table's 4 columns are the vocabulary
    task = cudrop.train.LanguageTask(SimpleNamespace(val=tokens), 8, "cpu", block_size=16)
    got = task.evaluate(model, "val")["val_loss"]
    want = np.mean([_loss64(model.table[xb], yb).mean()
                    for xb, yb in text_batches(tokens, 16, 8, steps=20, seed=1234)])
    assert got == pytest.approx(want, rel=1e-6)
