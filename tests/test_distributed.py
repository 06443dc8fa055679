"""Data-parallel training (cudrop.distributed, issue 13).

CPU: the launchers' variables, the TCP rendezvous between two processes, ``cudrop launch``'s
failure propagation, the sharded loaders, the mask rule across ranks for every variant (NumPy),
the grad-ready hooks, the bucket layout, and the reducer with in-process communicators: two
ranks as two threads, whose training equals one process with the global batch.
GPU (marked ``gpu``; skipped without a GPU and NCCL): world size 1 through the whole path
(init, collectives, the reducer in an eager step and in a captured step), and with two GPUs a
2-rank run that equals the 1-GPU run and a dead rank that ends the other.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

import cudrop
from cudrop import backend, data, distributed as dist, models, nn, optim
from cudrop.distributed import group, rendezvous
from cudrop.distributed.launch import free_port
from cudrop.variants import gyro_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_dist_worker.py")
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "TORCHELASTIC_USE_AGENT_STORE")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ---- the launchers' variables --------------------------------------------------------------

@pytest.mark.parametrize("env, want", [
    ({}, (0, 1, 0, "none")),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0",
      "MASTER_PORT": "29500"}, (1, 4, 1, "torchrun")),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29500"},
     (3, 4, 1, "mpirun")),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "MASTER_ADDR": "h0",
      "MASTER_PORT": "1234"}, (2, 8, 2, "slurm")),
    # torchrun inside a Slurm allocation: torchrun's variables describe the job
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "RANK": "1",
      "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1"},
     (1, 2, 1, "torchrun")),
    ({"RANK": "0", "WORLD_SIZE": "1"}, (0, 1, 0, "torchrun")),  # world 1 needs nothing more
])
def test_read_env(env, want):
    e = dist.read_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == want
    if e.world_size > 1:
        assert e.master_addr == "h0" and isinstance(e.master_port, int)


def test_read_env_sees_torchruns_agent_store():
    e = dist.read_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                       "MASTER_PORT": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert e.agent_store and e.agent_run == "run/0"
    # the store key's run id and restart count come from the same environ, not os.environ
    e = dist.read_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                       "MASTER_PORT": "1", "TORCHELASTIC_USE_AGENT_STORE": "true",
                       "TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "2"})
    assert e.agent_store and e.agent_run == "job7/2"


_MASTER = {"MASTER_ADDR": "h0", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env, match", [
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", **_MASTER}, "RANK=2 is not below"),
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0", **_MASTER}, "RANK='x' is not an int"),
    ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({"RANK": "-1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", **_MASTER}, "RANK=-1 must be >= 0"),
    ({"RANK": "1", "WORLD_SIZE": "2", **_MASTER}, "LOCAL_RANK is not"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2", **_MASTER}, "LOCAL_RANK=2 is not below"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "1"},
     "MASTER_ADDR is not set"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h"},
     "MASTER_PORT is not set"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
      "MASTER_PORT": "70000"}, "not a TCP port"),
    ({"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "4",
      "OMPI_COMM_WORLD_LOCAL_RANK": "0", **_MASTER}, "OMPI_COMM_WORLD_RANK=4 is not below"),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, "mpirun -x MASTER_ADDR"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_LOCALID is not"),
])
def test_read_env_errors_name_the_variable(env, match):
    with pytest.raises(ValueError, match=match):
        dist.read_env(env)


def test_before_init_rank_and_world_come_from_the_launcher(monkeypatch):
    for k in _LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    assert (dist.rank(), dist.world_size(), dist.local_rank()) == (0, 1, 0)
    assert not dist.is_initialized()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "h")
    monkeypatch.setenv("MASTER_PORT", "5")
    assert (dist.rank(), dist.world_size(), dist.local_rank()) == (1, 3, 1)


def test_init_errors_are_clear():
    with pytest.raises(ValueError, match="backend must be 'nccl'"):
        dist.init("gloo")
    with pytest.raises(RuntimeError, match="not initialized: call cudrop.distributed.init"):
        dist.barrier()
    if not backend.nccl_available():
        with pytest.raises(RuntimeError, match="NCCL|CuPy|GPU"):
            dist.init(environ={})


# ---- rendezvous and launch: real processes on this host --------------------------------------

_RV_CHILD = textwrap.dedent("""
    import sys
    from cudrop.distributed import read_env
    from cudrop.distributed.rendezvous import exchange
    env = read_env()
    got = exchange(env, b"fake-nccl-id" + bytes(range(116)) if env.rank == 0 else None, 30)
    sys.stdout.write(f"RANK {env.rank} {got.hex()}\\n")
    sys.stdout.flush()
