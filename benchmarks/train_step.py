"""Training-step time, same process and batch: cudrop eager, cudrop captured (cudrop.graph),
PyTorch eager and PyTorch CUDA graphs (issues 10 and 11). SGD with momentum in both libraries.

Cases, each in float32 and bfloat16 (PyTorch runs the same network written out; parameters in
the step's dtype in both; cudrop's bf16 SGD keeps float32 master weights and momentum):
- MLP 1024 -> 4096 x3 -> 10, batch 1024, the hidden layers' units dropped at p = 0.5 by each
  variant: none / dropout / sliceout / gyro / blockwise / sparsedrop (PyTorch: nn.Dropout for
  every variant, the plain-dropout step the skipping variants are measured against);
- ResNet-56, batch 128, 3x32x32 (PyTorch: cuDNN convolutions, fp32 in TF32 as PyTorch's
  default for convolutions); and cudrop's ResNet-56 with depth dropout p = 0.25 / 0.5 / 0.75
  (trainable shortcuts, downsampling units kept; and p = 1e-9, its fixed cost) and stochastic depth p_L = 0.5 (batch gates),
  whose captured steps skip the dropped bodies (``graph.gate``); PyTorch has no such layers:
  compare with the plain ResNet-56 rows;
- GPT: 4 pre-LN blocks, d = 1024, 16 heads, context 256, batch 32, 65 tokens (PyTorch:
  ``scaled_dot_product_attention``, tanh GELU as cudrop's);
- ViT: 2 blocks, d = 1024, 16 heads, MLP ratio 4, patch 2 on 1x28x28 images, batch 128.
Time: CUDA events around 30 steps after 5 warm-up steps (the step rate a training loop sees),
median of 5 such runs. Memory: what CuPy's pool (and a captured step's private pool) holds after
the timed steps, in MiB (target: captured <= 1.1x eager). A case that fails in one library is
recorded with its error and the run goes on. JSON: $OUT/train_step.json; a table last.

    python benchmarks/train_step.py [--if-nodes] [case-prefix ...]
        (e.g. "gpt vit": only those; "mlp-sliceout:bfloat16": one dtype; --if-nodes: captured
        gated units as conditional IF nodes of one graph, ``graph.capture(if_nodes=True)``)
"""
from __future__ import annotations

import statistics
import sys
from typing import Callable, NamedTuple

import numpy as np

sys.path.insert(0, ".")
import cudrop as cd  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from cudrop import backend, graph, models, optim  # noqa: E402

STEPS, RUNS = 30, 5


class Case(NamedTuple):
    name: str
    dtype: np.dtype
    cudrop: Callable  # () -> cudrop model
    torch: Callable | None  # (torch) -> torch.nn.Module; None: no PyTorch twin
    shape: tuple  # of one input batch
    classes: int
    tokens: bool = False  # inputs are token ids and every position has a target


MLP_KINDS = ("none", "dropout", "sliceout", "gyro", "blockwise", "sparsedrop")
# depth1e-9: the gates and trainable shortcuts with (almost) no unit dropped, so that against
# the plain network it measures depth dropout's fixed cost
RESNET_GATES = [("depth1e-9", dict(depth_dropout=1e-9)), ("depth0.25", dict(depth_dropout=0.25)), ("depth0.5", dict(depth_dropout=0.5)),
                ("depth0.75", dict(depth_dropout=0.75)), ("sd0.5", dict(stochastic_depth=0.5))]


def _cases():
    import ml_dtypes
    cases = []
    for dtype in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
        for kind in MLP_KINDS:
            cases.append(Case(f"mlp-{kind}", dtype, lambda k=kind: models.mlp(
                (1024,), 10, hidden=(4096, 4096, 4096), dropout=k, p=0.5, seed=0),
                lambda torch, k=kind: _torch_mlp(torch, k), (1024, 1024), 10))
        cases.append(Case("resnet56", dtype, lambda: models.resnet56(in_channels=3),
                          _torch_resnet56, (128, 3, 32, 32), 10))
        for name, kw in RESNET_GATES:
            cases.append(Case(f"resnet56-{name}", dtype,
                              lambda kw=kw: models.resnet56(in_channels=3, **kw), None,
                              (128, 3, 32, 32), 10))
        cases.append(Case("gpt", dtype, lambda: models.GPT(65, block_size=256, dim=1024, depth=4,
                                                            heads=16, dropout="none"),
                          lambda torch: _torch_transformer(torch, 1024, 16, 4, 4, True,
                                                           vocab=65, context=256),
                          (32, 256), 65, True))
        cases.append(Case("vit", dtype, lambda: models.ViT(
            image_size=28, patch_size=2, in_channels=1, dim=1024, depth=2, heads=16,
            mlp_ratio=4, dropout="none"),
            lambda torch: _torch_transformer(torch, 1024, 16, 2, 4, False, patches=(1, 28, 2),
                                             classes=10), (128, 1, 28, 28), 10))
    return cases


