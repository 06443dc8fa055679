"""The NumPy reference path's random draws against NumPy's own Generator (issue 9: Philox on
NumPy within 3x of the Generator for the same number of draws, so that dropout is never the
bottleneck of a CPU step). CPU only; JSON to $OUT/cpu_philox.json (or stdout)."""
from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np

from cudrop import philox
from cudrop.variants import dropout as D


def _ms(fn, reps=15):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    rows = []
    rng = np.random.default_rng(0)
    for shape in ((8192, 256), (1024, 4096)):
        n = shape[0] * shape[1]
        x = rng.random(shape, dtype=np.float32)
        draws = _ms(lambda: philox.grid_words(1, 2, 3, philox.TAG_ELEMENT, 1, n))
        gen_draws = _ms(lambda: rng.integers(0, 2 ** 32, n, dtype=np.uint32))
        drop = _ms(lambda: D.dropout(x, 0.5, seed=1, layer=0, step=3))
        gen_drop = _ms(lambda: np.where(rng.random(shape, dtype=np.float32) >= 0.5,
                                        x * np.float32(2), np.float32(0)))
        rows.append(dict(shape=shape, philox_ms=draws, generator_ms=gen_draws,
                         draws_ratio=draws / gen_draws, dropout_ms=drop,
                         generator_dropout_ms=gen_drop, dropout_ratio=drop / gen_drop,
                         target_draws_ratio=3.0))
        print(f"{shape}: philox {draws:.1f} ms vs Generator {gen_draws:.1f} ms "
              f"({draws / gen_draws:.2f}x, target <= 3x); dropout {drop:.1f} ms vs "
              f"Generator dropout {gen_drop:.1f} ms ({drop / gen_drop:.2f}x)")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "cpu_philox.json"), "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
