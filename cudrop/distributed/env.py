"""Who this process is in a data-parallel job: the variables that launchers set.

=============================  ===================  ======================  ===================
launcher                       rank                 world size              local rank (GPU)
=============================  ===================  ======================  ===================
torchrun, ``cudrop launch``    ``RANK``             ``WORLD_SIZE``          ``LOCAL_RANK``
mpirun (Open MPI)              ``OMPI_COMM_WORLD_   ``OMPI_COMM_WORLD_      ``OMPI_COMM_WORLD_
                               RANK``               SIZE``                  LOCAL_RANK``
Slurm (``srun``)               ``SLURM_PROCID``     ``SLURM_NTASKS``        ``SLURM_LOCALID``
=============================  ===================  ======================  ===================

The first launcher in this order whose variables are present wins (torchrun inside a Slurm
allocation sets ``RANK`` and friends, which then describe the job). Every rank also needs
``MASTER_ADDR`` and ``MASTER_PORT``, where rank 0 serves the rendezvous (torchrun and
``cudrop launch`` set them; with mpirun pass ``-x MASTER_ADDR=... -x MASTER_PORT=...``, under
Slurm export them from the first node's name). No variable at all means one process: world size
1, rank 0.
"""
from __future__ import annotations

import os
from typing import NamedTuple

__all__ = ["LaunchEnv", "read_env", "LAUNCHERS"]

#: Launcher name -> the (rank, world size, local rank) variables it sets, in order of priority.
LAUNCHERS = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    "mpirun": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
}


class LaunchEnv(NamedTuple):
    """This process's place in the job, read from the environment by :func:`read_env`.
    ``launcher``: which variables described it ('torchrun', 'mpirun', 'slurm', or 'none' for a
    single process); ``agent_store``: torchrun's agent already serves a key-value store on
    ``MASTER_ADDR:MASTER_PORT`` (``TORCHELASTIC_USE_AGENT_STORE``), which the rendezvous then
    uses instead of opening that port itself, under a key named by ``agent_run``: torchrun's
    run id and restart count (``TORCHELASTIC_RUN_ID``, ``TORCHELASTIC_RESTART_COUNT``)."""
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    launcher: str
    agent_store: bool = False
    agent_run: str = "run/0"


def _int(environ, name, low, why):
    raw = environ[name]
    try:
        v = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer ({why})") from None
    if v < low:
        raise ValueError(f"{name}={v} must be >= {low} ({why})")
    return v


def read_env(environ=None) -> LaunchEnv:
    """The :class:`LaunchEnv` of this process from ``environ`` (default ``os.environ``);
    ValueError naming the variable when one is missing, not an integer, or inconsistent
    (a rank not below the world size, a world size given without a rank)."""
    environ = os.environ if environ is None else environ
    for launcher, (r_name, w_name, l_name) in LAUNCHERS.items():
        present = [n for n in (r_name, w_name) if n in environ]
        if not present:
            continue
        if len(present) == 1:
            missing = w_name if present == [r_name] else r_name
            raise ValueError(f"{present[0]} is set but {missing} is not: a {launcher} job sets "
                             f"both ({r_name}: this process's rank; {w_name}: the number of "
                             "processes)")
        world = _int(environ, w_name, 1, "the number of processes in the job")
        rank = _int(environ, r_name, 0, "this process's rank, 0 .. world size - 1")
        if rank >= world:
            raise ValueError(f"{r_name}={rank} is not below {w_name}={world}: ranks are 0 .. "
                             f"{world - 1}")
        if l_name in environ:
            local = _int(environ, l_name, 0, "this process's GPU on its host")
            if local >= world:
                raise ValueError(f"{l_name}={local} is not below {w_name}={world}: a host "
                                 "cannot run more ranks than the job has")
        elif world > 1:
            raise ValueError(f"{r_name} and {w_name} are set but {l_name} is not: it says which "
                             f"GPU of its host this rank uses ({launcher} sets it)")
        else:
            local = 0
        addr, port = _master(environ, world, launcher)
        agent = launcher == "torchrun" and \
            environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        run = (f"{environ.get('TORCHELASTIC_RUN_ID', 'run')}/"
               f"{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
        return LaunchEnv(rank, world, local, addr, port, launcher, agent, run)
    return LaunchEnv(0, 1, 0, None, None, "none")


def _master(environ, world, launcher):
    addr = environ.get("MASTER_ADDR") or None
    port = environ.get("MASTER_PORT") or None
    if world == 1:
        return addr, None if port is None else _port(port)
    how = {"torchrun": "torchrun and cudrop launch set it",
           "mpirun": "pass it with mpirun -x MASTER_ADDR=... -x MASTER_PORT=...",
           "slurm": "export it in the job script, e.g. the first node of "
                    "$SLURM_JOB_NODELIST"}[launcher]
    if addr is None:
        raise ValueError(f"MASTER_ADDR is not set: the host name or address of rank 0, where "
                         f"the {world} ranks meet ({how})")
    if port is None:
        raise ValueError(f"MASTER_PORT is not set: a free TCP port on rank 0's host, where the "
                         f"{world} ranks meet ({how})")
    return addr, _port(port)


def _port(raw):
    try:
        port = int(str(raw).strip())
    except ValueError:
        raise ValueError(f"MASTER_PORT={raw!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"MASTER_PORT={port} is not a TCP port (1 .. 65535)")
    return port
