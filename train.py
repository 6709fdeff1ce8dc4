"""Entry point: `python train.py method=er dataset=mnist_permutations seed=3` (see README)."""

import os

# Idle OpenMP threads yield the core instead of spinning: with 2 cores shared by other work,
# spinning made small-tensor training up to 10x slower. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys
from pathlib import Path

# Ctrl-C in the first seconds (imports, Hydra composing the config) is one line, exit 130.
EARLY_CTRL_C = "stopped: interrupted by Ctrl-C before the run started; nothing to resume"

try:
    import hydra
    from omegaconf import DictConfig

    from metacl.cli import (
        EXIT_CTRL_C,
        EXIT_USER_ERROR,
        bad_resume_path,
        unknown_choice,
        unknown_key,
        unwritable_output,
    )
    from metacl.resolvers import expand_aliases  # also registers ${metacl.run_dir:...}
except KeyboardInterrupt:
    print(EARLY_CTRL_C, file=sys.stderr)
    sys.exit(130)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from metacl.cli import run_with_clean_errors
    from metacl.runner.main import main as run_main

    return run_with_clean_errors(run_main, cfg)


if __name__ == "__main__":
    sys.argv[1:] = expand_aliases(sys.argv[1:])  # resume=X means resume.path=X
    # Before Hydra creates an output folder (its own messages span a dozen lines).
    conf = Path(__file__).resolve().parent / "conf"
    problem = (unknown_choice(sys.argv[1:], conf) or unknown_key(sys.argv[1:], conf)
               or bad_resume_path(sys.argv[1:]) or unwritable_output(sys.argv[1:]))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    try:
        main()
    except KeyboardInterrupt:  # inside the run, run_with_clean_errors says more
        print(EARLY_CTRL_C, file=sys.stderr)
        sys.exit(EXIT_CTRL_C)
    from metacl.runner.summary import failed_jobs

    if failed_jobs:  # a multirun with failed jobs (the table above names them)
        sys.exit(1)
