"""The one memoise helper. Every cache in cudrop (compiled kernels, launch plans, tensor maps,
device facts, constant arrays) is made here, so ``cudrop.clear_caches()`` empties all of them:
after a device reset, to free GPU memory held by cached constants, or between tests.

Two forms: ``memoize`` wraps a function whose arguments are the key (``functools.lru_cache``:
its C key is the cheapest per-call lookup Python has), and ``Memo`` is a dict for the hot paths
that build their key by hand (a launch plan is looked up per kernel call, ~1 µs).
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


class Memo(dict):
    """A dict cache registered with :func:`clear_caches`. ``maxsize`` bounds it: when full, it
    is emptied before the next insert (cheap, and the entries are rebuilt on demand)."""

    def __init__(self, maxsize: int | None = None):
        super().__init__()
        self.maxsize = maxsize
        _registry.append(self.clear)

    def put(self, key, value):
        if self.maxsize is not None and len(self) >= self.maxsize:
            self.clear()
        self[key] = value
        return value


def clear_caches() -> None:
    """Empty every cudrop cache. Nothing is lost but time: each entry is rebuilt when next
    needed (kernels come back from CuPy's on-disk cache without recompiling)."""
    for clear in _registry:
        clear()
