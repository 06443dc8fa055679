"""The one memoise helper. Every cache in cudrop (compiled kernels, launch plans, tensor maps,
device facts, constant arrays) is made here, so ``cudrop.clear_caches()`` empties all of them:
after a device reset, to free GPU memory held by cached constants, or between tests.

Two forms: ``memoize`` wraps a function whose arguments are the key (``functools.lru_cache``:
its C key is the cheapest per-call lookup Python has), and ``Memo`` holds a plain dict for the
hot paths that build their key by hand (a launch plan is looked up per kernel call, ~1 µs).
A hot path binds ``Memo.data`` once at import and probes it as the dict it is: CPython 3.11
specialises ``d[k]`` and ``d.get(k)`` for the exact dict type only, and the same probe on a dict
subclass costs ~20 ns more per call.
"""
from __future__ import annotations

import functools

__all__ = ["memoize", "Memo", "clear_caches"]

_registry: list = []


def memoize(fn=None, *, maxsize=None):
    """``functools.lru_cache(maxsize)(fn)``, registered with :func:`clear_caches`."""
    if fn is None:
        return functools.partial(memoize, maxsize=maxsize)
    cached = functools.lru_cache(maxsize=maxsize)(fn)
    _registry.append(cached.cache_clear)
    return cached


class Memo:
    """A dict cache (``data``, a plain dict that ``clear`` keeps) registered with
    :func:`clear_caches`. ``maxsize`` bounds it: when full, it is emptied before the next
    :meth:`put` (cheap, and the entries are rebuilt on demand)."""

    __slots__ = ("data", "maxsize")

    def __init__(self, maxsize: int | None = None):
        self.data: dict = {}
        self.maxsize = maxsize
        _registry.append(self.data.clear)

    def put(self, key, value):
        """``data[key] = value`` within ``maxsize``; returns ``value``."""
        if self.maxsize is not None and len(self.data) >= self.maxsize:
            self.data.clear()
        self.data[key] = value
        return value

    def clear(self) -> None:
        self.data.clear()

    def __len__(self) -> int:
        return len(self.data)


def clear_caches() -> None:
    """Empty every cudrop cache. Nothing is lost but time: each entry is rebuilt when next
    needed (kernels come back from CuPy's on-disk cache without recompiling)."""
    for clear in _registry:
        clear()
