"""Parallel nvcc compiles for the kernel compile check, with a content-hash cache of successes.

A job is one (source, arch) pair. Its key is the sha256 of the exact text compiled (local
headers already inlined), the arch, the nvcc flags and ``nvcc --version``. A success leaves a
small marker file named by that key in the cache directory; a later run that finds the marker
skips nvcc for that pair, because that exact text was already compiled by that exact compiler
with those flags. Only successes are recorded; the cubin itself is not kept. Any trouble with the
cache directory (missing, unwritable, a file in its place, a corrupt marker) only means a miss:
the pair is compiled again.

The cache lives in ``$CUDROP_NVCC_CACHE`` if set, else ``$XDG_CACHE_HOME/cudrop-nvcc``, else
``~/.cache/cudrop-nvcc``. Delete the directory to force every compile.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

FLAGS = ("-std=c++17", "-DCUDROP_INSTANTIATE", "-cubin")


@dataclasses.dataclass
class Result:
    returncode: int
    stderr: str
    cached: bool
    seconds: float = 0.0


def cache_dir() -> Path:
    env = os.environ.get("CUDROP_NVCC_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "cudrop-nvcc"


def nvcc_version(nvcc: str) -> str:
    r = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    return f"{r.returncode}\n{r.stdout}{r.stderr}"


def key(text: str, arch: str, flags: tuple, version: str) -> str:
    h = hashlib.sha256()
    for part in (text, arch, *flags, version):  # length-prefixed: no two inputs hash alike
        b = part.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _is_hit(marker: Path, k: str) -> bool:
    try:
        return marker.read_text() == k + "\n"
    except (OSError, UnicodeDecodeError):
        return False


def _record(cache: Path, marker: Path, k: str) -> None:
    """Write the marker atomically; failure to write is ignored (the next run compiles)."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(k + "\n")
            os.replace(tmp, marker)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def _compile(nvcc: str, name: str, text: str, arch: str, flags: tuple, cache: Path,
             k: str) -> Result:
    marker = cache / k
    if _is_hit(marker, k):
        return Result(0, "", cached=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cudrop-nvcc-") as d:
        src = Path(d) / name
        src.write_text(text)
        r = subprocess.run([nvcc, *flags, f"-arch={arch}", "-o", str(Path(d) / "k.cubin"),
                            str(src)], capture_output=True, text=True)
    res = Result(r.returncode, r.stderr, cached=False, seconds=time.monotonic() - t0)
    if r.returncode == 0:
        _record(cache, marker, k)
    return res


class Compiler:
    """Starts every job at once on a pool of ``workers`` threads (each thread runs one nvcc
    process), longest source first; ``results[(name, arch)]`` is a Future of a Result."""

    def __init__(self, nvcc: str, jobs: dict, flags: tuple = FLAGS, workers: int | None = None,
                 cache: Path | None = None):
        # jobs: {(name, arch): text}
        self.cache = cache_dir() if cache is None else cache
        version = nvcc_version(nvcc)
        self.pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1,
                                       thread_name_prefix="nvcc")
        self.results: dict[tuple, Future] = {}
        for (name, arch), text in sorted(jobs.items(), key=lambda kv: -len(kv[1])):
            k = key(text, arch, flags, version)
            self.results[(name, arch)] = self.pool.submit(_compile, nvcc, name, text, arch,
                                                          flags, self.cache, k)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