def selected(case, wanted):
    """Whether ``case`` matches one of the command line's selectors: a name prefix, optionally
    with ``:dtype`` (``mlp:bfloat16``, ``resnet56:float32``); no selectors: every case."""
    for w in wanted:
        name, _, dtype = w.partition(":")
        if case.name.startswith(name) and (not dtype or case.dtype.name == dtype):
            return True
    return not wanted


def _batches(xp, case, rng, cast):
    if case.tokens:
        return [(xp.asarray(rng.integers(0, case.classes, case.shape)),
                 xp.asarray(rng.integers(0, case.classes, case.shape))) for _ in range(3)]
    return [(cast(xp.asarray(rng.standard_normal(case.shape, dtype=np.float32))),
             xp.asarray(rng.integers(0, case.classes, case.shape[0]))) for _ in range(3)]


def _rate(sync, event, elapsed, run, batches):
    """Median ms per step over RUNS runs of STEPS steps, after 5 warm-up steps."""
    for i in range(5):
        run(*batches[i % len(batches)])
    sync()
    times = []
    for _ in range(RUNS):
        start, end = event(), event()
        start.record()
        for i in range(STEPS):
            run(*batches[i % len(batches)])
        end.record()
        end.synchronize()
        times.append(elapsed(start, end) / STEPS)
    return statistics.median(times)


def cudrop_step(case):
    """``(model, optimizer, step, batches)``: the case's model on the GPU, SGD with momentum,
    one training step ``step(x, y) -> loss`` and three input batches."""
    cp = backend.cupy
    model = case.cudrop().to("gpu", dtype=case.dtype)
    opt = optim.SGD(model.parameters(), 0.01, momentum=0.9)
    batches = _batches(cp, case, np.random.default_rng(0), lambda a: a.astype(case.dtype))

    def step(x, y):
        loss = cd.cross_entropy(model(x if case.tokens else cd.Tensor(x)), y)
        model.zero_grad()
        loss.backward()
        opt.step()
        return loss
    return model, opt, step, batches


def _cudrop(case, captured, if_nodes=False):
    cp = backend.cupy
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    model, opt, step, batches = cudrop_step(case)
    run = graph.capture(step, model=model, optimizer=opt, if_nodes=if_nodes) if captured else step
    ms = _rate(cp.cuda.Device().synchronize, cp.cuda.Event, cp.cuda.get_elapsed_time, run,
               batches)
    # captured: gated units as IF nodes of one graph, or as pieces (the default)
    ok = (not captured) or (run.graph is not None and run.failed is None and (
        "if-nodes" if run.recorder.conds else
        "pieces" if isinstance(run.graph, graph._PiecedGraph) else "one graph"))
    # Memory held for training: CuPy's pool keeps the eager step's peak cached; a captured
    # step adds its private pool.
    held = pool.total_bytes() + (run.pool.total_bytes() if captured else 0)
    del model, opt, run, batches
    return ms, ok, held / 2**20


def _torch(case, captured):
    import torch
    tdt = torch.float32 if case.dtype == np.float32 else torch.bfloat16
    model = case.torch(torch).cuda().to(tdt)
    opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9)
    g = torch.Generator(device="cuda").manual_seed(0)
    if case.tokens:
        batches = [(torch.randint(0, case.classes, case.shape, device="cuda", generator=g),
                    torch.randint(0, case.classes, case.shape, device="cuda", generator=g))
                   for _ in range(3)]
    else:
        batches = [(torch.randn(case.shape, device="cuda", generator=g).to(tdt),
                    torch.randint(0, case.classes, (case.shape[0],), device="cuda",
                                  generator=g)) for _ in range(3)]

    def loss_of(x, y):
        out = model(x)
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(x, y)
        loss.backward()
        opt.step()
        return loss

    run = step
    if captured:
        sx, sy = batches[0][0].clone(), batches[0][1].clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step(sx, sy)
        torch.cuda.current_stream().wait_stream(s)
        cg = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(cg):
            loss = loss_of(sx, sy)
            loss.backward()
            opt.step()

        def run(x, y):
            sx.copy_(x)
            sy.copy_(y)
            cg.replay()
            return loss
    # Time on PyTorch's stream with PyTorch's events (CuPy's would mix streams).
    return _rate(torch.cuda.synchronize, lambda: torch.cuda.Event(enable_timing=True),
                 lambda a, b: a.elapsed_time(b), run, batches)


def _torch_mlp(torch, kind):
    layers, width = [torch.nn.Flatten()], 1024
    for i, h in enumerate((4096, 4096, 4096)):
        if i and kind != "none":
            layers.append(torch.nn.Dropout(0.5))
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    if kind != "none":
        layers.append(torch.nn.Dropout(0.5))
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers)


