"""Checkpoints of a whole training state in one file: ``cudrop.save`` / ``cudrop.load``.

A checkpoint holds the model's parameters, buffers and RNG counters (every stochastic layer's
seed, layer id and step, so a resumed run draws the same masks), the optimizer's state and
hyper-parameters, the learning-rate schedule's position, and any JSON-able values the caller adds
(the training loop stores its step, epoch and config there).

The file is an ``.npz`` archive at exactly the path given (no suffix is added): arrays under
``model/``, ``optimizer/``, plus one ``meta`` entry of JSON naming the cudrop version, the
model's class and parameter shapes, the optimizer's and schedule's types. It is written to a
temporary file in the same directory, flushed to disk and renamed over ``path``, so a kill
mid-write leaves the previous checkpoint intact. ``load`` checks everything against the live
objects before it changes any of them: a checkpoint of another model, optimizer, schedule or
cudrop version raises an error naming what differs, and nothing is half-loaded.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from . import backend

__all__ = ["save", "load", "read_meta", "write_atomically", "CheckpointError"]

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that does not fit the objects it is loaded into, or is not a checkpoint."""


def _version():
    from . import __version__
    return __version__


def _describe_model(model):
    counters = {n for n, _, _ in model._named_counters()}
    return {"class": type(model).__name__,
            "arrays": {n: list(a.shape) for n, a in model.state_dict().items()
                       if n not in counters}}


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    raise TypeError(f"cudrop.save: {type(v).__name__} value {v!r} is not JSON-serialisable; "
                    "pass numbers, strings, lists or dicts as extra state")


def save(path, model, optimizer=None, schedule=None, **state):
    """Write ``model`` (and ``optimizer``, ``schedule``, and ``state``: JSON-able keyword values
    such as the epoch or config) to ``path`` atomically. Returns ``path``.

    ``path`` is used as given (``"run.ckpt"`` stays ``run.ckpt``); its directory must exist.
    Reading the arrays back to the host synchronises with the device once.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cudrop.save: directory {directory!r} of {path!r} does not exist")
    arrays = {f"model/{k}": np.asarray(v) for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "cudrop": _version(), "model": _describe_model(model),
            "state": state}
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars = {}
        for i, st in sd["state"].items():
            for k, v in st.items():
                if hasattr(v, "shape"):
                    arrays[f"optimizer/{i}/{k}"] = backend.asnumpy(v)
                else:
                    scalars.setdefault(str(i), {})[k] = v
        meta["optimizer"] = {"type": sd["type"], "lr": sd["lr"], "steps": sd["steps"],
                             "hyper": sd["hyper"], "scalars": scalars,
                             "num_params": len(optimizer.params)}
    if schedule is not None:
        meta["schedule"] = {"type": type(schedule).__name__, "state": schedule.state_dict()}
    # .npz keeps only NumPy's own dtypes: bfloat16 arrays travel as their uint16 bits.
    meta["bfloat16"] = sorted(k for k, v in arrays.items() if v.dtype.name == "bfloat16")
    for k in meta["bfloat16"]:
        arrays[k] = arrays[k].view(np.uint16)
    arrays["meta"] = np.frombuffer(json.dumps(meta, default=_json_default).encode(), np.uint8)
    return write_atomically(path, lambda f: np.savez(f, **arrays), binary=True)


def write_atomically(path, write, binary=False):
    """Call ``write(f)`` on a temporary file beside ``path``, flush it to disk and rename it
    over ``path``: a reader (or a rerun after a kill) sees the old file or the whole new one,
    never a part. Returns ``path``. Checkpoints, run JSON and reports are written this way."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _read(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cudrop.load: no checkpoint at {path!r}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cudrop.load: {path!r} is not a readable checkpoint ({e})") from e
    if "meta" not in arrays:
        raise CheckpointError(f"cudrop.load: {path!r} is an .npz archive but not a cudrop "
                              "checkpoint (no meta entry; write checkpoints with cudrop.save)")
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    if meta.get("bfloat16"):
        import ml_dtypes
        for k in meta["bfloat16"]:
            arrays[k] = arrays[k].view(ml_dtypes.bfloat16)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"cudrop.load: {path!r} has checkpoint format "
                              f"{meta.get('format')}, this cudrop reads format {FORMAT}")
    return meta, arrays


