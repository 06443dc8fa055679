#!/usr/bin/env bash
# The one call on the GPU machine: the whole test suite (GPU half included), the benchmarks and
# short training runs. Logs and JSON go to $OUT; a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/cudrop-out}; mkdir -p "$OUT"

python3 -m cudrop info | tee "$OUT/info.txt"
python3 -m pytest -q -p no:cacheprovider --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.log"
tests_rc=${PIPESTATUS[0]}
python3 benchmarks/batched_matmul.py 2>&1 | tee "$OUT/bench.log"
for m in mlp resnet20 vit; do
  python3 -m cudrop train --model $m --data digits --device gpu --epochs 3 --no-progress \
    --json "$OUT/train_$m.json" 2>&1 | tail -n 1 | tee -a "$OUT/train.log"
done

echo; echo "== summary =="
grep -E "passed|failed" "$OUT/pytest.log" | tail -n 1
python3 - "$OUT" <<'PY'
import json, sys, glob, os
for f in sorted(glob.glob(os.path.join(sys.argv[1], "train_*.json"))):
    d = json.load(open(f)); c, r = d["config"], d["final"]
    print(f"train {c['model']:9s} {c['data']:8s} {c['device']}: test acc {r.get('test_acc', float('nan')):.4f}, mean step {r['mean_step_ms']:.2f} ms")
PY
tail -n 9 "$OUT/bench.log"
exit $tests_rc
