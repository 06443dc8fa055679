"""The rendezvous: rank 0 hands a few bytes (NCCL's unique id) to every other rank over TCP
at ``MASTER_ADDR:MASTER_PORT``. Only this crosses TCP; tensors go through NCCL.

Rank 0 listens, waits until every other rank has connected and said who it is (rank and world
size, checked: a duplicate or out-of-range rank, or another world size, fails the rendezvous on
every rank with a message naming it), then sends each the payload. The others connect with
retries until rank 0 is up. Everything is bounded by one deadline: a rank that never arrives
makes the others fail with an error naming the missing ranks, not wait forever.

Under torchrun the port belongs to torchrun's agent, which serves a key-value store there
(``TORCHELASTIC_USE_AGENT_STORE=True``); the payload then goes through that store
(``torch.distributed.TCPStore`` as a client: torchrun comes with PyTorch).
"""
from __future__ import annotations

import socket
import struct
import time

__all__ = ["exchange", "RendezvousError"]

_MAGIC = b"CUDROPRV"
_HELLO = struct.Struct("!8sII")  # magic, rank, world size
_REPLY = struct.Struct("!2sI")   # b"OK" or b"ER", then the length of what follows
_generation = 0                  # exchanges so far in this process (torchrun store keys)


class RendezvousError(RuntimeError):
    """The ranks could not meet: a rank missing at the deadline, a clash of ranks or world
    sizes, or a port that cannot be used."""


def exchange(env, payload: bytes | None, timeout: float) -> bytes:
    """Rank 0's ``payload`` on every rank of ``env`` (a ``LaunchEnv``); the other ranks pass
    None. Raises :class:`RendezvousError` when the ranks have not all met within ``timeout``
    seconds."""
    global _generation
    _generation += 1
    if env.world_size == 1:
        return payload
    deadline = time.monotonic() + float(timeout)
    if env.agent_store:
        return _via_agent_store(env, payload, timeout, _generation)
    if env.rank == 0:
        if payload is None:
            raise ValueError("rank 0 must give the payload")
        _serve(env.master_port, env.world_size, bytes(payload), deadline)
        return bytes(payload)
    return _fetch(env.master_addr, env.master_port, env.rank, env.world_size, deadline)


def _recv(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("connection closed early")
        out += chunk
    return out


def _send_reply(conn, kind, data):
    try:
        conn.sendall(_REPLY.pack(kind, len(data)) + data)
    except OSError:
        pass  # that rank is gone; the others still get their answer


def _serve(port, world, payload, deadline):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind(("", port))
    except OSError as e:
        srv.close()
        raise RendezvousError(f"rank 0 cannot listen on MASTER_PORT={port} ({e}): choose a free "
                              "port (cudrop launch --port, torchrun --master-port)") from None
    srv.listen(world)
    conns, ranks, problem = [], set(), None
    try:
        while len(ranks) < world - 1 and problem is None:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(1, world)) - ranks)
                problem = (f"ranks {missing} did not reach the rendezvous on port {port} in "
                           "time (did they start? is MASTER_ADDR rank 0's host?)")
                break
            srv.settimeout(min(left, 1.0))
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            conn.settimeout(max(1.0, deadline - time.monotonic()))
            try:
                magic, rank, their_world = _HELLO.unpack(_recv(conn, _HELLO.size))
            except (OSError, ConnectionError, struct.error):
                conn.close()  # not one of ours (a port scan, a stale client): ignore it
                continue
            if magic != _MAGIC:
                conn.close()
                continue
            if their_world != world:
                problem = (f"rank {rank} says the world size is {their_world}, rank 0 says "
                           f"{world}: the ranks were started with different WORLD_SIZE")
            elif not 1 <= rank < world or rank in ranks:
                problem = (f"two processes claim rank {rank}" if rank in ranks else
                           f"a process claims rank {rank} of a world of {world}")
            conns.append(conn)
            ranks.add(rank)
        for conn in conns:
            if problem is None:
                _send_reply(conn, b"OK", payload)
            else:
                _send_reply(conn, b"ER", problem.encode())
    finally:
        for conn in conns:
            conn.close()
        srv.close()
    if problem is not None:
        raise RendezvousError(f"rendezvous failed: {problem}")


def _fetch(addr, port, rank, world, deadline):
    last = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RendezvousError(f"rank {rank} could not reach rank 0 at {addr}:{port} in time "
                                  f"(last error: {last}); is rank 0 running, and are MASTER_ADDR "
                                  "and MASTER_PORT the same on every rank?")
        try:
            sock = socket.create_connection((addr, port), timeout=min(left, 5.0))
        except OSError as e:  # not listening yet: retry
            last = e
            time.sleep(min(0.2, max(0.0, left)))
            continue
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.sendall(_HELLO.pack(_MAGIC, rank, world))
            kind, n = _REPLY.unpack(_recv(sock, _REPLY.size))
            data = _recv(sock, n)
        except socket.timeout:
            raise RendezvousError(f"rank {rank} reached rank 0 at {addr}:{port} but the other "
                                  "ranks did not all arrive in time") from None
        except (OSError, ConnectionError) as e:
            last = e
            sock.close()
            time.sleep(0.2)
            continue
        finally:
            sock.close()
        if kind == b"OK":
            return data
        raise RendezvousError(f"rendezvous failed: {data.decode(errors='replace')}")


def _via_agent_store(env, payload, timeout, generation):
    try:
        from datetime import timedelta

        from torch.distributed import TCPStore
    except ImportError as e:
        raise RendezvousError("torchrun's agent serves the rendezvous on MASTER_PORT as a "
                              f"PyTorch TCPStore, and reading it needs PyTorch ({e})") from None
    key = f"cudrop/rendezvous/{env.agent_run}/{generation}"
    try:
        store = TCPStore(env.master_addr, env.master_port, is_master=False,
                         timeout=timedelta(seconds=float(timeout)))
        if env.rank == 0:
            store.set(key, bytes(payload))
        return bytes(store.get(key))
    except Exception as e:  # noqa: BLE001 - torch raises its own error types
        raise RendezvousError(f"rendezvous through torchrun's store at {env.master_addr}:"
                              f"{env.master_port} failed: {e}") from None