""")


def test_rendezvous_hands_rank_0s_id_to_another_process(tmp_path):
    script = tmp_path / "rv.py"
    script.write_text(_RV_CHILD)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=_clean_env(RANK=r, WORLD_SIZE=2, LOCAL_RANK=r,
                                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in (1, 0)]  # the client first: it must retry until rank 0 listens
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    want = (b"fake-nccl-id" + bytes(range(116))).hex()
    assert all(o.split()[-1] == want for o in outs)


def test_rendezvous_names_the_missing_rank():
    env = dist.LaunchEnv(0, 3, 0, "127.0.0.1", free_port(), "torchrun")
    t0 = time.monotonic()
    with pytest.raises(rendezvous.RendezvousError, match=r"ranks \[1, 2\] did not reach"):
        rendezvous.exchange(env, b"x", timeout=1.0)
    assert time.monotonic() - t0 < 10


def test_rendezvous_client_gives_up_at_the_deadline():
    env = dist.LaunchEnv(1, 2, 1, "127.0.0.1", free_port(), "torchrun")
    with pytest.raises(rendezvous.RendezvousError, match="could not reach rank 0"):
        rendezvous.exchange(env, None, timeout=0.5)


def _launch(n, args, timeout=60, **extra):
    return subprocess.run([sys.executable, "-m", "cudrop", "launch", "-n", str(n), "--"] + args,
                          capture_output=True, text=True, timeout=timeout,
                          env=_clean_env(**extra), cwd=ROOT)


_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    r, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    sys.stdout.write(f"rank {r} of {n} local {os.environ['LOCAL_RANK']} at "
                     f"{os.environ['MASTER_ADDR']} {os.environ['MASTER_PORT']}\\n")  # one write
    sys.stdout.flush()
    mode = sys.argv[1]
    if mode == "fail" and r == 1:
        time.sleep(0.5)
        sys.exit(3)
    if mode == "kill" and r == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    if mode != "ok":
        time.sleep(120)  # the others: stopped by the launcher long before this
""")


