"""Where a training step's device time goes: the CUDA kernels of a few eager steps, recorded by
PyTorch's profiler (CUPTI sees CuPy's and cuBLASLt's kernels as well as PyTorch's), summed per
kernel name and divided by the number of steps. Cases as in benchmarks/graph_step.py.

    PYTHONPATH=. python scripts/profile_step.py [mlp-bf16 mlp-fp32 resnet56 torch-mlp-bf16 ...]
"""
from __future__ import annotations

import collections
import sys

import numpy as np

import cudrop as cd
from cudrop import backend, models, optim

STEPS = 5


def _cudrop_step(case):
    import ml_dtypes
    cp = backend.cupy
    if case.startswith("mlp"):
        dtype = np.dtype(ml_dtypes.bfloat16) if case.endswith("bf16") else np.dtype(np.float32)
        kind = case.split("-")[1] if case.count("-") == 2 else "none"
        model = models.mlp((1024,), 10, hidden=(4096,) * 3, dropout=kind, p=0.5, seed=0)
        shape = (1024, 1024)
    else:
        dtype, model, shape = np.dtype(np.float32), models.resnet56(in_channels=3), (128, 3, 32, 32)
    model = model.to("gpu", dtype=dtype)
    opt = optim.SGD(model.parameters(), 0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
    y = cp.asarray(rng.integers(0, 10, shape[0]))

    def step():
        loss = cd.cross_entropy(model(cd.Tensor(x)), y)
        model.zero_grad()
        loss.backward()
        opt.step()
    return step


def _torch_step(case):
    import torch
    dt = torch.bfloat16 if case.endswith("bf16") else torch.float32
    layers, width = [], 1024
    for h in (4096,) * 3:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10)).cuda().to(dt)
    opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9)
    x = torch.randn(1024, 1024, device="cuda").to(dt)
    y = torch.randint(0, 10, (1024,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def profile(case):
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile
    step = _torch_step(case) if case.startswith("torch-") else _cudrop_step(case)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    backend.cupy.cuda.Device().synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        backend.cupy.cuda.Device().synchronize()
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name if len(ev.name) < 90 else ev.name[:87] + "..."
            per[name][0] += ev.device_time_total / STEPS / 1000.0
            per[name][1] += 1
    total = sum(v[0] for v in per.values())
    print(f"== {case}: {total:.3f} ms of kernels per step")
    for name, (ms, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:18]:
        print(f"  {ms:7.3f} ms  {n // STEPS:4d}x  {name}")


if __name__ == "__main__":
    for case in sys.argv[1:] or ["mlp-bf16", "torch-mlp-bf16", "mlp-fp32", "torch-mlp-fp32",
                                 "resnet56"]:
        profile(case)
