"""Function: one differentiable op on raw arrays, and the backward pass over the graph."""
from __future__ import annotations

import heapq
import weakref

from .. import backend, graph
from . import mode
from ..functional import _act


class Function:
    """Subclasses implement ``forward(*arrays) -> array | tuple`` and
    ``backward(*grad_outputs) -> grad | tuple`` on raw NumPy/CuPy arrays.

    Non-array arguments (axes, strides, probabilities) go to ``__init__``. An input may be None
    (an optional bias): ``forward`` receives None there, and it is no graph input. ``backward``
    returns one gradient per forward input, None inputs included (``None`` where no gradient
    flows). It always receives arrays: zeros for an output nobody used. Save what backward needs
    on ``self`` in ``forward``.
    """

    generation = 0
    _gate = None  # the graph.Gate whose part recorded this op (only in a CUDA-graph capture)

    def __call__(self, *inputs):
        from .tensor import Tensor, as_tensor

        tensors = [x if isinstance(x, Tensor) or x is None else as_tensor(x) for x in inputs]
        xs = [None if t is None else t.data for t in tensors]
        backend.get_array_module(*xs)  # mixed NumPy/CuPy inputs raise TypeError here
        ys = self.forward(*xs)
        single = not isinstance(ys, tuple)
        if single:
            ys = (ys,)
        outputs = [Tensor(y) for y in ys]
        if mode.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            self.inputs = tensors
            self._needs = tuple(t is not None and t.requires_grad for t in tensors)
            self.generation = max(t.generation for t in tensors if t is not None)
            for o in outputs:
                o.creator = self
                o.requires_grad = True
                o.generation = self.generation + 1
            self.outputs = [weakref.ref(o) for o in outputs]
            # An output nobody kept gets a zero gradient; remember how to build it.
            self._out_meta = [(y.shape, y.dtype) for y in ys]
            self._xp = backend.get_array_module(*ys)
            if graph.is_capturing():
                self._gate = graph.current_gate()
        return outputs[0] if single else tuple(outputs)

    def needs_grad(self, i: int) -> bool:
        """Whether forward input ``i`` wants a gradient (True when unknown). ``backward`` may
        return None for the others instead of computing them: the gradient of a constant
        operand is a reduction over the whole output (attention's scale and causal mask: a
        (B, H, T, T) sum per layer, profiled on the H200) that nobody reads."""
        needs = getattr(self, "_needs", None)
        return needs is None or needs[i]

    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, *gys):
        raise NotImplementedError

    def __repr__(self):
        return f"<{type(self).__name__}>"


#: Leaves with grad-ready hooks (``Tensor.register_grad_ready_hook``): while it is empty,
#: ``run_backward`` skips counting each leaf's uses, so a backward without hooks costs nothing more.
_hooked = weakref.WeakSet()