def test_launch_sets_the_variables_and_succeeds(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    r = _launch(3, [str(script), "ok"])
    assert r.returncode == 0, r.stderr
    lines = sorted(line for line in r.stdout.splitlines() if line.startswith("rank"))
    assert [line.split()[:6] for line in lines] == [
        ["rank", str(i), "of", "3", "local", str(i)] for i in range(3)]
    assert len({line.split()[-1] for line in lines}) == 1  # one MASTER_PORT


@pytest.mark.parametrize("mode, status, says", [("fail", 3, "rank 1 (pid"),
                                                ("kill", 128 + 9, "killed by SIGKILL")])
def test_launch_stops_the_others_when_a_rank_fails(tmp_path, mode, status, says):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    t0 = time.monotonic()
    r = _launch(3, [str(script), mode])
    assert time.monotonic() - t0 < 60  # not the children's 120 s
    assert r.returncode == status
    assert says in r.stderr and "stopping the other 2 rank(s)" in r.stderr


def test_launch_forwards_sigterm(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    p = subprocess.Popen([sys.executable, "-m", "cudrop", "launch", "-n", "2", "--",
                          str(script), "wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=_clean_env(), cwd=ROOT)
    # Signal once both ranks have written their line: the launcher installs its handlers before
    # it starts them (a fixed 2 s sleep raced the launcher's import on a loaded GPU machine,
    # which then died of the signal itself: status -15).
    guard = threading.Timer(60, p.kill)
    guard.start()
    started = [p.stdout.readline() for _ in range(2)]
    guard.cancel()
    assert all(line.startswith("rank ") for line in started), started
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err


def test_launch_usage_errors():
    r = _launch(2, [])
    assert r.returncode == 2 and "give the command" in r.stderr
    r = subprocess.run([sys.executable, "-m", "cudrop", "launch", "-n", "0", "--", "x.py"],
                       capture_output=True, text=True, env=_clean_env(), cwd=ROOT)
    assert r.returncode == 2 and "-n must be a positive int" in r.stderr


def test_train_refuses_cpu_for_several_ranks():
    r = subprocess.run([sys.executable, "-m", "cudrop", "train", "--device", "cpu",
                        "--epochs", "1"], capture_output=True, text=True, cwd=ROOT,
                       env=_clean_env(RANK=0, WORLD_SIZE=2, LOCAL_RANK=0,
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=1))
    assert r.returncode == 2 and "data-parallel training runs over NCCL" in r.stderr
    r = subprocess.run([sys.executable, "-m", "cudrop", "train", "--epochs", "1"],
                       capture_output=True, text=True, cwd=ROOT,
                       env=_clean_env(RANK=3, WORLD_SIZE=2))
    assert r.returncode == 2 and "RANK=3 is not below WORLD_SIZE=2" in r.stderr


# ---- sharded loading ----------------------------------------------------------------------------

@pytest.mark.parametrize("n, batch, world, drop_last", [(23, 6, 3, False), (24, 6, 2, False),
                                                        (23, 6, 3, True), (10, 8, 4, False)])
def test_sharded_batches_split_every_global_batch(n, batch, world, drop_last):
    x = np.arange(n)
    kw = dict(batch_size=batch, seed=1, epoch=2, drop_last=drop_last)
    whole = [b for b, _ in data.batches(x, **kw)]
    ranks = [[b for b, _ in data.batches(x, rank=r, world_size=world, **kw)] for r in range(world)]
    steps = data.num_batches(n, batch, drop_last, world)
    assert all(len(rb) == steps for rb in ranks)
    seen = []
    for i in range(steps):
        parts = [rb[i] for rb in ranks]
        assert len({len(p) for p in parts}) == 1  # every rank holds as many rows
        joined = np.concatenate(parts)
        # rank batches concatenated in rank order: the one-process batch (a short last batch
        # cut to a multiple of the world size)
        np.testing.assert_array_equal(joined, whole[i][:len(joined)])
        seen.extend(joined)
    assert len(seen) == len(set(seen))  # disjoint
    left_out = sum(len(b) for b in whole) - len(seen)
    assert left_out < world  # the union is the epoch, but for fewer than world_size samples
    if n % batch == 0 or drop_last:
        assert left_out == 0


def test_sharded_batches_resume_mid_epoch():
    x = np.arange(40)
    full = [b for b, _ in data.batches(x, batch_size=8, rank=1, world_size=2, epoch=3)]
    late = [b for b, _ in data.batches(x, batch_size=8, rank=1, world_size=2, epoch=3, start=2)]
    for a, b in zip(full[2:], late):
        np.testing.assert_array_equal(a, b)


def test_sharded_text_batches():
    tokens = np.arange(1000) % 97
    kw = dict(block_size=8, batch_size=6, steps=3, seed=4)
    whole = list(data.text_batches(tokens, **kw))
    ranks = [list(data.text_batches(tokens, rank=r, world_size=3, **kw)) for r in range(3)]
    for i in range(3):
        np.testing.assert_array_equal(np.concatenate([rb[i][0] for rb in ranks]), whole[i][0])
        np.testing.assert_array_equal(np.concatenate([rb[i][1] for rb in ranks]), whole[i][1])


def test_shard_errors():
    with pytest.raises(ValueError, match="not a multiple of world_size"):
        list(data.batches(np.arange(10), batch_size=5, rank=0, world_size=2))
    with pytest.raises(ValueError, match="rank 2 is not below world_size 2"):
        list(data.batches(np.arange(10), batch_size=4, rank=2, world_size=2))


# ---- the mask rule across ranks (NumPy) -------------------------------------------------------

def _rank_outputs(make, x, world, train=True):
    """The layer's output on the global batch (one process) and on each rank's rows."""
    ref = make()
    ref.train(train)
    whole = ref(cudrop.Tensor(x)).data
    m = len(x) // world
    parts = []
    for r in range(world):
        layer = nn.set_shard(make(), r, world)
        layer.train(train)
        parts.append(layer(cudrop.Tensor(x[r * m:(r + 1) * m])).data)
    return whole, parts


_PER_ROW = {
    "dropout": lambda: nn.Dropout(0.4, seed=3, layer=2),
    "sparsedrop": lambda: nn.SparseDrop(0.5, block=(4, 8), seed=3, layer=1),
    "blockwise": lambda: nn.BlockwiseDropout(0.5, num_subnets=16, co_scheduled=4, block=(4, 8),
                                             period=2, seed=5),
    "gyro": lambda: nn.GyroDropout(0.5, num_subnets=16, co_scheduled=4, period=2, seed=5),
    "gyro-random": lambda: nn.GyroDropout(0.5, num_subnets=16, co_scheduled=4,
                                          schedule="random", seed=5),
    "stochastic-depth-sample": lambda: nn.StochasticDepth(
        nn.Linear(24, 24, rng=np.random.default_rng(0), dtype=np.float64), p=0.5,
        mode="sample", seed=7),
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", sorted(_PER_ROW))
def test_per_row_masks_of_the_ranks_stack_to_the_global_batch_mask(kind, world):
    """Element and block masks, gyro row groups and per-sample gates: rank r's output is rows
    r m .. r m + m - 1 of one process's output on the global batch, at several steps."""
    x = np.random.default_rng(1).standard_normal((32, 24)) + 3.0  # no zeros: masks show
    make = _PER_ROW[kind]
    layers = [make()] + [nn.set_shard(make(), r, world) for r in range(world)]
    m = len(x) // world
    for step in range(4):
        whole = layers[0](cudrop.Tensor(x)).data
        parts = [layers[1 + r](cudrop.Tensor(x[r * m:(r + 1) * m])).data for r in range(world)]
        np.testing.assert_array_equal(np.concatenate(parts), whole, err_msg=f"step {step}")
        if kind in ("dropout", "sparsedrop"):  # the ranks' masks differ (independent draws)
            assert not all(np.array_equal(parts[0] != 0, p != 0) for p in parts[1:])


def test_stochastic_depth_rank_without_kept_samples_still_reaches_the_body():
    """A rank that keeps none of its samples while another keeps some runs the body on one
    sample scaled by 0, so both ranks' body parameters get gradients (zeros here)."""
    unit = nn.StochasticDepth(nn.Linear(4, 4, rng=np.random.default_rng(0)), p=0.9,
                              mode="sample", seed=0)
    world, m = 2, 2
    for step in range(200):
        keep = unit.keep_samples(step, world * m)
        if keep.any() and not keep[:m].any():
            break
    else:
        pytest.skip("no such step among the first 200")
    nn.set_step(unit, step)
    nn.set_shard(unit, 0, world)
    x = cudrop.Tensor(np.ones((m, 4), np.float32))
    out = unit(x)
    np.testing.assert_array_equal(out.data, x.data)  # nothing added: scale 0
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in unit.body.parameters())


@pytest.mark.parametrize("world", [2, 3])
def test_structural_decisions_are_the_same_on_every_rank(world):
    x = np.ones((12, 64), np.float32)
    for step in range(3):
        # SliceOut: the same slice
        masks = []
        for r in range(world):
            layer = nn.set_shard(nn.SliceOutLinear(64, 8, 0.5, seed=2), r, world)
            nn.set_step(layer, step)
            layer(cudrop.Tensor(x))
            masks.append(layer.last_mask)
        assert all(mk == masks[0] for mk in masks)
        # depth dropout and batch-mode stochastic depth: the same gates
        for cls in (nn.DepthDropout, nn.StochasticDepth):
            gates = [nn.set_shard(cls(nn.Linear(4, 4), p=0.5, seed=3, layer=5), r, world)
                     .keep_gate(step) for r in range(world)]
            assert len(set(gates)) == 1
        # gyro: the same sub-networks scheduled, and the same unit masks for them
        kw = dict(num_subnets=16, co_scheduled=4, period=1, seed=9)
        gy = []
        for r in range(world):
            layer = nn.set_shard(nn.GyroDropout(0.5, **kw), r, world)
            nn.set_step(layer, step)
            layer(cudrop.Tensor(np.ones((world * 4, 8), np.float32)))
            gy.append(layer.last_mask)
        assert all(g.subnets == gy[0].subnets for g in gy)
        assert all(np.array_equal(g.keep, gy[0].keep) for g in gy)


def test_blockwise_row_block_slots_follow_the_global_batch():
    ids = np.arange(100, 108)
    whole = gyro_schedule.row_block_subnets(5, 6, ids)
    parts = [gyro_schedule.row_block_subnets(5, 2, ids, offset=2 * r, total=6) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_mask_offsets_reach_the_draws():
    from cudrop import masks, philox
    from cudrop.variants import dropout as vd
    full = masks.element_mask(64, 0.5, seed=1, layer=2, step=3).to_dense()
    part = masks.element_mask(24, 0.5, seed=1, layer=2, step=3, offset=40).to_dense()
    np.testing.assert_array_equal(part, full[40:])
    words = philox.grid_words(1, 2, 3, 0, 2, 50)
    np.testing.assert_array_equal(philox.grid_words(1, 2, 3, 0, 2, 47, col_offset=3), words[:, 3:])
    np.testing.assert_array_equal(philox.uniform(1, 2, 3, 4, 5, 30), philox.uniform(1, 2, 3, 4, 40)[30:35])
    with pytest.raises(ValueError, match="multiple of 4"):
        vd.dropout(np.ones(8), 0.5, seed=0, step=0, offset=2)
    with pytest.raises(ValueError, match="exceed"):
        masks.element_mask(8, 0.5, seed=0, layer=0, step=0, offset=2 ** 34)


# ---- grad-ready hooks (the autograd hook point) ------------------------------------------------

def test_grad_ready_hook_fires_once_when_the_gradient_is_final():
    w = cudrop.Tensor(np.ones((3, 3)), requires_grad=True)
    b = cudrop.Tensor(np.ones(3), requires_grad=True)
    unused = cudrop.Tensor(np.ones(3), requires_grad=True)
    seen = []
    for name, t in (("w", w), ("b", b), ("unused", unused)):
        t.register_grad_ready_hook(lambda t, name=name: seen.append((name, t.grad.copy())))
    x = cudrop.Tensor(np.arange(6.0).reshape(2, 3))
    ((x @ w + b) @ w).sum().backward()  # w is used twice: one call, with the summed gradient
    assert [n for n, _ in seen] == ["b", "w"]
    np.testing.assert_array_equal(seen[1][1], w.grad)
    np.testing.assert_array_equal(seen[0][1], b.grad)


def test_grad_ready_hook_of_a_root_leaf_and_removal():
    t = cudrop.Tensor(np.ones(1), requires_grad=True)
    calls = []
    h = t.register_grad_ready_hook(calls.append)
    t.backward()
    assert calls == [t]
    h.remove()
    h.remove()  # twice: nothing
    t.backward()
    assert calls == [t]
    with pytest.raises(TypeError, match="callable"):
        t.register_grad_ready_hook(3)


def test_grad_ready_hook_fires_before_backward_ends():
    """The hook of the last layer's weight runs while earlier layers are still ahead."""
    rng = np.random.default_rng(0)
    l1, l2 = nn.Linear(4, 4, rng=rng), nn.Linear(4, 2, rng=rng)
    order = []
    l2.weight.register_grad_ready_hook(lambda t: order.append(("l2", l1.weight.grad is None)))
    l1.weight.register_grad_ready_hook(lambda t: order.append(("l1", True)))
    l2(l1(cudrop.Tensor(rng.standard_normal((3, 4), np.float32)))).sum().backward()
    assert order == [("l2", True), ("l1", True)]  # l1's gradient did not exist yet


# ---- bucketing ---------------------------------------------------------------------------------

def _tensors(*specs):
    return [cudrop.Tensor(np.zeros(n, dt), requires_grad=True) for n, dt in specs]


def test_bucket_layout():
    mib = 2 ** 20 // 4  # float32 elements per MiB
    ps = _tensors((mib, np.float32), (10, np.float32), (3 * mib, np.float32), (5, np.float64),
                  (mib // 2, np.float32), (7, np.float32))
    buckets = dist.plan_buckets(ps, bucket_mb=2)
    # reverse order, one dtype per bucket, closed before going past 2 MiB, a 3 MiB parameter
    # alone; the buckets left open at the end in the order they were opened
    assert [(np.dtype(b.dtype).name, b.params) for b in buckets] == [
        ("float32", (5, 4)), ("float32", (2,)), ("float64", (3,)), ("float32", (1, 0))]
    for b in buckets:
        ends = [o + ps[i].data.size for i, o in zip(b.params, b.offsets)]
        assert all(o % (256 // np.dtype(b.dtype).itemsize) == 0 for o in b.offsets)  # aligned
        assert all(e <= o2 for e, o2 in zip(ends, b.offsets[1:]))  # no overlap
        assert b.size == ends[-1]
    assert dist.plan_buckets(ps) == dist.plan_buckets(list(ps))  # a pure function
    assert len(dist.plan_buckets(ps)) == 2  # 25 MiB: one bucket per dtype
    with pytest.raises(ValueError, match="bucket_mb"):
        dist.plan_buckets(ps, 0)


class _Recorder:
    """A world of one that records the all-reduces (the buffers as they went in)."""

    def __init__(self):
        self.calls = []

    def all_reduce(self, array, op, stream=None):
        self.calls.append((array, array.copy(), op))


def _mlp(seed=0, kind="dropout", p=0.3):
    return models.mlp((16,), 5, hidden=(32, 32), dropout=kind, p=p, seed=seed,
                      dtype=np.float64)


def test_reducer_buckets_views_and_order():
    model = _mlp()
    comm = _Recorder()
    red = dist.GradientReducer(model.parameters(), bucket_mb=0.004, comm=comm)
    assert len(red.buckets) > 2
    x = cudrop.Tensor(np.random.default_rng(0).standard_normal((8, 16)))
    y = np.arange(8) % 5
    plain = _mlp()
    loss = cudrop.cross_entropy(plain(x), y)
    loss.backward()
    loss = cudrop.cross_entropy(model(x), y)
    loss.backward()
    assert len(comm.calls) >= 1  # some buckets started during backward
    red.finish()
    assert [c[0] is f for c, f in zip(comm.calls, red.flat)] == [True] * len(red.flat)
    for p, q in zip(model.parameters(), plain.parameters()):
        np.testing.assert_array_equal(p.grad, q.grad)
        assert np.shares_memory(p.grad, red.flat[red.where[red.index[id(p)]][0]])
    with pytest.raises(RuntimeError, match="second backward"):
        cudrop.cross_entropy(model(x), y).backward()
        cudrop.cross_entropy(model(x), y).backward()
    red.close()


def test_reducer_unreached_parameters_keep_no_gradient():
    rng = np.random.default_rng(0)
    body = nn.Linear(6, 6, rng=rng, dtype=np.float64)
    unit = nn.DepthDropout(body, nn.Linear(6, 6, rng=rng, dtype=np.float64), p=0.5, seed=0)
    model = nn.Sequential(unit, nn.Linear(6, 3, rng=rng, dtype=np.float64))
    comm = _Recorder()
    red = dist.GradientReducer(model.parameters(), comm=comm)
    step = next(s for s in range(100) if not unit.keep_gate(s))
    nn.set_step(model, step)
    cudrop.cross_entropy(model(cudrop.Tensor(rng.standard_normal((4, 6)))), np.arange(4) % 3).backward()
    red.finish()
    assert body.weight.grad is None and body.bias.grad is None  # as on one process
    i = red.index[id(body.weight)]
    k, view = red.where[i]
    off = red.buckets[k].offsets[red.buckets[k].params.index(i)]
    went_in = next(c[1] for c in comm.calls if c[0] is red.flat[k])
    assert not went_in[off:off + view.size].any()  # zeros went into the all-reduce
    assert all(p.grad is not None for p in model.parameters() if p not in (body.weight, body.bias))


def test_all_reduce_gradients_keeps_the_layout_fixed():
    a, b = _tensors((3, np.float64), (2, np.float64))
    a.grad = np.array([1.0, 2.0, 3.0])
    comm = _Recorder()
    dist.all_reduce_gradients([a, b], comm=comm)
    assert len(comm.calls) == 1
    np.testing.assert_array_equal(comm.calls[0][1], [1, 2, 3, 0, 0])
    assert b.grad is None and np.shares_memory(a.grad, comm.calls[0][0])


class _ThreadWorld:
    """Ranks as threads: an all-reduce that really averages their buffers."""

    def __init__(self, world):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots = [None] * world

    def comm(self, rank):
        outer = self

        class Comm:
            def all_reduce(self, array, op, stream=None):
                outer.slots[rank] = array.copy()
                outer.barrier.wait()
                total = sum(outer.slots)  # rank order on every rank: identical results
                outer.barrier.wait()
                array[...] = total / outer.world if op == "avg" else total
        return Comm()


def _dropped(kind, i, o, seed):
    kw = dict(dtype=np.float64, rng=np.random.default_rng(seed))
    if kind == "sparsedrop":  # blocks whose height divides a rank's rows: the exact case
        return nn.SparseDropLinear(i, o, 0.4, block=(4, 8), **kw)
    if kind == "blockwise":
        return nn.BlockwiseLinear(i, o, 0.4, block=(4, 8), num_subnets=16, co_scheduled=4,
                                  period=2, **kw)
    return nn.dropped_linear(kind, i, o, 0.4, **kw)


def _train(kind, world, rank, comm, steps=6, global_batch=16):
    model = nn.set_shard(nn.number_layers(nn.Sequential(
        nn.Flatten(), nn.Linear(16, 32, dtype=np.float64, rng=np.random.default_rng(1)),
        nn.ReLU(), _dropped(kind, 32, 32, 2), nn.ReLU(), _dropped(kind, 32, 5, 3)), 1),
        rank, world)
    opt = optim.SGD(model.parameters(), 0.1, momentum=0.9)
    red = dist.GradientReducer(model.parameters(), comm=comm, bucket_mb=0.004) if comm else None
    rng = np.random.default_rng(7)
    xs = rng.standard_normal((steps, global_batch, 16))
    ys = rng.integers(0, 5, (steps, global_batch))
    m = global_batch // world
    losses = []
    for i in range(steps):
        rows = slice(rank * m, (rank + 1) * m)
        loss = cudrop.cross_entropy(model(cudrop.Tensor(xs[i, rows])), ys[i, rows])
        model.zero_grad()
        loss.backward()
        if red is not None:
            red.finish()
        opt.step()
        losses.append(float(loss.data))
    return losses, model


@pytest.mark.parametrize("kind", ["dropout", "sparsedrop", "gyro", "blockwise", "sliceout"])
def test_two_ranks_train_as_one_process_with_the_global_batch(kind):
    """Two ranks (threads) with the reducer take the steps of one process with the global
    batch: the same masks, averaged gradients, the same weights."""
    ref_losses, ref = _train(kind, 1, 0, None)
    world = _ThreadWorld(2)
    results = [None, None]

    def run(r):
        results[r] = _train(kind, 2, r, world.comm(r))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0] is not None and results[1] is not None
    mean = np.mean([results[0][0], results[1][0]], axis=0)
    np.testing.assert_allclose(mean, ref_losses, rtol=1e-10)
    for (_, m0), (_, m1) in [(results[0], results[1])]:
        for p, q, r_ in zip(m0.parameters(), m1.parameters(), ref.parameters()):
            np.testing.assert_array_equal(p.data, q.data)  # the ranks agree exactly
            np.testing.assert_allclose(p.data, r_.data, rtol=1e-9, atol=1e-12)


# ---- the watchdog (with a stand-in group) ------------------------------------------------------

class _FakeComm:
    def __init__(self):
        self.error, self.aborted = None, False

    def check_async_error(self):
        if self.error:
            raise RuntimeError(self.error)

    def abort(self):
        self.aborted = True


def _fake_group(timeout):
    g = group._Group.__new__(group._Group)
    g.env, g.timeout, g.comm, g.device = dist.LaunchEnv(1, 2, 1, "h", 1, "torchrun"), timeout, \
        _FakeComm(), 0
    return g


def test_watchdog_reasons():
    g = _fake_group(0.2)
    wd = group._Watchdog(g, on_fail=None)
    done = []
    wd.watch(lambda: True, "finished work")
    wd.watch(lambda: bool(done), "a bucket's all_reduce")
    assert wd.check() is None
    time.sleep(0.3)
    assert "a bucket's all_reduce did not finish within 0 s" in wd.check()
    done.append(1)
    assert wd.check() is None and not wd.items
    g.comm.error = "NCCL_ERROR_REMOTE_ERROR: a peer went away"
    assert "NCCL reported an error: NCCL_ERROR_REMOTE_ERROR" in wd.check()


def test_watchdog_thread_calls_on_fail_once():
    g = _fake_group(0.1)
    failures = []
    wd = group._Watchdog(g, on_fail=lambda grp, why: failures.append(why), poll=0.02)
    wd.watch(lambda: False, "joining the NCCL communicator")
    wd.start()
    wd.join(timeout=5)
    assert len(failures) == 1 and "joining the NCCL communicator" in failures[0]


# ---- GPU: world size 1 through the whole path ---------------------------------------------------

_nccl = pytest.mark.skipif(not backend.nccl_available(), reason="no GPU with NCCL")


@pytest.fixture
def world1(monkeypatch):
    for k in _LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    env = dist.init(timeout=60)
    yield env
    dist.destroy()


@pytest.mark.gpu
@_nccl
@pytest.mark.usefixtures("world1")
def test_world1_collectives():
    cp = backend.cupy
    assert dist.is_initialized() and (dist.rank(), dist.world_size()) == (0, 1)
    a = cp.arange(10, dtype=cp.float32)
    dist.all_reduce(a, "avg")
    dist.all_reduce(a, "sum")
    dist.broadcast(a, 0)
    dist.barrier()
    np.testing.assert_array_equal(a.get(), np.arange(10))
    try:
        import ml_dtypes
        b = cp.ones(8, dtype=ml_dtypes.bfloat16)
        dist.all_reduce(b, "avg")
        dist.synchronize()
        assert float(b.astype(cp.float32).sum().get()) == 8.0
    except TypeError as e:  # an old NCCL: a clear error instead
        assert "bfloat16" in str(e)
    with pytest.raises(TypeError, match="CuPy array"):
        dist.all_reduce(np.ones(3))


def _gpu_run(kind, steps, reducer, captured=False):
    cp = backend.cupy
    model = models.mlp((64,), 10, hidden=(256, 256), dropout=kind, p=0.3).to("gpu")
    opt = optim.SGD(model.parameters(), 0.05, momentum=0.9)
    red = dist.GradientReducer(model.parameters(), bucket_mb=0.1) if reducer else None
    rng = np.random.default_rng(0)
    batches = [(cp.asarray(rng.standard_normal((256, 64), dtype=np.float32)),
                cp.asarray(rng.integers(0, 10, 256))) for _ in range(steps)]

    def step(x, y):
        loss = cudrop.cross_entropy(model(cudrop.Tensor(x)), y)
        model.zero_grad()
        loss.backward()
        if red is not None:
            red.finish()
        opt.step()
        return loss

    from cudrop import graph
    run = graph.capture(step, model=model, optimizer=opt) if captured else step
    losses = [float(run(x, y).data) for x, y in batches]
    return losses, model, run


@pytest.mark.parametrize("kind", ["none", "dropout", "sparsedrop"])
@pytest.mark.gpu
@_nccl
@pytest.mark.usefixtures("world1")
def test_world1_reducer_steps_equal_plain_steps(kind):
    ref, ref_model, _ = _gpu_run(kind, 6, False)
    got, model, _ = _gpu_run(kind, 6, True)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        np.testing.assert_allclose(p.data.get(), q.data.get(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["none", "dropout", "sparsedrop"])
@pytest.mark.gpu
@_nccl
@pytest.mark.usefixtures("world1")
def test_world1_reducer_inside_a_captured_step(kind):
    from cudrop.functional import _gemm
    if not _gemm.available():
        pytest.skip("nvmath-python (capturable GEMMs) not installed")
    ref, _, _ = _gpu_run(kind, 8, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to eager would warn
        got, _, run = _gpu_run(kind, 8, True, captured=True)
    assert run.graph is not None and run.failed is None
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


# ---- GPU: two ranks -----------------------------------------------------------------------------

_two_gpus = pytest.mark.skipif(backend.gpu_count() < 2 or not backend.nccl_available(),
                               reason="needs 2 GPUs with NCCL")


@pytest.mark.gpu
@_two_gpus
@pytest.mark.parametrize("kind", ["dropout", "sparsedrop"])
def test_two_ranks_equal_one_gpu_with_the_global_batch(tmp_path, kind):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    r = subprocess.run([sys.executable, WORKER, "equiv", kind, "50", str(one)],
                       capture_output=True, text=True, timeout=300, env=_clean_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _launch(2, [WORKER, "equiv", kind, "50", str(two)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(json.loads(two.read_text()), json.loads(one.read_text()),
                               rtol=2e-4, atol=1e-5)


@pytest.mark.gpu
@_two_gpus
def test_a_dead_rank_ends_the_other_with_an_error():
    port = free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, "die", "20"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=_clean_env(RANK=r, WORLD_SIZE=2, LOCAL_RANK=r,
                                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    t0 = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].wait() == -signal.SIGKILL
    assert procs[0].returncode == 1, err[-3000:]
    assert "cudrop.distributed: rank 0:" in err and "aborting the NCCL communicator" in err
    assert time.monotonic() - t0 < 90
