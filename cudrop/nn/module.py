"""Module, Parameter and containers: parameter discovery, train/eval, device moves, and
state_dict save/load to .npz."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import backend
from ..autograd import mode
from ..autograd.tensor import Tensor




class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates."""

    def __init__(self, data, name=None):
        super().__init__(data, requires_grad=True, name=name)


#: The counters (RNG state) of cudrop's stochastic layers. Strict loading skips a key ending in
#: one of them even where the model has no such layer, so that a checkpoint moves between
#: dropout variants (a gyro model's ``drop.period`` into a plain model); a fixed set, so that the
#: rule does not depend on which layers the process happens to have built.
COUNTER_NAMES = frozenset({"seed", "layer", "step", "period"})


class Module:
    """Base class. Attributes that are Parameters or Modules are registered in assignment
    order; raw arrays registered with ``register_buffer`` (running statistics) travel with
    ``to()`` and ``state_dict()`` but are not trained.

    ``training`` is per module; a layer behaves as in training only when its own flag and the
    global switch (``cudrop.eval_mode()``) both say so — see ``is_training``.
    """

    def __init__(self):
        object.__setattr__(self, "_params", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_counters", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_params" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                               "before assigning attributes")
        for table in (self._params, self._modules, self._buffers):
            table.pop(name, None)
        if isinstance(value, Parameter):
            self._params[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)
        if isinstance(value, Module):
            self._number_auto_layers()

    def _number_auto_layers(self):
        """Stochastic layers built without a ``layer`` take their position (0, 1, ...) among
        this module's such layers; the outermost module, attached last, has the last word."""
        auto = (m for m in self.modules() if getattr(m, "_auto_layer", False))
        for i, m in enumerate(auto):
            object.__setattr__(m, "layer", i)

    def register_buffer(self, name, array):
        object.__setattr__(self, name, array)
        self._buffers[name] = True

    def register_counter(self, name, value: int = 0):
        """A host-side integer (a dropout layer's seed, id and step) that ``state_dict`` saves
        and ``load_state_dict`` restores, so a resumed run draws the same masks. Never moved to
        the GPU: reading it must not synchronise. Counters are RNG state, not weights: strict
        loading does not require them, so a checkpoint moves between dropout variants (for
        names in ``COUNTER_NAMES``: a layer that registers another name adds it there)."""
        object.__setattr__(self, name, int(value))
        self._counters[name] = True

    # ---- calling -----------------------------------------------------------------------
    #: Layers whose first input must have their weight's dtype (Linear, Conv2d and their
    #: variants): a mismatch is reported here, naming the layer, not deep in a product.
    checks_input_dtype = False

    def __call__(self, *args, **kwargs):
        if self.checks_input_dtype and args:
            self._check_input_dtype(args[0])
        return self.forward(*args, **kwargs)

    def _check_input_dtype(self, x):
        have = getattr(getattr(x, "data", x), "dtype", None)
        want = self.weight.data.dtype
        if have is not None and have != want:
            raise TypeError(f"{type(self).__name__}({self.extra_repr()}) got a {have} input but "
                            f"its weight is {want}: cast the batch (x.astype({want.name!r})) or "
                            f"the model (model.to(dtype={have.name!r}))")

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    @property
    def is_training(self) -> bool:
        return self.training and mode.is_training()

    # ---- traversal ---------------------------------------------------------------------
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return (m for _, m in self.named_modules())

    def children(self):
        return iter(self._modules.values())

    def named_parameters(self, prefix=""):
        for mname, m in self.named_modules(prefix):
            for pname, p in m._params.items():
                yield (f"{mname}.{pname}" if mname else pname), p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        for mname, m in self.named_modules():
            for bname in m._buffers:
                yield (f"{mname}.{bname}" if mname else bname), m, bname

    def _named_counters(self):
        for mname, m in self.named_modules():
            for cname in m._counters:
                yield (f"{mname}.{cname}" if mname else cname), m, cname

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    # ---- modes and devices -------------------------------------------------------------
    def train(self, mode_: bool = True):
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode_))
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def to(self, device: str = None, dtype=None):
        """Move (and optionally cast floating) parameters and buffers in place."""
        for p in self.parameters():
            a = p.data if device is None else backend.to_device(p.data, device)
            if dtype is not None and a.dtype.kind == "f":
                a = a.astype(dtype)
            p.data, p.grad = a, None
        for _, m, b in self.named_buffers():
            a = getattr(m, b)
            a = a if device is None else backend.to_device(a, device)
            object.__setattr__(m, b, a)
        return self

    # ---- persistence -------------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Parameters and buffers as NumPy arrays, keyed by dotted names."""
        out = OrderedDict((n, backend.asnumpy(p.data)) for n, p in self.named_parameters())
        for n, m, b in self.named_buffers():
            out[n] = backend.asnumpy(getattr(m, b))
        for n, m, c in self._named_counters():
            out[n] = np.asarray(getattr(m, c), dtype=np.int64)
        return out

    def load_state_dict(self, state, strict: bool = True):
        """Copy arrays into the existing parameters and buffers (keeping their device and
        dtype) and restore counters. With ``strict``, missing or unexpected parameter or buffer
        keys raise KeyError; counters present on only one side (this model's, or a key ending in
        one of ``COUNTER_NAMES``) are skipped."""
        targets = {n: p for n, p in self.named_parameters()}
        bufs = {n: (m, b) for n, m, b in self.named_buffers()}
        counters = {n: (m, c) for n, m, c in self._named_counters()}
        if strict:
            known = set(targets) | set(bufs)
            missing = known - set(state)
            extra = {k for k in state if k not in known and k not in counters
                     and k.rsplit(".", 1)[-1] not in COUNTER_NAMES}
            if missing or extra:
                raise KeyError(f"state_dict mismatch: missing {sorted(missing)}, "
                               f"unexpected {sorted(extra)}")
        for name, value in state.items():
            if name in counters:
                object.__setattr__(*counters[name], int(np.asarray(value)))
                continue
            if name in targets:
                cur = targets[name].data
            elif name in bufs:
                cur = getattr(*bufs[name])
            else:
                continue
            value = np.asarray(backend.asnumpy(value))
            if value.shape != cur.shape:
                raise ValueError(f"state_dict[{name!r}] has shape {value.shape}, the model "
                                 f"expects {cur.shape}")
            new = backend.get_array_module(cur).asarray(value.astype(cur.dtype))
            if name in targets:
                targets[name].data = new
            else:
                object.__setattr__(*bufs[name], new)

    def save(self, path):
        """Write this model alone as a checkpoint at exactly ``path`` (``cudrop.save(path,
        model)``; use that to include the optimizer and schedule)."""
        from ..checkpoint import save
        return save(path, self)

    def load(self, path):
        """Restore this model from a checkpoint written by :meth:`save` or ``cudrop.save``."""
        from ..checkpoint import load
        load(path, self)
        return self

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            lines.append(f"  ({name}): " + repr(m).replace("\n", "\n  "))
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"

    def extra_repr(self) -> str:
        return ""


class Sequential(Module):
    """Runs its modules in order, like ``torch.nn.Sequential``; they are registered as
    attributes "0", "1", ... (the ``state_dict`` keys). Supports ``len``, iteration and
    indexing (a slice gives a list, not a Sequential)."""

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: argument {i} is a {type(layer).__name__}, "
                                "expected a Module")
            setattr(self, str(i), layer)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def forward(self, x):
        for layer in self._modules.values():
            x = layer(x)
        return x


class ModuleList(Sequential):
    """An indexable list of modules without a forward of its own."""

    def forward(self, x):
        raise TypeError("ModuleList has no forward(); iterate over it")
