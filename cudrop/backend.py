"""The one module that imports CuPy.

Everything else asks this module which array module an array belongs to, whether a GPU is
usable, and how to bring foreign arrays (DLPack / ``__cuda_array_interface__`` producers such as
PyTorch or JAX tensors) in without a copy.
"""
from __future__ import annotations

import os

import numpy as np

from ._memo import memoize

try:  # CuPy is optional: cudrop runs on NumPy alone.
    import cupy
except ImportError:  # pragma: no cover - depends on the machine
    cupy = None

@memoize
def gpu_available() -> bool:
    """True when CuPy is installed and a CUDA device can be used. Never raises. Probed once
    (``cudrop.clear_caches()`` forgets the answer)."""
    if cupy is None:
        return False
    try:
        # is_available() is the documented probe; getDeviceCount() raises without a driver
        # instead of returning 0, so guard the whole thing.
        return bool(cupy.is_available()) and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def nccl():
    """CuPy's NCCL bindings (``cupy.cuda.nccl``: ``NcclCommunicator``, ``get_unique_id``, the
    ``NCCL_*`` constants), or RuntimeError saying what to install."""
    if cupy is None:
        raise RuntimeError("data-parallel training needs CuPy with NCCL: install cupy-cuda13x "
                           "(or cupy-cuda12x) and the NCCL wheel of the same CUDA "
                           "(nvidia-nccl-cu13 or nvidia-nccl-cu12)")
    try:
        from cupy.cuda import nccl as module
    except ImportError as e:  # pragma: no cover - depends on the CuPy build
        raise RuntimeError(f"this CuPy has no NCCL bindings ({e}): install a CuPy wheel "
                           "(cupy-cuda13x or cupy-cuda12x), which has them") from None
    if not getattr(module, "available", False):
        raise RuntimeError("CuPy found no NCCL library: install the NCCL wheel of your CUDA "
                           "(pip install nvidia-nccl-cu13, or nvidia-nccl-cu12 for CUDA 12)")
    return module


def nccl_available() -> bool:
    """True when :func:`nccl` would return CuPy's NCCL bindings and a GPU is usable. Never
    raises."""
    if not gpu_available():
        return False
    try:
        nccl()
    except RuntimeError:
        return False
    return True


def gpu_count() -> int:
    """The number of CUDA devices this process sees (0 without CuPy or a driver)."""
    if not gpu_available():
        return 0
    return int(cupy.cuda.runtime.getDeviceCount())


def tf32_enabled() -> bool:
    """float32 products may use TF32 tensor cores: CuPy's own switch ``CUPY_TF32=1`` (which
    ``cudrop train --precision tf32`` sets), read at each call; otherwise float32 is exact."""
    return os.environ.get("CUPY_TF32") == "1"


def is_floating(dtype) -> bool:
    """A floating dtype, bfloat16 included (ml_dtypes' bfloat16 has NumPy kind 'V')."""
    return dtype.kind == "f" or dtype.name == "bfloat16"


def is_gpu_array(a) -> bool:
    return cupy is not None and isinstance(a, cupy.ndarray)


def _kind(a) -> str | None:
    if isinstance(a, np.ndarray) or isinstance(a, np.generic):
        return "numpy"
    if is_gpu_array(a):
        return "cupy"
    return None


_SCALARS = (int, float, complex, bool, type(None))


def get_array_module(*arrays):
    """``numpy`` or ``cupy`` for the given arrays; non-arrays (scalars, None) are ignored.

    Raises TypeError when NumPy and CuPy arrays are mixed: silently copying one to the other's
    device would hide a device-placement bug and cost a host round trip per call.
    """
    # Fast path (every op calls this, ~1000 times an eager ResNet-56 step): exact types only;
    # anything else, and every error, goes through the checks below.
    mod = None
    for a in arrays:
        t = type(a)
        if cupy is not None and t is cupy.ndarray:
            m = cupy
        elif t is np.ndarray:
            m = np
        elif t in _SCALARS:
            continue
        else:
            return _array_module_checked(arrays)
        if mod is None:
            mod = m
        elif mod is not m:
            return _array_module_checked(arrays)
    return np if mod is None else mod


def _array_module_checked(arrays):
    kinds = {}
    for i, a in enumerate(arrays):
        k = _kind(a)
        if k is None and (hasattr(a, "__dlpack__") or hasattr(a, "__cuda_array_interface__")):
            raise TypeError(f"argument {i} is a {type(a).__module__}.{type(a).__name__}; cudrop's "
                            "raw-array ops take NumPy or CuPy arrays: import it without a copy "
                            "with cudrop.backend.as_array (or wrap it in cudrop.Tensor)")
        if k is not None:
            kinds.setdefault(k, (i, a))
    if len(kinds) > 1:
        (i, a), (j, b) = kinds["numpy"], kinds["cupy"]
        raise TypeError(
            f"arrays on different devices: argument {i} is a NumPy array (cpu, shape "
            f"{a.shape}) and argument {j} is a CuPy array ({device_of(b)}, shape {b.shape}); "
            "move both to one device first (cudrop.backend.to_device)"
        )
    return cupy if "cupy" in kinds else np


