"""CUDA sources (.cu/.cuh beside this file) and the one memoised loader for them.

Sources are compiled through NVRTC by ``cupy.RawModule`` with dtype templates instantiated via
``name_expressions``. Local ``#include "x.cuh"`` lines are inlined before compiling, because
CuPy's on-disk cache keys on the source string and would otherwise miss a changed header.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .. import backend
from .._memo import Memo, memoize

HERE = Path(__file__).parent
_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.M)


def cache_dir() -> str:
    """Where CuPy keeps compiled kernels (``CUPY_CACHE_DIR`` or its default)."""
    return os.environ.get("CUPY_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cupy",
                                                         "kernel_cache"))


def source(name: str) -> str:
    """The text of ``name`` with local includes inlined (each header once)."""
    seen = set()

    def expand(fname):
        if fname in seen:
            return ""
        seen.add(fname)
        text = (HERE / fname).read_text()
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(name)


def _arch_options():
    cc = backend.cupy.cuda.Device().compute_capability  # e.g. "90"
    # sm_90a unlocks wgmma/TMA; NVRTC accepts it where CuPy's nvcc backend does not.
    return (f"-arch=sm_{cc}a" if cc == "90" else f"-arch=sm_{cc}",)


@memoize
def module(name: str, name_expressions: tuple = (), options: tuple = (), arch: tuple = ()):
    """A compiled ``cupy.RawModule`` for source file ``name`` (memoised per process and
    architecture)."""
    return backend_cupy().RawModule(code=source(name), options=("--std=c++17",) + arch
                                    + tuple(options),
                                    name_expressions=list(name_expressions) or None)


def backend_cupy():
    if not backend.gpu_available():
        raise RuntimeError("cudrop's CUDA kernels need a usable CUDA GPU")
    return backend.cupy


@memoize
def _kernel(name, expression, name_expressions, options, device_id):
    exprs = tuple(name_expressions) or (expression,)
    return module(name, exprs, tuple(options), _arch_options()).get_function(expression)


def kernel(name: str, expression: str, name_expressions: tuple = (), options: tuple = ()):
    """The function ``expression`` (e.g. ``"scale<float>"``) from source file ``name``, built
    for the current device's architecture (memoised per device)."""
    return _kernel(name, expression, tuple(name_expressions), tuple(options),
                   backend_cupy().cuda.runtime.getDevice())


# dtype -> the kernels' template argument (dtypes.cuh); every templated kernel is instantiated
# for all four, so one compile serves every dtype.
CUDA_TYPES = {"float32": "float", "float64": "double", "float16": "cd_f16", "bfloat16": "cd_bf16"}
# plain dicts of registered Memos: probed per launch, at dict speed
_TYPE_OF = Memo().data
_FUNCS = Memo().data


_DEVICE = Memo().data  # device id -> (SM count, is sm_90), a plain dict probed per launch


def device_facts():
    """``(SM count, is sm_90)`` of the current device, queried once per device: the attribute
    query costs more host time than a small kernel. Launch code sizes its grids with it (the
    block-sparse GEMMs' tiles, batch norm's split of a channel over several CTAs)."""
    dev = backend_cupy().cuda.runtime.getDevice()
    info = _DEVICE.get(dev)
    if info is None:
        d = backend_cupy().cuda.Device(dev)
        info = _DEVICE[dev] = (d.attributes["MultiProcessorCount"], d.compute_capability == "90")
    return info


def cuda_type(dtype):
    """The template argument for ``dtype``, or None where no kernel exists. A dict probe: the
    per-call host cost is what the GPU paths save, and ``dtype.name`` is a slow property."""
    try:
        return _TYPE_OF[dtype]
    except KeyError:
        t = _TYPE_OF[dtype] = CUDA_TYPES.get(dtype.name)
        return t


def load(source: str, fn: str, dtype, options: tuple = ()):
    """The compiled and loaded ``fn<T>`` of ``source`` with ``T`` the template argument of
    ``dtype`` (NVRTC ``options`` added to the compile); the handle is memoised per (source, fn,
    dtype, options, device) in a plain dict. Code that first launches a kernel inside a CUDA-graph
    capture calls this beforehand, so that compiling and loading happen outside the capture."""
    # The device from CuPy's runtime module directly: a launch's lookup is on every eager op's
    # path (~900 launches an eager ResNet-56 step), and backend_cupy()'s import and check cost
    # ~1.5 µs a call (host profile on the H200). Without a GPU, kernel() below raises.
    key = (source, fn, dtype, options,
           backend.cupy.cuda.runtime.getDevice() if backend.gpu_available() else None)
    f = _FUNCS.get(key)
    if f is None:
        names = tuple(f"{fn}<{t}>" for t in CUDA_TYPES.values())
        f = _FUNCS[key] = kernel(source, f"{fn}<{cuda_type(dtype)}>", names, options)
    return f


def aligned(a, nbytes: int):
    """CuPy array ``a`` C-contiguous at an ``nbytes``-aligned address: itself when it is, else
    a copy (a contiguous view at an odd offset is not aligned)."""
    a = backend_cupy().ascontiguousarray(a)
    return a if a.data.ptr % nbytes == 0 else a.copy()


def vector_aligned(a):
    """CuPy array ``a`` C-contiguous and aligned for the kernels' 4-element vector loads
    (``cd_vec4`` in dtypes.cuh)."""
    return aligned(a, 4 * a.itemsize)


def launch(source: str, fn: str, dtype, grid, block, args, options: tuple = ()):
    """Launch ``fn<T>`` of ``source`` with ``T`` the template argument of ``dtype`` (see
    :func:`load`)."""
    load(source, fn, dtype, options)(grid, block, args)


def launch_rows(source: str, fn: str, dtype, rows: int, args):
    """Launch a warp-per-row kernel (``lastaxis.cu``) over ``rows`` rows: 8 warps a block, at
    most 4096 blocks (the H200's 132 SMs hold ~1000 such blocks at once); the kernels loop over
    the rest."""
    warps = 8
    launch(source, fn, dtype, (min(-(-rows // warps), 4096),), (32 * warps,), args)
