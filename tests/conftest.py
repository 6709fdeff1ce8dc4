import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
# Runs started by tests write outputs/ under their own (temporary) folder, not the project's.
os.environ.setdefault("METACL_ROOT_DIR", ".")
# Tiny tensors: one intra-op thread is faster than two cores waiting on each other.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Subprocesses (train.py in a temporary folder) import this checkout's code, not whichever
# metacl a relative PYTHONPATH or an editable install elsewhere would find from there.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT / "src"), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                          if p and p != "src")])


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture
def compose():
    return compose_cfg


def train_in_this_process(args: list[str], monkeypatch):
    """`python train.py *args` run in this process, from the current folder: a monkeypatch
    reaches it, and it spares a subprocess's interpreter start and imports (~7 s). Returns the
    SIGINT handler the run left behind; Hydra's global state, the logging Hydra configured,
    SIGINT and the multirun summary are put back afterwards."""
    import logging
    import runpy
    import signal
    import sys

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from metacl.runner import summary

    handlers, level = logging.root.handlers[:], logging.root.level
    previous = signal.getsignal(signal.SIGINT)
    summary.failed_jobs.clear()
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py"), *args])
    GlobalHydra.instance().clear()
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
        return signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
