"""cudrop.backend: array-module dispatch, GPU probing, device names, foreign-array import."""
import numpy as np
import pytest

from cudrop import backend

needs_no_gpu = pytest.mark.skipif(backend.gpu_available(), reason="a usable GPU is present")


def test_get_array_module_numpy_and_scalars():
    assert backend.get_array_module(np.ones(3)) is np
    assert backend.get_array_module(np.float32(1.0)) is np
    assert backend.get_array_module(1.0, 2, None, True) is np
    assert backend.get_array_module() is np
    assert backend.get_array_module(np.ones(2), 3.0, None) is np


def test_get_array_module_xp(xp):
    assert backend.get_array_module(xp.ones(3), 1.0, None, xp.zeros(2)) is xp


@pytest.mark.gpu
def test_get_array_module_mixed_raises_naming_both():
    cp = backend.cupy
    for args in [(np.ones(2), cp.ones(3)), (cp.ones(3), 1.0, np.ones(2))]:
        with pytest.raises(TypeError) as e:
            backend.get_array_module(*args)
        msg = str(e.value)
        assert "NumPy" in msg and "CuPy" in msg and "to_device" in msg


def test_gpu_available_returns_bool():
    assert isinstance(backend.gpu_available(), bool)
    assert backend.gpu_available() is backend.gpu_available()  # memoised, stable


def test_gpu_available_without_cupy(monkeypatch):
    monkeypatch.setattr(backend, "cupy", None)
    monkeypatch.setattr(backend, "gpu_available", backend.gpu_available.__wrapped__)
    assert backend.gpu_available() is False
    assert backend.is_gpu_array(np.ones(2)) is False
    assert backend.get_array_module(np.ones(2)) is np
    assert backend.resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="no usable CUDA GPU"):
        backend.resolve_device("gpu")


class _BrokenCupy:
    """CuPy installed, no driver: getDeviceCount raises instead of returning 0 (DESIGN §4)."""

    class ndarray:  # is_gpu_array checks isinstance against this
        pass

    @staticmethod
    def is_available():
        raise RuntimeError("cudaErrorNoDevice")


class _NoDeviceCupy(_BrokenCupy):
    @staticmethod
    def is_available():
        return False


@pytest.mark.parametrize("fake", [_BrokenCupy, _NoDeviceCupy])
def test_gpu_available_never_raises(monkeypatch, fake):
    monkeypatch.setattr(backend, "cupy", fake)
    monkeypatch.setattr(backend, "gpu_available", backend.gpu_available.__wrapped__)
    assert backend.gpu_available() is False
    assert backend.get_array_module(np.ones(2)) is np


@needs_no_gpu
@pytest.mark.parametrize("name", ["gpu", "cuda"])
def test_resolve_device_gpu_without_gpu_raises(name):
    with pytest.raises(RuntimeError, match="device='gpu'"):
        backend.resolve_device(name)
    with pytest.raises(RuntimeError):
        backend.xp_for(name)


def test_resolve_device_names():
    assert backend.resolve_device("cpu") == "cpu"
    assert backend.resolve_device("auto") == ("gpu" if backend.gpu_available() else "cpu")
    assert backend.xp_for("cpu") is np
    if backend.gpu_available():
        assert backend.resolve_device("gpu") == "gpu"
        assert backend.resolve_device("cuda") == "gpu"
        assert backend.xp_for("gpu") is backend.cupy


@pytest.mark.parametrize("bad", ["GPU", "tpu", "", "cuda:0", None, 0])
def test_resolve_device_bad_name(bad):
    with pytest.raises(ValueError, match="device must be"):
        backend.resolve_device(bad)


def test_from_dlpack_numpy_roundtrip_shares_memory():
    a = np.arange(12.0).reshape(3, 4)
    b = backend.from_dlpack(a)
    assert isinstance(b, np.ndarray)
    np.testing.assert_array_equal(a, b)
    assert np.shares_memory(a, b)
    a[0, 0] = 42.0
    assert b[0, 0] == 42.0


