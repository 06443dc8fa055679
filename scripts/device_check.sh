#!/usr/bin/env bash
# A narrower device call than device_run.sh: the GPU test suite, short CLI runs through
# --save / --resume on the GPU, and a probe of what the machine has (for nvmath-python/cuBLASLt).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/cudrop-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -m cudrop info
python3 - <<'PY' 2>&1 | tee "$OUT/probe.log"
import sys, importlib.util, glob, os
print("python", sys.version)
for m in ("cupy", "torch", "nvmath", "cuda.bindings", "cuda", "sklearn", "ml_dtypes", "xdist"):
    try:
        print(m, importlib.util.find_spec(m) is not None)
    except Exception as e:
        print(m, "error", e)
import cupy
print("cupy", cupy.__version__, "cuda runtime", cupy.cuda.runtime.runtimeGetVersion())
for pat in ("/usr/local/cuda*/lib64/libcublasLt.so*", "/usr/local/lib/python3*/*-packages/nvidia/*/lib/libcublasLt.so*",
            "/usr/lib/python3*/*-packages/nvidia/*/lib/libcublasLt.so*"):
    print(pat, glob.glob(pat)[:4])
import subprocess
print(subprocess.run([sys.executable, "-m", "pip", "list"], capture_output=True, text=True).stdout)
PY
python3 -m pytest -q -p no:cacheprovider -n 8 -rfE -k "not test_kernel_compiles" ${TESTS:-} 2>&1 | tail -n 25 | tee "$OUT/pytest.log"
runs=$(mktemp -d)
python3 -m cudrop train --device gpu --no-progress --dropout sparsedrop --p 0.3 --epochs 3 \
  --json "$runs/full.json" 2>&1 | tail -n 2
python3 -m cudrop train --device gpu --no-progress --dropout sparsedrop --p 0.3 --epochs 3 \
  --steps-per-epoch 1000 --save "$runs/a.ckpt" --save-every 30 2>&1 | tail -n 1
python3 -m cudrop train --device gpu --model resnet56 --epochs 3 --no-progress 2>&1 | tail -n 2
cp "$runs"/*.json "$OUT"/ 2>/dev/null
