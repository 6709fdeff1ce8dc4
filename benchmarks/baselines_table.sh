#!/usr/bin/env bash
# The RA/BTI table of every continual method on the bundled-digits rotations and permutations
# benchmarks (20 tasks x 1000 digits, single pass, MLP 784-100-100-10), 3 seeds each, then
# `python -m metacl.report` over all of it (docs/baselines_table.md).
#
#   benchmarks/baselines_table.sh OUT_DIR [METHOD ...]
#
# OUT_DIR (default outputs/baselines_table) gets one Hydra multirun folder per benchmark and
# method, OUT_DIR/<benchmark>/<method>/<job>_seed=<s>/results.json, and the report in
# OUT_DIR/report/. METHODs (default: all, cheapest first) pick a subset; a method whose folder
# already holds 3 completed runs is skipped, so the script can be re-run to fill in the rest.
# The report step alone: python -m metacl.report OUT_DIR/rotations OUT_DIR/permutations
#     --out OUT_DIR/report --no-plots --metrics RA,BTI,LA,forgetting
#
# Hyperparameters: the La-MAML family uses the reference script's MNIST commands
# (conf/experiment/lamaml/<method>_mnist_<benchmark>.yaml); every other method its defaults
# (conf/method/<method>.yaml): the reference has no MNIST command for them.
# Environment: PYTHON (default python), SEEDS (default 0,1,2), BENCHMARKS (default
# "rotations permutations"), NICE (default 10). Each job runs single-threaded (OMP_NUM_THREADS=1).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-outputs/baselines_table}
shift || true
PYTHON=${PYTHON:-python}
SEEDS=${SEEDS:-0,1,2}
BENCHMARKS=${BENCHMARKS:-rotations permutations}
NICE=${NICE:-10}
ALL="finetune joint er agem gem ewc lwf icarl lucir meta_bgd la_er cmaml sync_lamaml lamaml mer"
METHODS=${*:-$ALL}
WITH_EXPERIMENT="lamaml cmaml sync_lamaml" # methods with a reference MNIST command

n_seeds=$(tr ',' '\n' <<<"$SEEDS" | wc -l)
for bench in $BENCHMARKS; do
  for method in $METHODS; do
    dir="$OUT/$bench/$method"
    done_runs=$(grep -l '"status": "completed"' "$dir"/*/results.json 2>/dev/null | wc -l || true)
    if [ "$done_runs" -ge "$n_seeds" ]; then
      echo "skip $bench/$method: $done_runs completed runs in $dir"
      continue
    fi
    if [[ " $WITH_EXPERIMENT " == *" $method "* ]]; then
      choice="experiment=lamaml/${method}_mnist_${bench}"
    else
      choice="method=$method dataset=mnist_$bench"
    fi
    echo "$(date -u +%H:%M:%S) $bench/$method -> $dir"
    # shellcheck disable=SC2086  # $choice is two words on purpose
    nice -n "$NICE" env OMP_NUM_THREADS=1 WANDB_MODE=disabled "$PYTHON" train.py -m $choice \
      "seed=$SEEDS" logger=none "hydra.sweep.dir=$dir" task_name=baselines_table
  done
done

reports=()
for bench in $BENCHMARKS; do [ -d "$OUT/$bench" ] && reports+=("$OUT/$bench"); done
"$PYTHON" -m metacl.report "${reports[@]}" --out "$OUT/report" --no-plots \
  --metrics RA,BTI,LA,forgetting
