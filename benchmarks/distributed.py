"""Data-parallel step throughput, 1 -> N GPUs (issue 13): the MLP 1024 -> 4096 x3 -> 10 at batch
1024 per GPU and ResNet-56 at batch 128 per GPU (3x32x32), bf16 where the model runs in bf16
(else fp32, said in the JSON), SGD with momentum, gradients averaged by the bucketed
``GradientReducer`` overlapped with backward; eager steps, and captured steps
(``cudrop.graph``) where the step captures.

    python benchmarks/distributed.py                 # world size 1, then 2, 4, 8 up to the GPUs
    cudrop launch -n 2 -- benchmarks/distributed.py  # one world size, under a launcher
    torchrun --nproc-per-node 2 benchmarks/distributed.py

Time: CUDA events around 30 steps after 5 warm-up steps, median of 5 such runs, the slowest
rank's; throughput = world size x batch / step time; scaling = throughput / world size 1's.
JSON: $OUT/distributed.json (or distributed_wN.json under a launcher); a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import numpy as np

sys.path.insert(0, ".")
import cudrop as cd  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from cudrop import backend, distributed as dist, graph, models, nn, optim  # noqa: E402

STEPS, RUNS, WARMUP = 30, 5, 5
CASES = {  # name: (builder, per-GPU input shape, classes)
    "mlp": (lambda: models.mlp((1024,), 10, hidden=(4096, 4096, 4096), dropout="none"),
            (1024, 1024), 10),
    "resnet56": (lambda: models.resnet56(in_channels=3), (128, 3, 32, 32), 10),
}


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def _setup(name, dtype, env):
    cp = backend.cupy
    build, shape, classes = CASES[name]
    model = build().to("gpu", dtype=dtype)
    nn.set_shard(model, env.rank, env.world_size)
    dist.broadcast_parameters(model)
    opt = optim.SGD(model.parameters(), 0.01, momentum=0.9)
    reducer = dist.GradientReducer(model.parameters())
    rng = np.random.default_rng(env.rank)
    batches = [(cp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype),
                cp.asarray(rng.integers(0, classes, shape[0]))) for _ in range(3)]

    def step(x, y):
        loss = cd.cross_entropy(model(cd.Tensor(x)), y)
        model.zero_grad()
        loss.backward()
        reducer.finish()
        opt.step()
        return loss

    return model, opt, reducer, batches, step


def _time(run, batches):
    cp = backend.cupy
    for i in range(WARMUP):
        run(*batches[i % len(batches)])
    dist.synchronize("the warm-up steps")
    dist.barrier()
    times = []
    for _ in range(RUNS):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for i in range(STEPS):
            run(*batches[i % len(batches)])
        end.record()
        dist.heartbeat("timed steps")
        dist.synchronize("the timed steps")
        times.append(cp.cuda.get_elapsed_time(start, end) / STEPS)
    ms = cp.asarray([statistics.median(times)], dtype=np.float64)
    dist.all_reduce(ms, "max")  # the slowest rank sets the pace
    dist.synchronize("the timing")
    return float(ms.get()[0])


def _case(name, env, want_bf16):
    row = dict(model=name, world_size=env.world_size, batch_per_gpu=CASES[name][1][0])
    dtype, note = (np.dtype(np.float32), None)
    if want_bf16:
        dtype = _bf16()
        try:  # ResNets' pooling may refuse bfloat16: fall back to fp32 and say so
            model, opt, reducer, batches, step = _setup(name, dtype, env)
            step(*batches[0])
            dist.synchronize("a bf16 trial step")
        except Exception as e:  # noqa: BLE001 - recorded in the JSON
            dtype, note = np.dtype(np.float32), f"bf16 failed ({type(e).__name__}: {e}); fp32"
    row["dtype"], row["note"] = dtype.name, note
    model, opt, reducer, batches, step = _setup(name, dtype, env)
    row["buckets"] = len(reducer.buckets)
    row["eager_ms"] = _time(step, batches)
    run = graph.capture(step, model=model, optimizer=opt)
    try:
        ms = _time(run, batches)
        captured = run.graph is not None and run.failed is None
    except Exception as e:  # noqa: BLE001
        ms, captured, run.failed = None, False, e
    row["captured_ms"] = ms if captured else None
    row["capture_failed"] = None if captured else f"{type(run.failed).__name__}: {run.failed}"
    best = min(v for v in (row["eager_ms"], row["captured_ms"]) if v is not None)
    row["samples_per_s"] = env.world_size * row["batch_per_gpu"] / (best / 1e3)
    return row


def worker(args):
    env = dist.init()
    rows = [_case(name, env, not args.fp32) for name in args.models]
    if env.rank == 0:
        payload = dict(world_size=env.world_size, rows=rows, gpu=backend.info().get("gpu"))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(payload, f)
        else:
            print("wrote", write_json(f"distributed_w{env.world_size}.json", payload))
            _table(rows)
    dist.destroy()


def driver(args):
    n = backend.gpu_count()
    if n == 0 or not backend.nccl_available():
        print("benchmarks/distributed.py: needs a CUDA GPU and NCCL (cupy.cuda.nccl); "
              "nothing measured")
        return 1
    sizes = [w for w in (1, 2, 4, 8) if w <= n]
    if n == 1:
        print("only 1 GPU here: measuring world size 1 only (the scaling needs >= 2 GPUs)")
    results, rows = {}, []
    for w in sizes:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [os.path.abspath(__file__), "--out", out, "--models", *args.models] + \
            (["--fp32"] if args.fp32 else [])
        rc = dist.launch(w, cmd)
        if rc != 0 or not os.path.getsize(out):
            print(f"world size {w}: failed (status {rc})")
            continue
        with open(out) as f:
            results[w] = json.load(f)
        os.remove(out)
        rows += results[w]["rows"]
    base = {r["model"]: r["samples_per_s"] for r in rows if r["world_size"] == 1}
    for r in rows:
        if r["model"] in base:
            r["scaling"] = r["samples_per_s"] / base[r["model"]]
    print("wrote", write_json("distributed.json", dict(gpus=n, rows=rows,
                                                       gpu=backend.info().get("gpu"))))
    _table(rows)
    return 0


def _table(rows):
    print(f"{'model':9s} {'ranks':>5s} {'dtype':>8s} {'eager ms':>9s} {'graph ms':>9s} "
          f"{'samples/s':>10s} {'scaling':>7s}")
    for r in rows:
        g = "-" if r["captured_ms"] is None else f"{r['captured_ms']:.2f}"
        sc = f"{r['scaling']:.2f}x" if "scaling" in r else "-"
        print(f"{r['model']:9s} {r['world_size']:5d} {r['dtype']:>8s} {r['eager_ms']:9.2f} "
              f"{g:>9s} {r['samples_per_s']:10.0f} {sc:>7s}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    ap.add_argument("--fp32", action="store_true", help="fp32 instead of bf16")
    ap.add_argument("--out", help=argparse.SUPPRESS)  # the driver's per-world-size result
    args = ap.parse_args()
    under_launcher = dist.read_env().launcher != "none"
    return worker(args) if under_launcher else driver(args)


if __name__ == "__main__":
    sys.exit(main())
