"""The global generator for ops called without a seed, counter-based like PyTorch's Philox
seed + offset: ``cudrop.random.seed(s)`` sets the seed and rewinds the offset; every op that
draws a mask with ``seed=None`` takes ``(s, offset)`` as its (seed, step) and advances the
offset by one, so ``cudrop.dropout(x, 0.5)`` twice gives two different masks and a program
that seeds once replays exactly. An explicit ``seed`` keeps cudrop's (seed, layer, step) rule:
the mask is a pure function of them and nothing global is read or advanced. Layers always pass
their own seed, layer id and step.
"""
from __future__ import annotations

from .philox import check_seed, check_step

__all__ = ["seed", "get_state", "set_state", "resolve"]

_seed, _offset = 0, 0


def seed(s: int) -> None:
    """Seed the global generator (an int in [0, 2**32)) and rewind its offset to 0."""
    set_state((s, 0))


def get_state() -> tuple:
    """``(seed, offset)``: save it to replay the next draws with :func:`set_state`."""
    return _seed, _offset


def set_state(state) -> None:
    """Restore a ``(seed, offset)`` pair from :func:`get_state`."""
    global _seed, _offset
    s, off = state
    _seed, _offset = check_seed("seed", s), check_seed("offset", off)


def resolve(seed=None, step=None, xp=None) -> tuple:
    """The ``(seed, step)`` a draw uses. ``seed=None``: the global seed, and as step the global
    offset (advanced by one) unless ``step`` is given. Otherwise ``seed`` itself, with ``step``
    or 0; both checked. A device step (a 0-d uint32 CuPy array, ``philox.check_step``) passes
    through unchanged and unread; ``xp``, the op's array module where it is known, rejects one
    on NumPy."""
    global _offset
    if seed is None:
        seed = _seed
        if step is None:
            step, _offset = _offset, (_offset + 1) % 2 ** 32
    return check_seed("seed", seed), check_step(0 if step is None else step, xp)
