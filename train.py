"""Entry point: `python train.py method=er dataset=mnist_permutations seed=3` (see README)."""

import os

# Idle OpenMP threads yield the core instead of spinning: with 2 cores shared by other work,
# spinning made small-tensor training up to 10x slower. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from metacl.cli import run_with_clean_errors
    from metacl.run import main as run_main

    return run_with_clean_errors(run_main, cfg)


if __name__ == "__main__":
    main()
