"""cudrop._memo: one clear_caches() empties every memoised function and Memo, and each entry is
recomputed on the next call."""
from cudrop import _memo, raw_kernels
from cudrop.bsmm import dispatch, tma


def test_clear_caches_empties_memoized_and_memo_then_recomputes():
    calls = []

    @_memo.memoize
    def square(x):
        calls.append(x)
        return x * x

    memo = _memo.Memo()
    data = memo.data
    assert square(3) == 9 and square(3) == 9 and calls == [3]
    assert memo.put("k", 1) == 1 and data["k"] == 1 and len(memo) == 1

    _memo.clear_caches()

    assert square.cache_info().currsize == 0
    assert len(memo) == 0 and memo.data is data  # emptied in place: bound probes stay valid
    assert square(3) == 9 and calls == [3, 3]  # recomputed
    assert data.get("k") is None
    memo.put("k", 2)
    assert data["k"] == 2


def test_memo_maxsize_starts_over():
    memo = _memo.Memo(maxsize=2)
    memo.put(1, "a")
    memo.put(2, "b")
    memo.put(3, "c")
    assert memo.data == {3: "c"}


def test_the_library_caches_are_registered():
    """The module caches of the kernel loader (dtypes, functions, device facts), the bsmm
    dispatcher and the tensor maps are emptied by clear_caches (filled here by hand: there is
    no GPU on the CPU suite)."""
    import numpy as np
    raw_kernels.cuda_type(np.dtype(np.float32))
    dicts = (raw_kernels._TYPE_OF, raw_kernels._FUNCS, raw_kernels._DEVICE, dispatch._PLANS,
             tma._maps)
    for d in dicts[1:]:
        d["probe"] = object()
    assert all(dicts)
    _memo.clear_caches()
    assert not any(dicts)
    assert raw_kernels.cuda_type(np.dtype(np.float16)) == "cd_f16"  # recomputed