def run_backward(root, grad, retain_graph=False):
    """Reverse-mode sweep from ``root`` seeded with ``grad``.

    Gradients of intermediate tensors live in a local table; only leaves that require a
    gradient accumulate into ``.grad`` (so two backward calls add up, as users expect).

    Grad-ready hooks: when some leaf has hooks, a first pass over the graph counts, for each
    hooked leaf, the edges into it; each processed edge counts down, and at zero (no further
    contribution can arrive) the leaf's hooks run with the leaf, its ``.grad`` final for this
    pass. A hooked leaf that got a gradient but still had uncounted edges (an op returned None
    for a path) has its hooks run at the end of the pass. Leaves that got no gradient at all are
    not called.
    """
    grads = {id(root): grad}
    keep = {id(root): root}  # ids are only unique while the objects live
    handed = _Handed(grad)
    pending = _count_hooked_uses(root) if _hooked else None

    if root.creator is None:
        _accumulate_leaf(root, grad)
        _run_hooks(root)
        return
    # In a capture with gated parts (graph.gate): each op's backward is recorded into its
    # forward's part, and a gradient is summed only within one part (a skipped part's stale
    # gradient must not reach a running sum).
    capturing = graph.is_capturing()
    order = (_ByPart if capturing else _ByGeneration)(root.creator)
    grad_gates = {}
    while True:
        f = order.pop()
        if f is None:
            break
        if not hasattr(f, "_out_meta"):
            raise RuntimeError("backward through a graph that was already freed; pass "
                               "retain_graph=True to the first backward() to keep it")
        if capturing:
            graph.switch(f._gate)
        outs = [r() for r in f.outputs]
        gys = []
        for o, (shape, dtype) in zip(outs, f._out_meta):
            g = grads.pop(id(o), None) if o is not None else None
            if g is None:
                g = f._xp.zeros(shape, dtype)
            elif g.dtype != dtype:
                # A consumer that promoted (float32 tensor + float64 array) hands back a wider
                # gradient; ops such as matmul require their operands' dtype in backward.
                g = g.astype(dtype)
            gys.append(g)
        gxs = f.backward(*gys)
        if not isinstance(gxs, tuple):
            gxs = (gxs,)
        if len(gxs) != len(f.inputs):
            raise RuntimeError(f"{f!r}.backward returned {len(gxs)} gradients for "
                               f"{len(f.inputs)} inputs")
        # Arrays this backward passed through (its incoming gradients) or returned twice may
        # be seen elsewhere: a leaf copies those (see _accumulate_leaf).
        shared = {id(g) for g in gys}
        returned = set()
        for gx in gxs:
            if gx is not None:
                (shared if id(gx) in returned else returned).add(id(gx))
        for x, gx in zip(f.inputs, gxs):
            if x is None or not x.requires_grad:
                continue
            if x.creator is not None:
                order.edge(x.creator, gx is not None)
            if gx is not None and gx.shape != x.shape:
                raise RuntimeError(f"{f!r}.backward gave a gradient of shape {gx.shape} for an "
                                   f"input of shape {x.shape}")
            if x.creator is None:
                if gx is not None:
                    _accumulate_leaf(x, gx, owned=id(gx) not in shared and gx.base is None
                                     and gx not in handed)
                    handed.add(gx)
                if pending is not None:
                    _count_down(x, pending)
            elif gx is not None:
                handed.add(gx)
                prev = grads.get(id(x))
                if capturing and grad_gates.setdefault(id(x), f._gate) is not f._gate:
                    raise graph.CaptureError(f"{f!r} adds a gradient from another gated part "
                                             "to one summed outside it")
                grads[id(x)] = gx if prev is None else _act.add(prev, gx)
                keep[id(x)] = x
        if not retain_graph:
            # Drop arrays the op saved for backward; the graph is single-use by default.
            f.__dict__ = {"inputs": (), "outputs": [], "generation": f.generation}
    if capturing:
        graph.switch(None)
    if pending:
        for _, leaf in pending.values():  # edges on paths that carried no gradient
            if leaf.grad is not None:
                _run_hooks(leaf)


class _Handed:
    """The arrays given to some tensor in one backward pass, by identity. A weak reference
    each (NumPy's and CuPy's arrays take them), so that an array freed during the pass does not
    count: the next array may get its id (and the pool its memory), and an id alone made that
    new array look handed, so its leaf copied it (measured on the H200: two 80 us copies of
    4096 x 4096 bf16 weight gradients in a captured SliceOut MLP step of 0.67 ms). An array
    that takes no weak reference is held instead."""

    __slots__ = ("refs",)

    def __init__(self, first):
        self.refs = {}
        self.add(first)

    def add(self, a):
        try:
            self.refs[id(a)] = weakref.ref(a)
        except TypeError:
            self.refs[id(a)] = lambda a=a: a

    def __contains__(self, a):
        ref = self.refs.get(id(a))
        return ref is not None and ref() is a


class _ByGeneration:
    """The eager backward order: the op of the highest generation first. Every consumer of an
    op's outputs has a higher generation, so an op runs after all its gradients arrived. An op
    no gradient reaches is never run."""

    def __init__(self, root_fn):
        self.heap, self.seen = [], set()
        self.edge(root_fn, True)

    def edge(self, f, carries: bool) -> None:
        """A consumer's backward ran for an edge into ``f``; ``carries``: it gave a gradient."""
        if carries and id(f) not in self.seen:
            self.seen.add(id(f))
            heapq.heappush(self.heap, (-f.generation, id(f), f))

    def pop(self):
        return heapq.heappop(self.heap)[2] if self.heap else None


