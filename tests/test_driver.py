"""cudrop/_driver.py calls libcuda through ctypes, so nothing checks its declarations at build
time: these tests check them against the CUDA toolkit's ``cuda.h`` with the machine's C
compiler (skipped where either is missing; no GPU needed). The symbol each public name maps to,
the C signatures the argtypes stand for, the constants and ``CUgraphNodeParams``'s layout."""
import os
import shutil
import subprocess

import pytest

from cudrop import _driver

CC = shutil.which("cc") or shutil.which("gcc")
_NVCC = shutil.which("nvcc")
_INCLUDES = [os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(_NVCC))), "include")
             ] if _NVCC else []
_INCLUDES.append("/usr/local/cuda/include")
INCLUDE = next((d for d in _INCLUDES if os.path.exists(os.path.join(d, "cuda.h"))), None)

pytestmark = pytest.mark.skipif(CC is None or INCLUDE is None,
                                reason="needs a C compiler and the CUDA toolkit's cuda.h")

# The public names _driver.py relies on -> the C signature its argtypes stand for (checked
# against the header's declaration by assigning the function to a pointer of this type).
_C_SIGNATURES = {
    "cuDriverGetVersion": "CUresult (*)(int *)",
    "cuCtxGetCurrent": "CUresult (*)(CUcontext *)",
    "cuStreamGetCaptureInfo": "CUresult (*)(CUstream, CUstreamCaptureStatus *, cuuint64_t *, "
                              "CUgraph *, const CUgraphNode **, const CUgraphEdgeData **, "
                              "size_t *)",
    "cuGraphConditionalHandleCreate": "CUresult (*)(CUgraphConditionalHandle *, CUgraph, "
                                      "CUcontext, unsigned int, unsigned int)",
    "cuGraphAddNode": "CUresult (*)(CUgraphNode *, CUgraph, const CUgraphNode *, "
                      "const CUgraphEdgeData *, size_t, CUgraphNodeParams *)",
    "cuStreamUpdateCaptureDependencies": "CUresult (*)(CUstream, CUgraphNode *, "
                                         "const CUgraphEdgeData *, size_t, unsigned int)",
    "cuStreamBeginCaptureToGraph": "CUresult (*)(CUstream, CUgraph, const CUgraphNode *, "
                                   "const CUgraphEdgeData *, size_t, CUstreamCaptureMode)",
    "cuStreamEndCapture": "CUresult (*)(CUstream, CUgraph *)",
    "cuGetErrorName": "CUresult (*)(CUresult, const char **)",
}


def _cc(tmp_path, source, *flags):
    path = tmp_path / "probe.c"
    path.write_text("#include <stddef.h>\n#include <cuda.h>\n" + source)
    return subprocess.run([CC, "-std=c11", "-I", INCLUDE, *flags, str(path)],
                          capture_output=True, text=True)


def _symbols(tmp_path):
    """Each public name -> the symbol cuda.h's macros make of it."""
    names = list(_C_SIGNATURES)
    out = _cc(tmp_path, "".join(f"cudrop_map {i} {n}\n" for i, n in enumerate(names)), "-E", "-P")
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("cudrop_map")]
    return {names[int(i)]: symbol for _, i, symbol in lines}


def test_each_public_name_maps_to_the_symbol_ctypes_calls(tmp_path):
    """cuda.h maps e.g. cuGraphAddNode to cuGraphAddNode_v2; ctypes must call that symbol."""
    symbols = _symbols(tmp_path)
    assert symbols["cuGraphAddNode"] == "cuGraphAddNode_v2"
    assert sorted(symbols.values()) == sorted(_driver._SIGNATURES)


def test_the_argtypes_stand_for_the_header_s_signatures(tmp_path):
    checks = "".join(f"{sig.replace('(*)', f'(*p{i})')} = {name};\n"
                     for i, (name, sig) in enumerate(_C_SIGNATURES.items()))
    out = _cc(tmp_path, "void probe(void) {\n" + checks + "}\n", "-fsyntax-only", "-Werror",
              "-Wno-unused-variable")
    assert out.returncode == 0, out.stderr
    for name, symbol in _symbols(tmp_path).items():
        assert len(_driver._SIGNATURES[symbol]) == _C_SIGNATURES[name].count(",") + 1, name


def test_the_constants_and_the_node_parameters_layout_match_cuda_h(tmp_path):
    p = _driver._NodeParams
    asserts = [
        f"sizeof(CUgraphNodeParams) == {_driver.ctypes.sizeof(p)}",
        f"offsetof(CUgraphNodeParams, type) == {p.type.offset}",
        f"offsetof(CUgraphNodeParams, conditional.handle) == {p.handle.offset}",
        f"offsetof(CUgraphNodeParams, conditional.type) == {p.cond_type.offset}",
        f"offsetof(CUgraphNodeParams, conditional.size) == {p.size.offset}",
        f"offsetof(CUgraphNodeParams, conditional.phGraph_out) == {p.graphs_out.offset}",
        f"offsetof(CUgraphNodeParams, conditional.ctx) == {p.ctx.offset}",
        f"offsetof(CUgraphNodeParams, reserved2) == {p.reserved2.offset}",
        f"CU_GRAPH_COND_TYPE_IF == {_driver._COND_TYPE_IF}",
        f"CU_GRAPH_NODE_TYPE_CONDITIONAL == {_driver._NODE_TYPE_CONDITIONAL}",
        f"CU_GRAPH_COND_ASSIGN_DEFAULT == {_driver._COND_ASSIGN_DEFAULT}",
        f"CU_STREAM_SET_CAPTURE_DEPENDENCIES == {_driver._SET_CAPTURE_DEPENDENCIES}",
    ]
    source = "".join(f'_Static_assert({a}, "{a}");\n' for a in asserts)
    out = _cc(tmp_path, source, "-fsyntax-only")
    assert out.returncode == 0, out.stderr
