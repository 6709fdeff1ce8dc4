#!/usr/bin/env bash
# Issue #16's GPU rows, a second device call after scripts/gpu_check.sh (same wheels: carry
# .whl): 64 members of the default run, then 32 members of the CIFAR-100 La-MAML single-pass
# setting on a CIFAR-100 lookalike (the machine has no dataset files and no network), each
# beside one member by benchmarks/bench_population.py (one round each); logs in $OUT.
#   run(command="scripts/gpu_population.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"
# trainer=gpu: under trainer.accelerator=auto the default run's small MLP would train on the CPU
timeout "${DEFAULT_SECONDS:-240}" python3 benchmarks/bench_population.py --rounds 1 \
  --members "${DEFAULT_MEMBERS:-64}" trainer=gpu 2>&1 | tee "$OUT/population_default.log"
timeout "${CIFAR_SECONDS:-300}" python3 benchmarks/bench_population.py --rounds 1 \
  --members "${CIFAR_MEMBERS:-32}" --cifar-lookalike 100 trainer=gpu \
  experiment=lamaml/lamaml_cifar100_single_pass ${CIFAR_ARGS:-dataset.limit_tasks=5} 2>&1 \
  | tee "$OUT/population_cifar.log"
