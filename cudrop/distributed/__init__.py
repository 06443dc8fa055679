"""Data-parallel training over NCCL: one process per GPU, each on its part of every global
batch, gradients averaged by NCCL all-reduces through CuPy's bindings (``cupy.cuda.nccl``).

Start the processes with torchrun (``torchrun --nproc-per-node 2 -m cudrop train ...``),
``cudrop launch -n 2 -- train ...``, mpirun or srun; :func:`init` reads who this process is
from their variables (``cudrop.distributed.env``), meets the other ranks through a small TCP
rendezvous at ``MASTER_ADDR:MASTER_PORT`` (rank 0 hands out NCCL's unique id; nothing else
crosses TCP) and builds the communicator. In a training step, :class:`GradientReducer` averages
the gradients in ~25 MiB buckets, each started as soon as backward has finished its gradients,
on a side stream. :func:`cudrop.data.batches` with ``rank=`` and ``world_size=`` gives each rank
its slice of every global batch of the one-process epoch, and ``cudrop.nn.set_shard`` tells the
model's stochastic layers which rows they hold.

The mask rule across ranks. What decides the *structure* of a step is drawn from
(seed, layer, step) alone and so is the same on every rank: no rank skips work that another
rank does, and a dropped unit's parameters get no gradient anywhere (no rank waits for a
gradient another never computes). What is drawn *per row* is addressed by the row's index in
the global batch: rank ``r`` with ``m`` local rows draws rows ``r m .. r m + m - 1`` of the mask
one process would draw for the global batch, so the ranks' masks differ, are independent, and
stacked in rank order equal the one-process mask. Per variant:

==========================  ==================  ============================================
variant                     kind                across ranks
==========================  ==================  ============================================
SliceOut (slice start)      structural          same on every rank
depth dropout (gates)       structural          same on every rank
stochastic depth, batch     structural          same on every rank
gyro: sub-networks of a     structural          same on every rank; each row takes the slot
step                                            of its global row's group (the global batch's
                                                τ groups)
block-wise gyro             structural ids,     same sub-network set; row block ``R`` of the
                            per-row-block slot  global batch runs slot ``(step nRB + R) mod τ``
dropout (elements)          per element         the global batch's mask, elements
                                                ``r · local size ..`` (exact when the local
                                                size is a multiple of 4; else disjoint
                                                counters: independent, not the same bits)
SparseDrop (blocks)         per block           the global grid's row blocks ``r · nRB ..``
                                                (exact when the block height divides the
                                                local rows; else independent)
stochastic depth, sample    per sample          the global batch's gates; a rank that keeps
                                                none runs the branch on one sample scaled by
                                                0 when another rank keeps some
==========================  ==================  ============================================

With equal local batches (the sharded loader makes them equal) a run on ``W`` ranks with local
batch ``m`` therefore draws exactly the masks of one process with batch ``W m`` and, the
gradients being averaged, takes the same steps up to floating-point rounding. Models with
BatchNorm normalise over each rank's rows (no synchronised batch norm), so they match one
process only in distribution.

Checkpoints: :func:`save` (rank 0 writes atomically, every rank waits) and :func:`load`
(every rank reads); a resumed run draws the same masks on any number of ranks.
"""
from .env import LAUNCHERS, LaunchEnv, read_env
from .group import (DEFAULT_TIMEOUT, OPS, DistributedError, all_reduce, barrier, broadcast,
                    broadcast_parameters, destroy, heartbeat, init, is_initialized, load,
                    local_rank, rank, save, synchronize, world_size)
from .launch import launch
from .reducer import (DEFAULT_BUCKET_MB, Bucket, GradientReducer, all_reduce_gradients,
                      plan_buckets)
from .rendezvous import RendezvousError

__all__ = ["init", "destroy", "is_initialized", "rank", "world_size", "local_rank", "barrier",
           "all_reduce", "broadcast", "synchronize", "heartbeat", "broadcast_parameters", "save",
           "load", "DistributedError", "RendezvousError", "DEFAULT_TIMEOUT", "OPS",
           "LaunchEnv", "read_env", "LAUNCHERS", "GradientReducer", "all_reduce_gradients",
           "plan_buckets", "Bucket", "DEFAULT_BUCKET_MB", "launch"]
