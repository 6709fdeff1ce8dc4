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