class _CpuProducer:
    """A foreign (non-NumPy) DLPack producer living on the CPU, e.g. a CPU torch tensor."""

    def __init__(self, arr):
        self._arr = arr

    def __dlpack__(self, *args, **kwargs):
        return self._arr.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()


def test_from_dlpack_foreign_cpu_producer():
    a = np.arange(6, dtype=np.float32)
    b = backend.from_dlpack(_CpuProducer(a))
    assert isinstance(b, np.ndarray) and b.dtype == np.float32
    assert np.shares_memory(a, b)
    c = backend.as_array(_CpuProducer(a), dtype=np.float64)
    assert c.dtype == np.float64
    np.testing.assert_array_equal(c, a)


def test_from_dlpack_rejects_non_arrays():
    with pytest.raises(TypeError, match="DLPack"):
        backend.from_dlpack([1, 2, 3])


@pytest.mark.gpu
def test_from_dlpack_cuda_producer_shares_memory():
    cp = backend.cupy
    a = cp.arange(5.0)
    b = backend.from_dlpack(a)
    assert isinstance(b, cp.ndarray)
    b[0] = 7.0
    assert float(a[0]) == 7.0

    class _Cai:  # a producer that only speaks __cuda_array_interface__ (e.g. Numba)
        def __init__(self, arr):
            self.__cuda_array_interface__ = arr.__cuda_array_interface__

    c = backend.from_dlpack(_Cai(a))
    assert isinstance(c, cp.ndarray) and int(c.data.ptr) == int(a.data.ptr)


def test_as_array():
    a = backend.as_array([[1, 2], [3, 4]])
    assert isinstance(a, np.ndarray) and a.shape == (2, 2) and a.dtype.kind == "i"
    f = backend.as_array([1, 2], dtype=np.float32)
    assert f.dtype == np.float32
    s = backend.as_array(2.5)
    assert isinstance(s, np.ndarray) and s.shape == () and s.dtype == np.float64
    x = np.ones(3)
    assert backend.as_array(x) is x  # arrays are not copied
    assert backend.as_array(x, dtype=np.float64) is x
    assert backend.as_array(np.float32(1.5)).dtype == np.float32


def test_as_array_keeps_device(xp):
    x = xp.ones(3, dtype=xp.float32)
    y = backend.as_array(x, dtype=np.float64)
    assert backend.get_array_module(y) is xp and y.dtype == np.float64


def test_device_helpers(xp):
    x = xp.arange(3.0)
    on_gpu = xp is not np
    assert backend.is_gpu_array(x) is on_gpu
    assert backend.device_of(x) == ("gpu:0" if on_gpu else "cpu")
    np.testing.assert_array_equal(backend.asnumpy(x), np.arange(3.0))
    assert isinstance(backend.asnumpy(x), np.ndarray)
    back = backend.to_device(x, "cpu")
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, np.arange(3.0))


@pytest.mark.gpu
def test_to_device_gpu_roundtrip():
    cp = backend.cupy
    g = backend.to_device(np.arange(4.0), "gpu")
    assert isinstance(g, cp.ndarray)
    assert backend.to_device(g, "gpu") is g  # no copy when already there
    np.testing.assert_array_equal(backend.to_device(g, "cpu"), np.arange(4.0))


def test_info():
    info = backend.info()
    assert info["numpy"] == np.__version__
    assert info["backend"] in ("numpy", "cupy")
    if info["backend"] == "cupy":
        assert isinstance(info["gpu"], str) and info["cuda"]


def test_foreign_arrays_get_a_clear_error_in_raw_ops():
    class Foreign:  # a DLPack producer that is neither NumPy nor CuPy
        def __dlpack__(self, *a, **k):
            raise NotImplementedError

        def __dlpack_device__(self):
            return (1, 0)

    with pytest.raises(TypeError, match="argument 1 .*as_array"):
        backend.get_array_module(np.ones(2), Foreign())
