"""Where a training step's GPU time goes: the time of every kernel of a step, summed by kernel
name, for train_step.py's cases (cudrop, and PyTorch where it has a twin), through CUPTI
(``torch.profiler``, which records every kernel of the process, CuPy's included).

Kernel times are the same in eager and captured steps where both run the same kernels; the sum
over kernels is a captured step's time without the gaps between kernels. 3 eager steps are
profiled after 5 warm-up steps. ``--captured``: cudrop's steps are replays of the captured step
(``cudrop.graph.capture``) instead, for the variants whose captured path runs other kernels
(SliceOut's device-decided slices, the gated ends of depth dropout and stochastic depth); the
warm-up covers the eager steps before the capture.
Extra case: ``resnet56-shortcuts``, cudrop's ResNet-56 with depth dropout's trainable shortcuts
on every unit and (practically) no unit dropped (p = 1e-9): its excess over ``resnet56`` is
what the shortcuts cost.

    python benchmarks/profile_step.py [--captured] [--sequence] [case-prefix[:dtype] ...]
        (default: resnet56)

JSON: $OUT/profile_step.json (with each case's last step's kernels in order, ``sequence``);
per case the 15 costliest kernels last, and with ``--sequence`` that step's kernels in order.
"""
from __future__ import annotations

import sys

import numpy as np

sys.path.insert(0, ".")
from benchmarks.common import write_json  # noqa: E402
from benchmarks.train_step import Case, _cases, cudrop_step, selected  # noqa: E402
from cudrop import backend, graph, models  # noqa: E402

WARMUP, STEPS, TOP = 5, 3, 15


def _profile(run, batches, sync):
    from torch.profiler import ProfilerActivity, profile
    for i in range(WARMUP):
        run(*batches[i % len(batches)])
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(STEPS):
            run(*batches[i % len(batches)])
        sync()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = e.cuda_time_total
        if us > 0:
            rows.append({"kernel": e.key[:90], "us_per_step": us / STEPS,
                         "launches_per_step": e.count / STEPS})
    rows.sort(key=lambda r: -r["us_per_step"])
    # the last step's kernels in the order they ran: where a kernel sits tells which op
    # launched it (an 80 us copy after each weight-gradient scatter was autograd's, not the
    # scatter's)
    ran = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                 key=lambda e: e.time_range.start)
    sequence = [[e.name[:90], e.time_range.elapsed_us()] for e in ran[-(len(ran) // STEPS):]]
    return {"kernel_us_per_step": sum(r["us_per_step"] for r in rows),
            "launches_per_step": sum(r["launches_per_step"] for r in rows), "kernels": rows,
            "sequence": sequence}


def _cudrop(case, captured=False):
    model, opt, step, batches = cudrop_step(case)
    if captured:
        step = graph.capture(step, model=model, optimizer=opt)
        # A gated step is recorded once every gated unit has been kept (graph._GATE_WAIT): at
        # depth dropout p = 0.75 the 5 warm-up steps were too few, and the "captured" profile
        # had timed eager steps. Run eager steps until the capture happens (or fails).
        for i in range(graph._GATE_WAIT + 10):
            if step.graph is not None or step.failed is not None:
                break
            step(*batches[i % len(batches)])
    r = _profile(step, batches, backend.cupy.cuda.Device().synchronize)
    if captured and (step.graph is None or step.failed is not None):
        r["error"] = f"not captured: {step.failed}"
    return r


def _torch(case):
    import torch
    tdt = torch.float32 if case.dtype == np.float32 else torch.bfloat16
    model = case.torch(torch).cuda().to(tdt)
    opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9)
    x = torch.randn(case.shape, device="cuda").to(tdt)
    y = torch.randint(0, case.classes, case.shape if case.tokens else case.shape[:1],
                      device="cuda")
    if case.tokens:
        x = torch.randint(0, case.classes, case.shape, device="cuda")

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        out = model(x)
        torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()
    return _profile(step, [(x, y)], torch.cuda.synchronize)


def main(prefixes, captured=False, sequence=False):
    cases = _cases() + [Case("resnet56-shortcuts", np.dtype(np.float32),
                             lambda: models.resnet56(in_channels=3, depth_dropout=1e-9), None,
                             (128, 3, 32, 32), 10)]
    cases = [c for c in cases if selected(c, prefixes)]
    results = []
    for case in cases:
        for lib, fn in (("cudrop", lambda c: _cudrop(c, captured)), ("torch", _torch)):
            if lib == "torch" and case.torch is None:
                continue
            try:
                r = {"case": case.name, "dtype": str(case.dtype), "lib": lib, **fn(case)}
            except Exception as e:  # noqa: BLE001 - record and go on
                r = {"case": case.name, "lib": lib, "error": f"{type(e).__name__}: {e}"}
            results.append(r)
            backend.cupy.get_default_memory_pool().free_all_blocks()
    write_json("profile_step.json", results)
    for r in results:
        print(f"\n== {r['case']} {r.get('dtype', '')} ({r['lib']}): ", end="")
        if "error" in r:
            print(r["error"])
            continue
        print(f"{r['kernel_us_per_step'] / 1e3:.2f} ms of kernels, "
              f"{r['launches_per_step']:.0f} launches a step")
        for k in r["kernels"][:TOP]:
            print(f"{k['us_per_step']:9.1f} us {k['launches_per_step']:6.0f}x  {k['kernel']}")
        if sequence:
            print("one step's kernels in order:")
            for name, us in r["sequence"]:
                print(f"{us:9.1f} us  {name}")


if __name__ == "__main__":
    flags = ("--captured", "--sequence")
    args = [a for a in sys.argv[1:] if a not in flags]
    main(args or ["resnet56"], captured="--captured" in sys.argv[1:],
         sequence="--sequence" in sys.argv[1:])