class _ByPart:
    """The backward order while a step is captured: an op runs once every consumer edge into
    it has run (counted beforehand), and among the ready ops those of the part being recorded
    (graph.current_gate) go first, else the highest generation. So a gated unit's backward is
    one part of the graph (one IF node or piece), where the generation order alternated
    between its body and the ungated shortcut at each generation (two parts a ResNet depth
    unit). Costs one walk over the graph, once per capture. A tensor with three or more
    consumers may sum their gradients in another order than the eager step does: captured and
    eager steps agree to float tolerance (as the 100-step capture tests check), not always bit
    for bit."""

    def __init__(self, root_fn):
        self.waiting = {}  # id(op) -> consumer edges into it that have not run
        stack, seen = [root_fn], {id(root_fn)}
        while stack:
            for c in _creators(stack.pop()):
                self.waiting[id(c)] = self.waiting.get(id(c), 0) + 1
                if id(c) not in seen:
                    seen.add(id(c))
                    stack.append(c)
        self.reached = {id(root_fn)}  # ops some gradient reached
        self.ready = {}  # gate -> heap of its ready ops
        self._ready(root_fn)

    def _ready(self, f):
        heapq.heappush(self.ready.setdefault(f._gate, []), (-f.generation, id(f), f))

    def edge(self, f, carries: bool) -> None:
        if carries:
            self.reached.add(id(f))
        stack = [f]
        while stack:
            f = stack.pop()
            self.waiting[id(f)] -= 1
            if self.waiting[id(f)] == 0:
                if id(f) in self.reached:
                    self._ready(f)
                else:  # no gradient reaches f: it does not run, so its own edges are done
                    stack.extend(_creators(f))

    def pop(self):
        heap = self.ready.get(graph.current_gate())
        if not heap:
            heap = min((h for h in self.ready.values() if h), key=lambda h: h[0], default=None)
            if heap is None:
                return None
        return heapq.heappop(heap)[2]


def _creators(f):
    """The creators of ``f``'s inputs that want a gradient, one per edge."""
    return [x.creator for x in f.inputs
            if x is not None and x.requires_grad and x.creator is not None]


def _count_hooked_uses(root):
    """``{id(leaf): [edges into it, leaf]}`` for the hooked leaves of ``root``'s graph."""
    counts = {}
    if root.creator is None:
        return counts
    stack, seen = [root.creator], {id(root.creator)}
    while stack:
        f = stack.pop()
        for x in getattr(f, "inputs", ()):
            if x is None or not x.requires_grad:
                continue
            if x.creator is None:
                if x._grad_hooks:
                    entry = counts.setdefault(id(x), [0, x])
                    entry[0] += 1
            elif id(x.creator) not in seen:
                seen.add(id(x.creator))
                stack.append(x.creator)
    return counts


def _count_down(leaf, pending):
    entry = pending.get(id(leaf))
    if entry is None:
        return
    entry[0] -= 1
    if entry[0] == 0:
        del pending[id(leaf)]
        if leaf.grad is not None:
            _run_hooks(leaf)


def _run_hooks(leaf):
    for fn in tuple(leaf._grad_hooks or ()):
        fn(leaf)


def _accumulate_leaf(t, g, owned=False):
    """Add ``g`` into ``t.grad``. Each leaf owns its ``.grad`` array (clipping and hooks update
    it in place), so ``g`` is copied unless it is ``owned``: a fresh array that no other tensor
    of this pass received -- the common case (a Linear's weight gradient), where the copy was a
    full extra pass over every gradient each step (profiled on the H200: 0.19 ms of a 1.1 ms
    bf16 MLP step). The caller's seed, one array handed to two inputs (``a + b``) and views
    are copied."""
    graph.note_grad(t)
    if g.dtype != t.data.dtype:
        g = g.astype(t.data.dtype)
    elif t.grad is None and not owned:
        g = g.copy()
    t.grad = g if t.grad is None else _act.add(t.grad, g)
