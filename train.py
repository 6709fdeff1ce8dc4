"""Entry point: `python train.py method=er dataset=mnist_permutations seed=3` (see README)."""

import os

# Idle OpenMP threads yield the core instead of spinning: with 2 cores shared by other work,
# spinning made small-tensor training up to 10x slower. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import signal
import sys
from pathlib import Path

# Ctrl-C in the first seconds (imports, Hydra composing the config) is one line, exit 130.
# A handler, not `except KeyboardInterrupt`: Hydra and OmegaConf catch the interrupt in places
# while composing and report it as a broken config. The run takes Ctrl-C back (cli.take_ctrl_c)
# once Hydra hands it the composed config.
EARLY_CTRL_C = "stopped: interrupted by Ctrl-C before the run started; nothing to resume"


def _early_ctrl_c(signum, frame):
    os.write(2, (EARLY_CTRL_C + "\n").encode())
    os._exit(130)


signal.signal(signal.SIGINT, _early_ctrl_c)

import hydra
from omegaconf import DictConfig

from metacl.cli import (
    EXIT_CTRL_C,
    EXIT_USER_ERROR,
    bad_resume_path,
    take_ctrl_c,
    unknown_choice,
    unknown_key,
    unwritable_output,
)
from metacl.resolvers import expand_aliases  # also registers ${metacl.run_dir:...}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    take_ctrl_c()
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from metacl.cli import ctrl_c_between_jobs, run_with_clean_errors
    from metacl.runner.main import main as run_main

    try:
        return run_with_clean_errors(run_main, cfg)
    finally:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            ctrl_c_between_jobs()  # until the next job takes Ctrl-C back


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
