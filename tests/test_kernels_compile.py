"""Every CUDA source compiles with nvcc for sm_80 and sm_90a, with its templates instantiated
(``-DCUDROP_INSTANTIATE``): a kernel that does not compile fails here, on a machine without a
GPU. Skipped where nvcc is not installed."""
import shutil
import subprocess
from pathlib import Path

import pytest

from cudrop import raw_kernels

NVCC = shutil.which("nvcc")
SOURCES = sorted(p.name for p in raw_kernels.HERE.glob("*.cu"))


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("name", SOURCES)
def test_kernel_compiles(name, arch, tmp_path):
    # Compile the text NVRTC sees (local headers inlined by the loader), not the file itself.
    src = tmp_path / name
    src.write_text(raw_kernels.source(name))
    r = subprocess.run([NVCC, "-std=c++17", "-DCUDROP_INSTANTIATE", f"-arch={arch}", "-cubin",
                        "-o", str(tmp_path / "k.cubin"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_there_are_kernels():
    assert {"dropout.cu", "masks.cu"} <= set(SOURCES)
