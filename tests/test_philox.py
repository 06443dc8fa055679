"""Philox4x32-10 against the Random123 known-answer vectors, and the mask coordinate map."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from cudrop import philox

KAT = [  # Random123 kat_vectors, philox4x32 with 10 rounds: counter, key, output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr, key, expected", KAT)
def test_known_answers(ctr, key, expected):
    assert tuple(int(w) for w in philox.philox4x32(*ctr, *key)) == expected


def test_vectorised_equals_scalar_calls():
    c0 = np.arange(50, dtype=np.uint64) * 7919
    vec = philox.philox4x32(c0, 3, 5, 7, 11, 13)
    for i in range(50):
        one = philox.philox4x32(int(c0[i]), 3, 5, 7, 11, 13)
        assert tuple(int(v[i]) for v in vec) == tuple(int(w) for w in one)


@given(cols=st.integers(1, 700), rows=st.integers(1, 4), step=st.integers(0, 2**32 - 1))
def test_column_map_uses_each_counter_word_once(cols, rows, step):
    # Every (row, col) maps to a distinct (counter, word) pair: no two cells share a draw.
    c = np.arange(cols)
    c0, word = c // 4, c % 4
    assert len(set(zip(c0.tolist(), word.tolist()))) == cols
    g = philox.grid_words(1, 2, step, 0, rows, cols)
    direct = [[int(philox.philox4x32(j // 4, i, step, 0, 1, 2)[j % 4])
               for j in range(0, cols, max(1, cols // 7))] for i in range(rows)]
    assert g[:, ::max(1, cols // 7)].tolist() == direct


def test_threshold_and_keep_rate():
    assert philox.threshold(0.0) == 0
    assert philox.threshold(0.5) == 2 ** 31
    keep = philox.keep_grid(7, 1, 3, philox.TAG_ELEMENT, 200, 1000, 0.3)
    n = keep.size
    assert abs(keep.mean() - 0.7) < 5 * np.sqrt(0.21 / n)
    for bad in (-0.1, 1.0, 1.5, float("nan"), "0.1"):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            philox.threshold(bad)


def test_streams_are_independent_of_each_other():
    base = philox.grid_words(1, 2, 3, 0, 4, 64)
    for other in (philox.grid_words(2, 2, 3, 0, 4, 64), philox.grid_words(1, 3, 3, 0, 4, 64),
                  philox.grid_words(1, 2, 4, 0, 4, 64), philox.grid_words(1, 2, 3, 1, 4, 64)):
        assert (base != other).mean() > 0.99
    assert np.array_equal(base, philox.grid_words(1, 2, 3, 0, 4, 64))


def test_uniform_range_and_seed_check():
    u = philox.uniform(0, 0, 0, philox.TAG_DEPTH, 10000)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
    with pytest.raises(ValueError, match="seed"):
        philox.check_seed("seed", -1)
    with pytest.raises(ValueError, match="seed"):
        philox.check_seed("seed", 2 ** 32)


@given(c=st.tuples(*[st.integers(0, 2**32 - 1)] * 4), k=st.tuples(*[st.integers(0, 2**32 - 1)] * 2))
def test_scalar_version_equals_array_version(c, k):
    assert philox.philox4x32_scalar(*c, *k) == tuple(int(w) for w in philox.philox4x32(*c, *k))
    assert int(philox.words(k[0], k[1], c[2], c[3], c[1], c[0])) == int(
        philox.words(k[0], k[1], c[2], c[3], np.array([c[1]]), np.array([c[0]]))[0])


@pytest.mark.parametrize("n", [1, 3, 4, 5, 16, 17, 40])
def test_uniform_small_and_large_paths_agree(n):
    u = philox.uniform(7, 8, 9, philox.TAG_DEPTH, n)
    ref = philox.words(7, 8, 9, philox.TAG_DEPTH, 0, np.arange(n)).astype(np.float64) / 2.0 ** 32
    assert np.array_equal(u, ref)
