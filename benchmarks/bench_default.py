"""Speed of a whole continual run (default: the default experiment), as `make bench` prints it.

    python benchmarks/bench_default.py                       # the default experiment
    python benchmarks/bench_default.py method=er seed=1      # any overrides

Prints train seconds (time inside the training loops, summed over tasks), total seconds and
stream samples per second, plus RA/BTI so a speed-up that changes results is visible.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from metacl.runner.main import main as run_main

CONF = Path(__file__).resolve().parents[1] / "conf"


def bench(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out, \
            initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", "save_checkpoints=false",
                                          f"paths.output_dir={out}", *overrides])
        run_main(cfg)
        results = json.loads((Path(out) / "results.json").read_text())
    samples = (cfg.dataset.samples_per_task or 0) * len(results["accuracy_matrix"])
    samples *= cfg.method.n_epochs
    timing, metrics = results["timing"], results["metrics"]
    return {
        "overrides": " ".join(overrides) or "(default experiment)",
        "train_seconds": round(timing["train_seconds"], 2),
        "total_seconds": round(timing["total_seconds"], 2),
        "samples_per_second": round(samples / timing["train_seconds"], 1) if samples else None,
        "intra_op_threads": torch.get_num_threads(),  # as the run left it (threads=auto)
        "RA": round(metrics["RA"], 4),
        "BTI": round(metrics["BTI"], 4),
    }


if __name__ == "__main__":
    print(json.dumps(bench(sys.argv[1:]), indent=2))
