"""Training-step time, same process and batch: cudrop eager, cudrop captured (cudrop.graph),
PyTorch eager and PyTorch CUDA graphs (issue 10). SGD with momentum in both libraries.

Cases: the MLP 1024 -> 4096 x3 -> 10, batch 1024, drop p = 0.5 as none / dropout / sparsedrop
(PyTorch: nn.Dropout for both variants), in fp32 and bf16 (parameters in bf16 in both);
ResNet-56, batch 128, 3x32x32, fp32 (PyTorch: the same network written out, cuDNN
convolutions). Time: CUDA events around 30 steps after 5 warm-up steps
(the step rate a training loop sees), median of 5 such runs. Memory: what CuPy's pool (and a
captured step's private pool) holds after the timed steps, in MiB (target: captured <= 1.1x
eager). JSON: $OUT/graph_step.json; a
table last.
"""
from __future__ import annotations

import statistics
import sys

import numpy as np

sys.path.insert(0, ".")
import cudrop as cd  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from cudrop import backend, graph, models, optim  # noqa: E402

STEPS, RUNS = 30, 5


def _rate(cp, step, batches):
    for i in range(5):
        step(*batches[i % len(batches)])
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(RUNS):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for i in range(STEPS):
            step(*batches[i % len(batches)])
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / STEPS)
    return statistics.median(times)


def _cudrop(build, shape, classes, dtype, captured):
    cp = backend.cupy
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    model = build().to("gpu", dtype=dtype)
    opt = optim.SGD(model.parameters(), 0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    batches = [(cp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype),
                cp.asarray(rng.integers(0, classes, shape[0]))) for _ in range(3)]

    def step(x, y):
        loss = cd.cross_entropy(model(cd.Tensor(x)), y)
        model.zero_grad()
        loss.backward()
        opt.step()
        return loss

    run = graph.capture(step, model=model, optimizer=opt) if captured else step
    ms = _rate(cp, run, batches)
    ok = (not captured) or (run.graph is not None and run.failed is None)
    # Memory held for training: CuPy's pool keeps the eager step's peak cached; a captured
    # step adds its private pool.
    held = pool.total_bytes() + (run.pool.total_bytes() if captured else 0)
    del model, opt, run, batches
    return ms, ok, held / 2**20


def _torch(kind, shape, classes, dtype, captured):
    import torch
    tdt = {np.dtype(np.float32): torch.float32}.get(np.dtype(dtype), torch.bfloat16)
    if kind == "resnet56":
        return _torch_rate(_torch_resnet56(torch).cuda().to(tdt), shape, classes, tdt, captured)
    layers, width = [torch.nn.Flatten()], shape[1]
    for i, h in enumerate((4096, 4096, 4096)):
        if i and kind != "none":
            layers.append(torch.nn.Dropout(0.5))
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    if kind != "none":
        layers.append(torch.nn.Dropout(0.5))
    layers.append(torch.nn.Linear(width, classes))
    model = torch.nn.Sequential(*layers).cuda().to(tdt)
    return _torch_rate(model, shape, classes, tdt, captured)


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


def _torch_rate(model, shape, classes, tdt, captured):
    import torch
    opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9)
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [(torch.randn(shape, device="cuda", generator=g).to(tdt),
                torch.randint(0, classes, (shape[0],), device="cuda", generator=g))
               for _ in range(3)]

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

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
            loss = torch.nn.functional.cross_entropy(model(sx), sy)
            loss.backward()
            opt.step()

        def replay(x, y):
            sx.copy_(x)
            sy.copy_(y)
            cg.replay()
            return loss
        run = replay
    else:
        run = step
    # Time on PyTorch's stream with CuPy events would mix streams: use torch's events.
    for i in range(5):
        run(*batches[i % 3])
    torch.cuda.synchronize()
    times = []
    for _ in range(RUNS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(STEPS):
            run(*batches[i % 3])
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / STEPS)
    return statistics.median(times)


def main():
    import ml_dtypes
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    bf16 = np.dtype(ml_dtypes.bfloat16)
    cases = []
    for dtype in (np.dtype(np.float32), bf16):
        for kind in ("none", "dropout", "sparsedrop"):
            cases.append((f"mlp-{kind}", kind, lambda k=kind: models.mlp(
                (1024,), 10, hidden=(4096, 4096, 4096), dropout=k, p=0.5, seed=0),
                (1024, 1024), 10, dtype))
    cases.append(("resnet56", "resnet56", lambda: models.resnet56(in_channels=3),
                  (128, 3, 32, 32), 10, np.dtype(np.float32)))
    rows = []
    for name, kind, build, shape, classes, dtype in cases:
        eager, _, eager_mb = _cudrop(build, shape, classes, dtype, False)
        cap, ok, cap_mb = _cudrop(build, shape, classes, dtype, True)
        t_eager = t_graph = None
        if have_torch:
            t_eager = _torch(kind, shape, classes, dtype, False)
            t_graph = _torch(kind, shape, classes, dtype, True)
        row = dict(case=name, dtype=dtype.name, batch=shape[0], cudrop_eager_ms=eager,
                   cudrop_graph_ms=cap, captured=ok, torch_eager_ms=t_eager,
                   torch_graph_ms=t_graph, cudrop_eager_mb=eager_mb, cudrop_graph_mb=cap_mb,
                   graph_memory_ratio=cap_mb / eager_mb)
        rows.append(row)
        print(row, flush=True)
    write_json("graph_step.json", rows)
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"{'case':16s} {'dtype':9s} {'cd eager':>9s} {'cd graph':>9s} {'pt eager':>9s} "
          f"{'pt graph':>9s} {'graph/pt eager':>14s} {'graph/pt graph':>14s} "
          f"{'memory graph/eager':>18s}")
    for r in rows:
        ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}"  # noqa: E731
        print(f"{r['case']:16s} {r['dtype']:9s} {f(r['cudrop_eager_ms']):>9s} "
              f"{f(r['cudrop_graph_ms']):>9s}{'' if r['captured'] else '*'} "
              f"{f(r['torch_eager_ms']):>9s} {f(r['torch_graph_ms']):>9s} "
              f"{ratio(r['cudrop_graph_ms'], r['torch_eager_ms']):>14s} "
              f"{ratio(r['cudrop_graph_ms'], r['torch_graph_ms']):>14s} "
              f"{r['graph_memory_ratio']:>18.2f}")
    print("* the captured step fell back to eager (see the warning)")


if __name__ == "__main__":
    main()
