"""Training loops behind ``cudrop train``: a task (image classification or character language
modelling) gives batches and metrics, a :class:`Trainer` runs the steps, shows the loss without
a host sync per step, stops on a non-finite loss or a bad index (``cudrop.check_errors``: on the
GPU an op's index check is read back only where the loop reads the loss, at the end of an epoch,
in evaluation and before a checkpoint), and checkpoints and resumes the whole state.

A resumed run is the uninterrupted run: the data order is a function of (seed, epoch), every
stochastic layer's masks of (seed, layer, step) with its step in the checkpoint, and the
optimizer and schedule state travel with it, so the losses and weights come out the same.
"""
from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from . import autograd as ag
from . import backend, checkpoint, distributed, graph
from ._checks import ErrorSnapshot, check_errors

__all__ = ["History", "ClassifierTask", "LanguageTask", "Trainer", "NonFiniteLoss",
           "EarlyStopping"]


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite; the run stops (the last checkpoint stays)."""


@dataclass
class History:
    epochs: list = field(default_factory=list)

    def add(self, **row):
        self.epochs.append(row)
        return row


@dataclass(frozen=True)
class EarlyStopping:
    """Stop training when the validation metric ``monitor`` (a key of the task's validation
    metrics: ``'val_acc'``, ``'val_loss'``) has not improved for ``patience`` consecutive
    validation checks (the Trainer checks at every epoch's end). ``mode``: ``'max'`` or
    ``'min'``; ``'auto'`` maximises ``*_acc`` and minimises anything else. An improvement must
    beat the best so far by more than ``min_delta``.

    The decision is a function of the history alone, so a resumed run (whose checkpoint holds
    the history) stops where the uninterrupted run stops.
    """

    monitor: str = "val_loss"
    patience: int = 5
    mode: str = "auto"
    min_delta: float = 0.0

    def __post_init__(self):
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) \
                or self.patience < 1:
            raise ValueError(f"patience must be a positive int, got {self.patience!r}")
        if self.mode not in ("auto", "max", "min"):
            raise ValueError(f"mode must be 'auto', 'max' or 'min', got {self.mode!r}")
        if not self.min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta!r}")

    @property
    def maximise(self) -> bool:
        """Whether a larger ``monitor`` is better."""
        return self.mode == "max" or (self.mode == "auto" and self.monitor.endswith("_acc"))

    def best(self, rows):
        """Index of the best epoch row of ``rows`` (the first to reach the best value), or
        None for no rows."""
        best, best_i = None, None
        for i, row in enumerate(rows):
            if self.monitor not in row:
                raise KeyError(f"EarlyStopping: monitor {self.monitor!r} is not a validation "
                               f"metric of this task (it has {sorted(row)})")
            v = row[self.monitor]
            if best is None or (v > best + self.min_delta if self.maximise
                                else v < best - self.min_delta):
                best, best_i = v, i
        return best_i

    def should_stop(self, rows) -> bool:
        """True when the last ``patience`` rows brought no improvement."""
        i = self.best(rows)
        return i is not None and len(rows) - 1 - i >= self.patience


def _sync(xp):
    if xp is np:
        return
    if distributed.is_initialized():  # bounded by the timeout: a dead rank raises, not hangs
        distributed.synchronize("this epoch's training steps")
    else:
        xp.cuda.get_current_stream().synchronize()


class ClassifierTask:
    """Image classification: an epoch is the (seed, epoch) permutation of the training set, cut
    to ``steps_per_epoch`` batches if given; metrics are loss and accuracy.

    Data parallelism: ``batch_size`` is per rank; rank ``rank`` of ``world_size`` takes its
    rows of every global batch of ``batch_size * world_size`` (``cudrop.data.batches``).
    Evaluation runs on the whole split on every rank."""

    def __init__(self, data, batch_size, device, steps_per_epoch=None, dtype=None, rank=0,
                 world_size=1):
        from .data import num_batches
        self.batch_size, self.device = batch_size, device
        self.rank, self.world_size = rank, world_size
        # The data sets fit on the device: move them once (images in the model's ``dtype``),
        # so batches are gathered there.
        self.arrays = {k: backend.to_device(getattr(data, k), device)
                       for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
        if dtype is not None:
            for k in ("x_train", "x_val", "x_test"):
                self.arrays[k] = self.arrays[k].astype(dtype)
        full = num_batches(len(data.x_train), batch_size * world_size, world_size=world_size)
        self.steps_per_epoch = full if steps_per_epoch is None else min(steps_per_epoch, full)

    def batches(self, seed, epoch, start):
        from .data import batches
        a = self.arrays
        it = batches(a["x_train"], a["y_train"], batch_size=self.batch_size * self.world_size,
                     shuffle=True, seed=seed, epoch=epoch, device=self.device, start=start,
                     rank=self.rank, world_size=self.world_size)
        return itertools.islice(it, self.steps_per_epoch - start)

    def evaluate(self, model, split):
        """``{split_loss, split_acc}`` over the split in eval mode, without a graph."""
        from .data import batches
        x, y = self.arrays[f"x_{split}"], self.arrays[f"y_{split}"]
        model.eval()
        total, correct, loss_sum = 0, 0, 0.0  # sums stay on the device until the end
        with ag.no_grad():
            for xb, yb in batches(x, y, batch_size=512, shuffle=False, device=self.device):
                logits = model(ag.Tensor(xb))
                loss_sum = loss_sum + _summed_loss(logits, yb)
                correct = correct + (logits.data.argmax(axis=-1) == yb).sum()
                total += len(yb)
        model.train()
        check_errors()  # a bad label of the split, before its garbage becomes a metric
        return {f"{split}_loss": float(loss_sum) / total, f"{split}_acc": int(correct) / total}


def _summed_loss(logits, targets):
    """The summed cross entropy of a batch as a float32 device scalar, whatever the logits'
    dtype: a bfloat16 loss (8 significant bits) summed in bfloat16 quantised the GPT runs'
    validation loss to steps of 0.0125."""
    from .functional import cross_entropy
    return cross_entropy(logits.data.astype(np.float32), targets, reduction="sum")[0]


class LanguageTask:
    """Next-character prediction: an epoch is ``steps_per_epoch`` batches of random windows,
    drawn from (seed, step); the metric is the loss over 20 fixed batches of the split.
    ``batch_size`` is per rank, as in :class:`ClassifierTask`."""

    def __init__(self, data, batch_size, device, block_size, steps_per_epoch=200, rank=0,
                 world_size=1):
        self.data, self.batch_size, self.device = data, batch_size, device
        self.rank, self.world_size = rank, world_size
        self.block_size, self.steps_per_epoch = block_size, steps_per_epoch

    def batches(self, seed, epoch, start):
        from .data import text_batches
        spe = self.steps_per_epoch
        return text_batches(self.data.train, self.block_size, self.batch_size * self.world_size,
                            steps=spe - start, seed=seed, start_step=epoch * spe + start,
                            device=self.device, rank=self.rank, world_size=self.world_size)

    def evaluate(self, model, split):
        from .data import text_batches
        model.eval()
        loss_sum, total = 0.0, 0
        with ag.no_grad():
            for xb, yb in text_batches(getattr(self.data, split), self.block_size,
                                       self.batch_size, steps=20, seed=1234, device=self.device):
                loss_sum = loss_sum + _summed_loss(model(xb), yb)
                total += yb.size
        model.train()
        check_errors()
        return {f"{split}_loss": float(loss_sum) / total}


class _LossReader:
    """The loss shown while training: a copy started every ``interval`` steps and read once it
    has landed (``backend.HostCopy``), so the shown loss is at most two intervals old and no
    step waits for the device. The device error record is copied just before it and checked
    when the loss lands (``cudrop.check_errors``'s error, e.g. a bad label, is raised then); a
    non-finite value raises :class:`NonFiniteLoss`."""

    def __init__(self, interval):
        self.interval, self.pending, self.last = interval, None, None

    def update(self, step, loss):
        if self.pending is not None and self.pending[1].ready():
            self._take()
        if self.pending is None and step % self.interval == 0:
            # errors first: the loss copy's landing then implies the errors' (one stream)
            errors = ErrorSnapshot()
            self.pending = (step, backend.HostCopy(loss), errors)

    def _take(self):
        step, copy, errors = self.pending
        self.pending = None
        errors.check()  # a bad index explains a garbage loss: report it first
        self.last = (step, copy.value())
        if not math.isfinite(self.last[1]):
            raise NonFiniteLoss(f"the training loss became {self.last[1]} at step {step}: "
                                "lower the learning rate (--lr) or check the data")

    def flush(self):
        if self.pending is not None:
            self._take()


class Trainer:
    """Runs ``epochs`` of ``task`` on ``model`` with ``optimizer`` (and ``schedule``, stepped
    once per optimizer step).

    ``save``: a checkpoint path, written at the end of every epoch, every ``save_every`` steps
    and at the end (atomically: an interrupted run leaves the last complete checkpoint).
    ``save_interval``: seconds; epoch-end checkpoints are then skipped until that long has
    passed since the last one (so at most that long plus one epoch apart): with short epochs a checkpoint per epoch can cost more than the
    epoch (45 MLP runs of ``cudrop repro sparsedrop`` on an H200 took 218 s, 33 s of it in
    steps, the rest evaluation, compiles and ~2,800 epoch-end checkpoints of 25 MB; not split
    further). A resumed run redoes that work, drawing the same masks.
    ``config``: JSON-able settings stored in the checkpoint. ``progress``: a tqdm bar on a
    terminal, plain lines otherwise. ``log``: where epoch lines go. ``early_stop``: an
    :class:`EarlyStopping` checked after every epoch (``fit`` then ends before ``epochs``;
    ``stopped_early`` says so).

    ``scaler``: a :class:`cudrop.optim.LossScaler` for float16 training (backward from the
    scaled loss, the optimizer step through the scaler; its scale is checkpointed).

    ``capture``: record the training step once as a CUDA graph and replay it for every batch
    (:func:`cudrop.graph.capture`; GPU only): same masks, losses and weights as eager steps, no
    Python per op. A step that cannot be captured (a layer that decides its structure on the
    host) runs eagerly after one warning; a short last batch runs eagerly. ``captured_step``
    is the :class:`cudrop.graph.CapturedStep` (None without ``capture``).

    Data parallelism: ``reducer`` (a ``cudrop.distributed.GradientReducer``) averages the
    gradients between backward and the optimizer step; with ``cudrop.distributed`` initialized
    the epoch's training loss is averaged over the ranks, and checkpoints are written by rank 0
    (``cudrop.distributed.save``). Give ``log`` and ``progress`` to rank 0 only.
    """

    def __init__(self, model, optimizer, task, *, schedule=None, seed=0, progress=True,
                 log=print, save=None, save_every=None, save_interval=None, config=None,
                 early_stop=None, reducer=None, scaler=None, capture=False):
        self.model, self.optimizer, self.task, self.schedule = model, optimizer, task, schedule
        if capture and not all(backend.is_gpu_array(p.data) for p in model.parameters()):
            raise ValueError("capture=True needs the model on the GPU (CUDA graphs); move it "
                             "with model.to('gpu') or leave capture off")
        self.captured_step = graph.capture(self._train_step, model=model, optimizer=optimizer,
                                       schedule=schedule) if capture else None
        self.scaler = scaler
        self.seed, self.progress, self.log = seed, progress, log
        self.save_path, self.save_every, self.config = save, save_every, config or {}
        self.save_interval, self._saved_at = save_interval, time.monotonic()
        self.early_stop, self.stopped_early = early_stop, False
        self.reducer = reducer
        self.step = 0                 # optimizer steps taken over the whole run
        self.history = History()
        self._epoch_loss = None       # running sum of this epoch's losses (on the device)
        self._epoch_steps = 0
        self._epoch_time = 0.0        # seconds spent in this epoch's steps, across a resume

    # ---- checkpoints -----------------------------------------------------------------
    def save(self, path):
        """Checkpoint the whole state (model, optimizer, schedule, loop position). A failure
        recorded by a device-side check is raised first, so no checkpoint holds its garbage."""
        check_errors()
        loss = self._global_loss()
        write = distributed.save if distributed.is_initialized() else checkpoint.save
        write(path, self.model, self.optimizer, self.schedule, step=self.step,
              epoch_loss=loss, epoch_steps=self._epoch_steps, epoch_time=self._epoch_time,
              history=self.history.epochs, config=self.config,
              scaler=None if self.scaler is None else self.scaler.state_dict())
        self._saved_at = time.monotonic()

    def _global_loss(self):
        """The epoch's loss sum as a float: averaged over the ranks in a data-parallel run."""
        acc = self._epoch_loss
        if acc is None:
            return None
        if distributed.is_initialized() and hasattr(acc, "dtype") and backend.is_gpu_array(acc):
            acc = distributed.all_reduce(acc.astype(np.float64).reshape(1), "avg")
            distributed.synchronize("averaging the epoch's loss")
        return float(acc.reshape(()) if hasattr(acc, "reshape") else acc)

    def resume(self, path):
        """Restore everything :meth:`save` wrote; :meth:`fit` then continues from there."""
        read = distributed.load if distributed.is_initialized() else checkpoint.load
        state = read(path, self.model, self.optimizer, self.schedule)
        self.step, self._epoch_steps = int(state["step"]), int(state["epoch_steps"])
        self._epoch_time = float(state["epoch_time"])
        self.history = History(list(state["history"]))
        self._epoch_loss = state["epoch_loss"]
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return state

    # ---- the loop --------------------------------------------------------------------
    def fit(self, epochs):
        """Train to the end of epoch ``epochs``; returns ``(history, final test metrics)``."""
        spe = self.task.steps_per_epoch
        for epoch in range(self.step // spe, epochs):
            # checked before the epoch, so a run resumed after its stopping epoch stops too
            if self.early_stop is not None and self.early_stop.should_stop(self.history.epochs):
                self.stopped_early = True
                break
            start = self.step - epoch * spe
            if start == 0:
                self._epoch_loss, self._epoch_steps, self._epoch_time = None, 0, 0.0
            self._run_epoch(epoch, epochs, start)
            self._end_epoch(epoch)
        final = self.task.evaluate(self.model, "test")
        if self.save_path:
            self.save(self.save_path)
        return self.history, final

    def _run_epoch(self, epoch, epochs, start):
        spe = self.task.steps_per_epoch
        self.model.train()
        interval = max(1, min(50, spe // 10))
        reader = _LossReader(interval)
        show = _Progress(self.progress, spe, start, f"epoch {epoch + 1}/{epochs}")
        xp, t0 = np, time.perf_counter()
        step = self.captured_step or self._train_step
        for i, (xb, yb) in enumerate(self.task.batches(self.seed, epoch, start), start):
            loss = step(xb, yb)
            xp = backend.get_array_module(loss)
            self._add_loss(xp, loss)
            self.step += 1
            reader.update(i, loss)
            show.update(i + 1, reader.last)
            if self.save_path and self.save_every and self.step % self.save_every == 0:
                _sync(xp)
                self._epoch_time += time.perf_counter() - t0
                self.save(self.save_path)
                t0 = time.perf_counter()
        _sync(xp)
        self._epoch_time += time.perf_counter() - t0
        reader.flush()
        check_errors()  # the steps after the last loss copy
        show.close()

    def _train_step(self, xb, yb):
        """One optimizer step on a batch; the loss array (a replay's static buffer when
        captured: read or copied before the next step)."""
        model, opt = self.model, self.optimizer
        x = xb if xb.dtype.kind in "iu" else ag.Tensor(xb)  # token ids stay raw
        loss = ag.cross_entropy(model(x), yb)
        model.zero_grad()
        if self.scaler is not None:
            self.scaler.backward(loss)
        else:
            loss.backward()
        if self.reducer is not None:
            self.reducer.finish()
        if self.scaler is not None:
            self.scaler.step(opt)
        else:
            opt.step()
        if self.schedule is not None:
            self.schedule.step()
        return loss.data

    def _add_loss(self, xp, value):
        # Summed in float32 at least: a bfloat16 sum has 8 significant bits, so 200 losses of
        # 0.9 would average 0.97.
        dtype = np.promote_types(value.dtype, np.float32)
        acc = self._epoch_loss
        if acc is not None and not hasattr(acc, "dtype"):  # restored from a checkpoint
            acc = xp.asarray(acc, dtype=dtype)
        if acc is None:  # a copy: a captured step's loss buffer is overwritten by the next replay
            self._epoch_loss = value.astype(dtype)
        else:
            self._epoch_loss = acc + value.astype(dtype, copy=False)
        self._epoch_steps += 1

    def _end_epoch(self, epoch):
        n = max(self._epoch_steps, 1)
        total = self._global_loss()
        train_loss = total / n if total is not None else math.nan
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(f"the training loss of epoch {epoch + 1} is {train_loss}: "
                                "lower the learning rate (--lr) or check the data")
        metrics = self.task.evaluate(self.model, "val")
        row = self.history.add(epoch=epoch + 1, train_loss=train_loss, **metrics,
                               step_time_ms=self._epoch_time / n * 1e3)
        self.log(f"epoch {epoch + 1:3d}  train loss {train_loss:.4f}  "
                 + "  ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items())
                 + f"  step {row['step_time_ms']:.2f} ms")
        if self.save_path and (self.save_interval is None
                               or time.monotonic() - self._saved_at >= self.save_interval):
            self.save(self.save_path)


class _Progress:
    """A tqdm bar on a terminal; plain lines (about ten an epoch) when output is a file or
    pipe, so logs hold no carriage-return frames; nothing when disabled."""

    def __init__(self, enabled, total, start, desc):
        self.total, self.desc = total, desc
        self.tty = enabled and sys.stderr.isatty()
        self.lines = enabled and not self.tty
        self.every = max(1, total // 10)
        self.bar = tqdm(total=total, initial=start, desc=desc, leave=False) if self.tty else None

    def update(self, done, last):
        loss = "" if last is None else f"loss {last[1]:.4f} (step {last[0] + 1})"
        if self.bar is not None:
            self.bar.update(1)
            if last is not None:
                self.bar.set_postfix_str(loss, refresh=False)
        elif self.lines and (done % self.every == 0 or done == self.total):
            print(f"{self.desc} {done}/{self.total} {loss}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def fit_lm(model, data, opt, *, epochs, batch_size, device, steps_per_epoch=200, seed=0,
           schedule=None, progress=True, log=print):
    """Train a character language model (a :class:`Trainer` over a :class:`LanguageTask`);
    returns ``(history, {test_loss})``."""
    task = LanguageTask(data, batch_size, device, model.block_size, steps_per_epoch)
    return Trainer(model, opt, task, schedule=schedule, seed=seed, progress=progress,
                   log=log).fit(epochs)
