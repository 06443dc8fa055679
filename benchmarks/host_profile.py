"""Eager step time of small model builders on synthetic batches, on the CPU or the GPU, and
with ``--profile`` where the host time of an eager step goes (cProfile of ResNet-56 and GPT):
the tool for cutting Python cost per op. The step-time comparison with PyTorch, captured and
eager, is ``train_step.py``.

Usage: python benchmarks/host_profile.py [--device gpu|cpu] [--profile]
JSON to $OUT/host_profile.json; a table last.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import numpy as np

sys.path.insert(0, ".")
import cudrop as cd  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from cudrop import backend, models, optim  # noqa: E402

CASES = {  # name: (builder, input shape, classes or vocab)
    "mlp-1024": (lambda: models.mlp((1, 32, 32), 10, hidden=(1024, 1024), p=0.1), (256, 1, 32, 32), 10),
    "resnet20": (lambda: models.resnet20(in_channels=3), (128, 3, 32, 32), 10),
    "resnet56": (lambda: models.resnet56(in_channels=3), (128, 3, 32, 32), 10),
    "vit": (lambda: models.ViT(image_size=32, patch_size=4, in_channels=3, dim=192, depth=6,
                               heads=6), (128, 3, 32, 32), 10),
    "gpt": (lambda: models.GPT(96, block_size=128, dim=256, depth=4, heads=8), (32, 128), 96),
}


def step_fn(model, opt, x, y):
    def step():
        loss = cd.cross_entropy(model(x), y)
        model.zero_grad()
        loss.backward()
        opt.step()
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    device = backend.resolve_device(args.device)
    xp = backend.xp_for(device)
    rng = np.random.default_rng(0)
    rows, profiles = [], {}
    for name, (build, shape, classes) in CASES.items():
        model = build().to(device)
        opt = optim.SGD(model.parameters(), 0.01, momentum=0.9)
        if name == "gpt":
            x = xp.asarray(rng.integers(0, classes, shape))
            y = xp.asarray(rng.integers(0, classes, shape))
        else:
            x = cd.Tensor(xp.asarray(rng.standard_normal(shape, dtype=np.float32)))
            y = xp.asarray(rng.integers(0, classes, shape[0]))
        step = step_fn(model, opt, x, y)
        for _ in range(3):
            step()
        sync = (lambda: xp.cuda.Device().synchronize()) if xp is not np else (lambda: None)
        sync()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        rows.append(dict(model=name, batch=shape[0], device=device, params=model.num_parameters(),
                         step_ms=float(np.median(times) * 1e3)))
        if args.profile and name in ("resnet56", "gpt"):
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(5):
                step()
            sync()
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
            profiles[name] = s.getvalue()
    write_json("host_profile.json", dict(rows=rows, profiles=profiles))
    for name, text in profiles.items():
        print(f"--- host profile, {name}, 5 steps ---")
        print("\n".join(text.splitlines()[:30]))
    print(f"{'model':10s} {'batch':>5s} {'params':>10s} {'step ms':>9s}")
    for r in rows:
        print(f"{r['model']:10s} {r['batch']:5d} {r['params']:10,d} {r['step_ms']:9.2f}")


if __name__ == "__main__":
    main()
