# Two commands set up a fresh machine: `make train` and `make test` (README).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install train test test-gpu test-slurm bench bench-gpu bench-wandb lint clean distclean

# (Re)install when pyproject.toml changes; torch/torchvision come from the machine's wheels.
# --no-compile: pip would byte-compile every module of torch & co. (~50 s of the install);
# Python compiles the ones a run imports, once, and keeps them (PYTHONDONTWRITEBYTECODE,
# which some machines set, is cleared below for the commands that run the code).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]'
	touch $(STAMP)

export PYTHONDONTWRITEBYTECODE :=

install: $(STAMP)

# The default experiment (offline unless you are logged in to W&B). Extra overrides: ARGS="seed=1"
train: $(STAMP)
	$(PY) train.py $(ARGS)

# One pytest worker per core (pytest-xdist); idle workers take tests from busy ones.
test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -m "not gpu" -n auto --dist worksteal $(ARGS)

# The GPU suite (tests/gpu): every method end to end on CUDA, CPU/CUDA update equality, resume
# on the GPU. Needs a CUDA device; prints cases, time and peak GPU memory at the end.
test-gpu: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -m gpu tests/gpu -p no:cacheprovider $(ARGS)

# The SLURM suite (tests/slurm) on a one-node cluster on this machine, started (and installed
# with apt-get, as root) by scripts/slurm_cluster.sh; `make test` runs these tests too when a
# cluster answers, and skips them (saying why) when none does.
test-slurm: $(STAMP)
	scripts/slurm_cluster.sh
	WANDB_MODE=disabled METACL_REQUIRE_SLURM=1 $(PY) -m pytest -m slurm tests/slurm $(ARGS)

# The default experiment (train seconds, RA/BTI), then one MAML meta-batch with Omniglot shapes
# (per-task loop and vmap, first order, beside the MAML-Pytorch port's structure).
bench: $(STAMP)
	WANDB_MODE=disabled $(PY) benchmarks/bench_default.py $(ARGS)
	$(PY) benchmarks/bench_maml.py

# The GPU rows of issue #20 side by side (eager, compiled, naive loop; peak GPU memory):
# benchmarks/bench_gpu.py. On a machine without CUDA: make bench-gpu ARGS="--device cpu --quick"
bench-gpu: $(STAMP)
	WANDB_MODE=disabled $(PY) benchmarks/bench_gpu.py $(ARGS)

# What W&B (offline) adds to a run, beside logger=none, in fresh processes (ARGS="method=er")
bench-wandb: $(STAMP)
	$(PY) benchmarks/bench_wandb.py $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks train.py

clean:
	rm -rf outputs multirun wandb lightning_logs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) src/*.egg-info
