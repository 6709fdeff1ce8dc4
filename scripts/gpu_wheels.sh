#!/usr/bin/env bash
# Wheels for one device call (the lent H200 machine: torch, Lightning, numpy, pytest there, but
# no Hydra, OmegaConf, antlr4, mlxtend, quadprog, wandb): downloads cp312 x86-64 wheels into
# .whl/ (ignored by git), which `run` carries. Then, on the device machine:
#   run(command="scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
PLATFORMS=()
for n in 28 27 17; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Pure-Python packages, and quadprog (GEM) built for cp312; the versions of .venv. Not the
# Optuna sweeper: the image has no optuna, and the GPU checks run no search.
for spec in hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 mlxtend==0.25.0 \
            quadprog==0.1.14 hydra-joblib-launcher==1.2.0 \
            hydra-submitit-launcher==1.2.0 submitit==1.5.4 rich-argparse==1.8.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d .whl "$spec" \
  || python3 -m pip wheel -q --no-deps -w .whl "$spec"  # an sdist-only pure package: build it
done
ls -la .whl
