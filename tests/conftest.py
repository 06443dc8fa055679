"""Shared fixtures. ``xp`` runs a test on NumPy and, where a GPU is usable, on CuPy: one suite
for both devices, the GPU half marked ``gpu`` and skipped cleanly without one."""
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import cudrop
from cudrop import _checks, backend, raw_kernels

# ``xp`` is a module, the same for every example, so a function-scoped fixture is safe here.
_ok = [HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=_ok)
settings.register_profile("dev", max_examples=15, deadline=None, suppress_health_check=_ok)
settings.load_profile("ci")

_gpu = pytest.mark.gpu
_skip_gpu = pytest.mark.skipif(not backend.gpu_available(), reason="no usable CUDA GPU")


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=[_gpu, _skip_gpu])])
def xp(request):
    if request.param == "numpy":
        return np
    return backend.cupy


@pytest.fixture(autouse=True)
def _no_unreported_device_error():
    """A test that leaves a failure in a device error record fails here (instead of the next
    test that reaches a check point): a test of a bad index must consume it with
    ``cudrop.check_errors()`` (see :func:`raises_at_check`)."""
    yield
    if _checks._RECORDS:
        try:
            cudrop.check_errors()
        except cudrop.IndexRangeError as e:
            pytest.fail(f"the test left an unreported device error: {e}")


def raises_at_check(xp, match, fn):
    """``fn()`` (an op given a bad index) raises IndexRangeError matching ``match``: at once on
    NumPy; on CuPy it returns, and the next ``cudrop.check_errors()`` raises. Returns what
    ``fn`` returned on CuPy (None on NumPy)."""
    if xp is np:
        with pytest.raises(cudrop.IndexRangeError, match=match):
            fn()
        return None
    out = fn()
    with pytest.raises(cudrop.IndexRangeError, match=match):
        cudrop.check_errors()
    return out


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu") and not backend.gpu_available():
            item.add_marker(_skip_gpu)


def poison_pool(xp, nbytes=1 << 26):
    """Fill free memory of CuPy's pool with NaN bytes, so an op that leaves part of a freshly
    allocated output unwritten shows NaN there instead of a plausible stale value."""
    if xp is np:
        return
    junk = xp.full(nbytes // 4, np.nan, dtype=np.float32)
    del junk  # back to the pool, poisoned; the next allocations reuse it


def low_precision_dtype(xp, dtype):
    """``dtype`` as a NumPy dtype; bfloat16 (through ml_dtypes) only where CuPy can hold it,
    else the test is skipped."""
    if dtype != "bfloat16":
        return np.dtype(dtype)
    if xp is np:
        pytest.skip("the bfloat16 path is CuPy-only")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    try:
        xp.zeros(1, dtype=ml_dtypes.bfloat16)
    except Exception as e:  # CuPy builds without bfloat16 support
        pytest.skip(f"CuPy cannot hold bfloat16 arrays here: {e}")
    return np.dtype(ml_dtypes.bfloat16)


def host_harness(tmp_path_factory, name, source):
    """Compile ``source`` (C++ that includes cudrop's kernel headers, which compile for the host
    too) with the machine's C++ compiler, or skip the test when there is none. Returns
    ``run(lines) -> stdout``: one input line per tuple of ``lines``, fields space-separated."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp(name)
    (d / "main.cpp").write_text(source)
    exe = d / "main"
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", str(raw_kernels.HERE), str(d / "main.cpp"),
                    "-o", str(exe)], check=True, capture_output=True)

    def run(lines):
        return subprocess.run([str(exe)], input="\n".join(" ".join(map(str, v)) for v in lines),
                              capture_output=True, text=True, check=True).stdout

    return run


def same_bits(got, want, what):
    """``got`` equals ``want`` bit for bit (shape, dtype and every byte; NaN payloads too)."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    bits = [backend.asnumpy(a) for a in (got, want)]
    bits = [a.view(f"u{a.dtype.itemsize}") for a in bits]
    np.testing.assert_array_equal(bits[0], bits[1], err_msg=what)
