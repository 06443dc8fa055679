"""Training loops behind ``cudrop train``: image classification and character language
modelling, with per-epoch metrics and step timing."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from . import autograd as ag
from . import backend


@dataclass
class History:
    epochs: list = field(default_factory=list)

    def add(self, **row):
        self.epochs.append(row)
        return row


def _sync(xp):
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def evaluate_classifier(model, x, y, batch_size, device):
    """(mean loss, accuracy) over x, y in eval mode without building a graph."""
    from .data import batches
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0  # sums stay on the device until the end
    with ag.no_grad():
        for xb, yb in batches(x, y, batch_size=batch_size, shuffle=False, device=device):
            logits = model(ag.Tensor(xb))
            loss_sum = loss_sum + ag.cross_entropy(logits, yb, reduction="sum").data
            correct = correct + (logits.data.argmax(axis=-1) == yb).sum()
            total += len(yb)
    model.train()
    return float(loss_sum) / total, int(correct) / total


def _train_epoch(model, opt, schedule, batch_iter, total, desc, progress):
    """One pass of SGD steps; returns (mean training loss, mean step seconds)."""
    model.train()
    xp, loss_acc, n, t0 = None, None, 0, time.perf_counter()
    bar = tqdm(batch_iter, total=total, desc=desc, leave=False, disable=not progress)
    for i, (xb, yb) in enumerate(bar):
        x = xb if xb.dtype.kind in "iu" else ag.Tensor(xb)  # token ids stay raw
        loss = ag.cross_entropy(model(x), yb)
        model.zero_grad()
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        # Keep the running loss on the device: a .item() per step would stall the GPU; the
        # progress bar reads one every 50 steps.
        loss_acc = loss.data if loss_acc is None else loss_acc + loss.data
        n += 1
        xp = backend.get_array_module(loss.data)
        if progress and i % 50 == 0:
            bar.set_postfix(loss=f"{float(loss.data):.4f}")
    _sync(xp)
    return float(loss_acc) / n, (time.perf_counter() - t0) / max(n, 1)


def fit_classifier(model, data, opt, epochs, batch_size, device, seed=0, schedule=None,
                   progress=True, log=print):
    from .data import batches, num_batches
    hist = History()
    steps = num_batches(len(data.x_train), batch_size)
    # The data sets fit on the device: move them once, so batches are gathered there.
    x_train, y_train, x_val, y_val, x_test, y_test = (
        backend.to_device(a, device) for a in (data.x_train, data.y_train, data.x_val,
                                                data.y_val, data.x_test, data.y_test))
    for epoch in range(epochs):
        it = batches(x_train, y_train, batch_size=batch_size, shuffle=True, seed=seed,
                     epoch=epoch, device=device)
        train_loss, step = _train_epoch(model, opt, schedule, it, steps,
                                        f"epoch {epoch + 1}/{epochs}", progress)
        val_loss, val_acc = evaluate_classifier(model, x_val, y_val, 512, device)
        hist.add(epoch=epoch + 1, train_loss=train_loss, val_loss=val_loss, val_acc=val_acc,
                 step_time_ms=step * 1e3)
        log(f"epoch {epoch + 1:3d}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
            f"val acc {val_acc:.4f}  step {step * 1e3:.2f} ms")
    test_loss, test_acc = evaluate_classifier(model, x_test, y_test, 512, device)
    return hist, {"test_loss": test_loss, "test_acc": test_acc}


def evaluate_lm(model, tokens, block_size, batch_size, device, steps=20, seed=1234):
    from .data import text_batches
    model.eval()
    losses = []
    with ag.no_grad():
        for xb, yb in text_batches(tokens, block_size, batch_size, steps=steps, seed=seed,
                                   device=device):
            losses.append(float(ag.cross_entropy(model(xb), yb).data))
    model.train()
    return float(np.mean(losses))


def fit_lm(model, data, opt, epochs, batch_size, device, steps_per_epoch=200, seed=0,
           schedule=None, progress=True, log=print):
    from .data import text_batches
    hist = History()
    block = model.block_size
    for epoch in range(epochs):
        it = text_batches(data.train, block, batch_size, steps=steps_per_epoch, seed=seed,
                          start_step=epoch * steps_per_epoch, device=device)
        train_loss, step = _train_epoch(model, opt, schedule, it, steps_per_epoch,
                                        f"epoch {epoch + 1}/{epochs}", progress)
        val_loss = evaluate_lm(model, data.val, block, batch_size, device)
        hist.add(epoch=epoch + 1, train_loss=train_loss, val_loss=val_loss,
                 step_time_ms=step * 1e3)
        log(f"epoch {epoch + 1:3d}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
            f"step {step * 1e3:.2f} ms")
    test_loss = evaluate_lm(model, data.test, block, batch_size, device)
    return hist, {"test_loss": test_loss}
