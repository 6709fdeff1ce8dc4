# Sourced by the device-call scripts (gpu_check.sh, gpu_population.sh): the carried wheels
# (.whl, from scripts/gpu_wheels.sh) installed beside the image's torch, the environment, and
# nvidia-smi's report; OUT (default /tmp/gpu_out) receives the logs.
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
