"""One rank of tests/test_distributed.py's multi-process GPU tests, started by ``cudrop launch``
or with the launcher variables set by the test. Not collected by pytest.

    python tests/_dist_worker.py equiv KIND STEPS OUT   # the MLP on its shard; rank 0 writes
                                                        # the global losses as JSON to OUT
    python tests/_dist_worker.py die TIMEOUT            # rank 1 kills itself after 3 steps;
                                                        # rank 0 must be ended by the watchdog
"""
import json
import os
import signal
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cudrop  # noqa: E402
from cudrop import backend, distributed as dist, models, nn, optim  # noqa: E402

GLOBAL_BATCH, FEATURES, CLASSES = 256, 64, 10


def _setup(kind, timeout=60.0):
    env = dist.init(timeout=timeout)
    cp = backend.cupy
    model = models.mlp((FEATURES,), CLASSES, hidden=(256, 256), dropout=kind, p=0.3).to("gpu")
    nn.set_shard(model, env.rank, env.world_size)
    dist.broadcast_parameters(model)
    opt = optim.SGD(model.parameters(), 0.05, momentum=0.9)
    reducer = dist.GradientReducer(model.parameters())
    m = GLOBAL_BATCH // env.world_size
    rows = slice(env.rank * m, (env.rank + 1) * m)

    def batch(step):
        rng = np.random.default_rng([0, step])
        x = rng.standard_normal((GLOBAL_BATCH, FEATURES), dtype=np.float32)
        y = rng.integers(0, CLASSES, GLOBAL_BATCH)
        return cp.asarray(x[rows]), cp.asarray(y[rows])

    def step(i):
        x, y = batch(i)
        loss = cudrop.cross_entropy(model(cudrop.Tensor(x)), y)
        model.zero_grad()
        loss.backward()
        reducer.finish()
        opt.step()
        return loss

    return env, step


def equiv(kind, steps, out):
    env, step = _setup(kind)
    losses = []
    for i in range(int(steps)):
        loss = step(i).data.astype(np.float64).reshape(1)
        losses.append(dist.all_reduce(loss, "avg"))
    dist.synchronize("the run")
    if env.rank == 0:
        with open(out, "w") as f:
            json.dump([float(v.get()[0]) for v in losses], f)
    dist.destroy()


def die(timeout):
    env, step = _setup("dropout", float(timeout))
    for i in range(10 ** 6):
        if env.rank == 1 and i == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        float(step(i).data)  # a plain host read: only the watchdog can end this wait


if __name__ == "__main__":
    {"equiv": equiv, "die": die}[sys.argv[1]](*sys.argv[2:])