def _torch_resnet56(torch):
    """cudrop.models.resnet56's twin: 3x3 stem, three stages of 9 basic blocks (16/32/64
    channels), 1x1 conv + BN projections where the shape changes, last BN of each branch
    zero-initialised, global average pool, Linear."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                      nn.BatchNorm2d(cout), nn.ReLU(),
                                      nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(cout))
            nn.init.zeros_(self.body[4].weight)
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    layers, c = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for stage, w in enumerate((16, 32, 64)):
        for i in range(9):
            layers.append(Block(c, w, 2 if stage and not i else 1))
            c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return nn.Sequential(*layers)


def _torch_transformer(torch, dim, heads, depth, mlp_ratio, causal, *, vocab=None, context=None,
                       patches=None, classes=None):
    """cudrop.models.GPT / ViT's twin: pre-LN blocks (qkv Linear, attention, projection; Linear,
    tanh GELU, Linear), final LayerNorm; GPT: token + position embeddings and a bias-free head
    over every position; ViT: patch Linear, class token, position embeddings, head on the class
    token."""
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU("tanh"),
                                     nn.Linear(mlp_ratio * dim, dim))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, heads, dim // heads).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=causal)
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, dim))
            return x + self.mlp(self.ln2(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.ln = nn.LayerNorm(dim)
            if vocab:
                self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
                self.head = nn.Linear(dim, vocab, bias=False)
            else:
                c, size, p = patches
                self.p, n = p, (size // p) ** 2
                self.embed = nn.Linear(c * p * p, dim)
                self.cls = nn.Parameter(torch.zeros(1, 1, dim))
                self.pos = nn.Parameter(torch.zeros(1, n + 1, dim))
                self.head = nn.Linear(dim, classes)

        def forward(self, x):
            if vocab:
                z = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
                return self.head(self.ln(self.blocks(z)))
            b, c, h, w = x.shape
            p = self.p
            x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
            z = self.embed(x.reshape(b, (h // p) * (w // p), c * p * p))
            z = torch.cat([self.cls.expand(b, -1, -1), z], 1) + self.pos
            return self.head(self.ln(self.blocks(z))[:, 0])

    return Net()


def _guarded(fn, *args):
    """``fn(*args)``, or the error's text when the case fails in that library."""
    try:
        return fn(*args), None
    except Exception as e:  # noqa: BLE001 - recorded in the JSON, the run goes on
        return None, f"{type(e).__name__}: {e}"[:300]


def main():
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    wanted = sys.argv[1:]
    if_nodes = "--if-nodes" in wanted
    wanted = [w for w in wanted if w != "--if-nodes"]
    rows = []
    for case in _cases():
        if not selected(case, wanted):
            continue
        eager, err_e = _guarded(_cudrop, case, False)
        cap, err_c = _guarded(_cudrop, case, True, if_nodes)
        t_eager = t_graph = err_t = None
        if have_torch and case.torch is not None:
            t_eager, err_t = _guarded(_torch, case, False)
            t_graph, err_tg = _guarded(_torch, case, True)
            err_t = err_t or err_tg
        row = dict(case=case.name, dtype=case.dtype.name, batch=case.shape[0],
                   cudrop_eager_ms=eager and eager[0], cudrop_graph_ms=cap and cap[0],
                   captured=(cap and cap[1]) or False, torch_eager_ms=t_eager,
                   torch_graph_ms=t_graph,
                   cudrop_eager_mb=eager and eager[2], cudrop_graph_mb=cap and cap[2],
                   cudrop_error=err_e or err_c, torch_error=err_t)
        row["graph_memory_ratio"] = (cap[2] / eager[2]) if cap and eager else None
        rows.append(row)
        print(row, flush=True)
    write_json("train_step.json", rows)
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}"  # noqa: E731
    print(f"{'case':16s} {'dtype':9s} {'cd eager':>9s} {'cd graph':>9s} {'pt eager':>9s} "
          f"{'pt graph':>9s} {'graph/pt eager':>14s} {'graph/pt graph':>14s} "
          f"{'memory graph/eager':>18s}")
    for r in rows:
        print(f"{r['case']:16s} {r['dtype']:9s} {f(r['cudrop_eager_ms']):>9s} "
              f"{f(r['cudrop_graph_ms']):>9s}{'' if r['captured'] else '*'} "
              f"{f(r['torch_eager_ms']):>9s} {f(r['torch_graph_ms']):>9s} "
              f"{ratio(r['cudrop_graph_ms'], r['torch_eager_ms']):>14s} "
              f"{ratio(r['cudrop_graph_ms'], r['torch_graph_ms']):>14s} "
              f"{f(r['graph_memory_ratio']):>18s}")
    print("* not captured (fell back to eager, or failed: see cudrop_error in the JSON)")


if __name__ == "__main__":
    main()