def device_of(a) -> str:
    """'cpu' for NumPy arrays, 'gpu:N' for CuPy arrays."""
    if is_gpu_array(a):
        return f"gpu:{a.device.id}"
    return "cpu"


def resolve_device(device: str) -> str:
    """Map 'auto' | 'cpu' | 'gpu' (or 'cuda') to 'cpu' or 'gpu', raising if a GPU is asked
    for and none is usable."""
    if device not in ("auto", "cpu", "gpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device in ("gpu", "cuda"):
        if not gpu_available():
            raise RuntimeError(
                "device='gpu' was asked for but no usable CUDA GPU was found "
                "(install cupy-cuda13x or cupy-cuda12x and check the driver)"
            )
        return "gpu"
    return "cpu"


def xp_for(device: str):
    """The array module for a device name ('cpu', 'gpu', 'auto')."""
    return cupy if resolve_device(device) == "gpu" else np


def from_dlpack(obj):
    """Zero-copy import of a foreign array.

    CUDA producers (PyTorch/JAX GPU tensors, anything with ``__cuda_array_interface__``) become
    CuPy arrays sharing memory; CPU producers become NumPy arrays sharing memory.
    """
    if hasattr(obj, "__dlpack_device__"):
        dev_type, _ = obj.__dlpack_device__()
        # DLPack device types: 1 = CPU, 3 = CUDA host (pinned), 2 = CUDA, 13 = CUDA managed.
        if dev_type in (1, 3):
            return np.from_dlpack(obj)
        if cupy is None:
            raise TypeError("a GPU array was given but CuPy is not installed")
        return cupy.from_dlpack(obj)
    if hasattr(obj, "__cuda_array_interface__"):
        if cupy is None:
            raise TypeError("a GPU array was given but CuPy is not installed")
        return cupy.asarray(obj)
    raise TypeError(f"{type(obj).__name__} is neither a NumPy/CuPy array nor a DLPack producer")


def as_array(obj, dtype=None):
    """Raw array from NumPy/CuPy arrays, DLPack producers, Python scalars or nested lists.
    Arrays keep their device; lists and scalars land on the CPU."""
    if isinstance(obj, np.ndarray) or is_gpu_array(obj):
        a = obj
    elif hasattr(obj, "__dlpack_device__") or hasattr(obj, "__cuda_array_interface__"):
        a = from_dlpack(obj)
    else:
        a = np.asarray(obj)
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    return a


def to_device(a, device: str):
    """Copy a raw array to 'cpu' or 'gpu' (no copy when it is already there)."""
    target = resolve_device(device)
    if target == "gpu":
        return cupy.asarray(a)
    return cupy.asnumpy(a) if is_gpu_array(a) else np.asarray(a)


def asnumpy(a):
    return cupy.asnumpy(a) if is_gpu_array(a) else np.asarray(a)


def pinned_empty(n, dtype):
    """A NumPy array of ``n`` elements in page-locked host memory (CuPy's pinned pool), the
    source a host-to-device copy needs to be asynchronous."""
    import cupyx
    return cupyx.empty_pinned((n,), dtype)


class HostCopy:
    """A device array (a scalar, or a small record) copied to the host without waiting for it:
    ``ready()`` polls (never blocks), ``value()`` returns the number and ``array()`` the host
    array (both waiting only if the copy is still in flight). On NumPy the data is there at
    once. The training loop reads its loss this way, so showing the loss costs no host sync per
    step, and cudrop's device error record (``cudrop.check_errors``) rides along."""

    def __init__(self, a):
        self._event = None
        if is_gpu_array(a):
            import cupyx
            self._host = cupyx.empty_pinned(a.shape, a.dtype)
            stream = cupy.cuda.get_current_stream()
            a.get(stream=stream, out=self._host, blocking=False)
            self._event = cupy.cuda.Event(disable_timing=True)
            self._event.record(stream)
        else:
            self._host = np.asarray(a)

    def ready(self) -> bool:
        return self._event is None or self._event.done

    def array(self):
        """The host copy (a NumPy array of the device array's shape and dtype)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host

    def value(self) -> float:
        return float(self.array().reshape(()))


def info() -> dict:
    """Versions and device facts, for ``cudrop info`` and bug reports."""
    out = {"numpy": np.__version__, "cupy": getattr(cupy, "__version__", None),
           "backend": "cupy" if gpu_available() else "numpy", "gpu": None, "cuda": None}
    if gpu_available():
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"]
        out["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        out["compute_capability"] = dev.compute_capability
        v = cupy.cuda.runtime.runtimeGetVersion()
        out["cuda"] = f"{v // 1000}.{(v % 1000) // 10}"
    return out
