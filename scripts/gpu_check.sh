#!/usr/bin/env bash
# The device call of a session lent a GPU (issue #20's checks), in one command that fits a
# 10-minute call: the GPU suite, then benchmarks/bench_gpu.py's rows; logs and figures in $OUT.
# Prepare here first with scripts/gpu_wheels.sh (carry .whl).
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/env.txt"
timeout "${TEST_SECONDS:-240}" python3 -m pytest -m gpu tests/gpu -p no:cacheprovider -q \
  -k "${TEST_FILTER:-}" 2>&1 | tee "$OUT/test_gpu.log" | tail -15
# Rows in the order of issue #20's table; each compiled row compiles once (a minute or more).
timeout "${BENCH_SECONDS:-300}" python3 benchmarks/bench_gpu.py --json "$OUT/bench_gpu.json" \
  ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_gpu.log"