def read_meta(path) -> dict:
    """The JSON part of a checkpoint (cudrop version, model description, the caller's state)
    without loading any array into a model."""
    return _read(path)[0]


def _check_model(path, meta, model):
    want, have = meta["model"], _describe_model(model)
    problems = []
    if want["class"] != have["class"]:
        problems.append(f"it holds a {want['class']}, the model is a {have['class']}")
    missing = sorted(set(have["arrays"]) - set(want["arrays"]))
    extra = sorted(set(want["arrays"]) - set(have["arrays"]))
    if missing:
        problems.append(f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}")
    for n in sorted(set(want["arrays"]) & set(have["arrays"])):
        if want["arrays"][n] != have["arrays"][n]:
            problems.append(f"{n} has shape {tuple(want['arrays'][n])} in the checkpoint, "
                            f"{tuple(have['arrays'][n])} in the model")
    if problems:
        raise CheckpointError(f"cudrop.load: {path!r} does not fit this model: "
                              + "; ".join(problems[:8]))


def _check_kind(path, meta, what, obj):
    """The checkpoint's entry for ``what`` ('optimizer' or 'schedule'), checked to exist and
    to be of ``obj``'s type when ``obj`` is given."""
    entry = meta.get(what)
    if obj is not None:
        if entry is None:
            raise CheckpointError(f"cudrop.load: {path!r} holds no {what} state")
        if entry["type"] != type(obj).__name__:
            raise CheckpointError(f"cudrop.load: {path!r} holds a {entry['type']} {what}, "
                                  f"not a {type(obj).__name__}")
    return entry


def load(path, model, optimizer=None, schedule=None, *, check_version=True) -> dict:
    """Restore ``model`` (and ``optimizer``, ``schedule``) from ``path``; returns the extra
    state given to :func:`save`. Everything is checked before anything changes.

    Raises ``CheckpointError`` naming what differs when the checkpoint is of another model
    (class, parameter names or shapes), optimizer type or size, schedule type, or cudrop version
    (``check_version=False`` accepts another version when you know the format is compatible).
    """
    meta, arrays = _read(path)
    if check_version and meta["cudrop"] != _version():
        raise CheckpointError(f"cudrop.load: {path!r} was written by cudrop {meta['cudrop']}, "
                              f"this is cudrop {_version()}; pass check_version=False to load "
                              "it anyway")
    _check_model(path, meta, model)
    opt_meta = _check_kind(path, meta, "optimizer", optimizer)
    sched_meta = _check_kind(path, meta, "schedule", schedule)
    if optimizer is not None and opt_meta["num_params"] != len(optimizer.params):
        raise CheckpointError(f"cudrop.load: {path!r} holds an optimizer over "
                              f"{opt_meta['num_params']} parameters, this one has "
                              f"{len(optimizer.params)}")
    model.load_state_dict({k[len("model/"):]: v for k, v in arrays.items()
                           if k.startswith("model/")})
    if optimizer is not None:
        state = {}
        for k, v in arrays.items():
            if k.startswith("optimizer/"):
                _, i, name = k.split("/", 2)
                state.setdefault(int(i), {})[name] = v
        for i, st in opt_meta["scalars"].items():
            state.setdefault(int(i), {}).update(st)
        hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in opt_meta["hyper"].items()}
        optimizer.load_state_dict({"type": opt_meta["type"], "lr": opt_meta["lr"],
                                   "steps": opt_meta["steps"], "hyper": hyper, "state": state})
    if schedule is not None:
        schedule.load_state_dict(sched_meta["state"])
    return meta["state"]
