export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider tests/test_philox.py tests/test_masks.py tests/test_dropout.py tests/test_device_step.py 2>&1 | tail -15
for t in memcheck racecheck; do compute-sanitizer --tool $t --error-exitcode 9 python3 scripts/sanitize_kernels.py 2>&1 | tail -3; done
python3 benchmarks/dropout.py 2>&1 | tail -6
