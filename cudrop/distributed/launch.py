"""``cudrop launch -n N [--port P] -- COMMAND ...``: N local processes of a data-parallel job.

Each child gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (0 .. N-1 and
N), ``MASTER_ADDR=127.0.0.1`` and ``MASTER_PORT`` (``--port``, or a free port), as torchrun
would set them. COMMAND is a cudrop command (``train ...``, run as ``python -m cudrop train
...``), a Python script (``script.py ...``, run with this Python), or any program.

SIGINT, SIGTERM and SIGHUP sent to the launcher go to every child (the children run in their own
sessions, so a terminal's Ctrl-C reaches them once, through the launcher). When a child exits
with a non-zero status the launcher stops the others (SIGTERM, then SIGKILL after a grace
period), says which rank failed and how, and exits with that status (128 + the signal number for
a child killed by a signal).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

__all__ = ["launch", "child_command", "free_port", "GRACE_SECONDS"]

#: Seconds the other ranks get to exit after SIGTERM before SIGKILL.
GRACE_SECONDS = 10.0
_CUDROP_COMMANDS = ("train", "info", "repro")
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# torchrun's own variables must not leak into the children of a launcher run under it
_STALE = ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
          "GROUP_RANK", "ROLE_RANK")


def free_port() -> int:
    """A TCP port free on this host now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_command(command) -> list:
    """The argv each rank runs for ``command`` (see the module docstring)."""
    command = list(command)
    if not command:
        raise ValueError("cudrop launch: give the command to run after --, e.g. "
                         "cudrop launch -n 2 -- train --model mlp")
    if command[0] in _CUDROP_COMMANDS:
        return [sys.executable, "-m", "cudrop"] + command
    if command[0].endswith(".py"):
        return [sys.executable] + command
    return command


def _describe(rc):
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"was killed by {name}", 128 - rc
    return f"exited with status {rc}", rc


def launch(nprocs: int, command, *, port: int | None = None, log=None) -> int:
    """Run ``command`` as ``nprocs`` ranks on this host and wait for them; returns the exit
    status for the launcher (0 when every rank exited with 0). ``log``: where the launcher's
    own messages go (default stderr)."""
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"cudrop launch: -n must be a positive int, got {nprocs!r}")
    if port is not None and not 1 <= int(port) <= 65535:
        raise ValueError(f"cudrop launch: --port must be in 1 .. 65535, got {port}")
    argv = child_command(command)
    port = free_port() if port is None else int(port)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    procs = []
    received = []

    def forward(signum, _frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except OSError:
                    pass

    old = {s: signal.signal(s, forward) for s in _FORWARDED}
    try:
        for r in range(nprocs):
            env = {k: v for k, v in os.environ.items() if k not in _STALE}
            env.update(RANK=str(r), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(r),
                       LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
            try:
                procs.append(subprocess.Popen(argv, env=env, start_new_session=True))
            except OSError as e:
                say(f"cudrop launch: cannot start rank {r} ({' '.join(argv)}): {e}")
                _stop(procs)
                return 127
        return _wait(procs, received, say)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _wait(procs, received, say):
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            r, c = failed[0]
            how, status = _describe(c)
            running = sum(c is None for c in codes)
            if received:
                status = 128 + received[0]
            else:
                more = f"; stopping the other {running} rank(s)" if running else ""
                say(f"cudrop launch: rank {r} (pid {procs[r].pid}) {how}{more}")
            _stop(procs)
            return status
        if all(c == 0 for c in codes):
            return 128 + received[0] if received else 0
        time.sleep(0.05)


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            try:
                p.terminate()
            except OSError:
                pass
    deadline = time.monotonic() + GRACE_SECONDS
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
