"""Every CUDA source compiles with nvcc for sm_80 and sm_90a, with its templates instantiated
(``-DCUDROP_INSTANTIATE``): a kernel that does not compile fails here, on a machine without a
GPU. Skipped where nvcc is not installed.

The text compiled is the one NVRTC sees (local headers inlined by the loader), with
``-std=c++17 -DCUDROP_INSTANTIATE -cubin -arch=<arch>``. All selected (source, arch) pairs are
compiled once per run, started together on a pool of ``os.cpu_count()`` threads when the first
of these tests runs; each test then waits for its own pair. A pair whose exact text, arch, flags
and nvcc version compiled successfully in an earlier run is not compiled again and passes
(see ``_nvcc_cache`` for the cache and where it lives; delete it to force every compile).
"""
import shutil

import pytest

from _nvcc_cache import Compiler
from cudrop import raw_kernels

NVCC = shutil.which("nvcc")
SOURCES = sorted(p.name for p in raw_kernels.HERE.glob("*.cu"))
ARCHS = ["sm_80", "sm_90a"]


@pytest.fixture(scope="session")
def nvcc_results(request):
    """Futures of the nvcc results for every (source, arch) pair selected in this session."""
    pairs = {(it.callspec.params["name"], it.callspec.params["arch"])
             for it in request.session.items
             if getattr(it, "function", None) is test_kernel_compiles}
    texts = {}
    jobs = {}
    for name, arch in pairs:
        if name not in texts:
            texts[name] = raw_kernels.source(name)
        jobs[(name, arch)] = texts[name]
    compiler = Compiler(NVCC, jobs)
    yield compiler.results
    compiler.close()


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", SOURCES)
def test_kernel_compiles(name, arch, nvcc_results):
    r = nvcc_results[(name, arch)].result()
    assert r.returncode == 0, f"nvcc -arch={arch} {name} failed:\n{r.stderr}"


def test_there_are_kernels():
    assert {"dropout.cu", "masks.cu"} <= set(SOURCES)
