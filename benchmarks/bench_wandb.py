"""What W&B adds to a run: the same run with logger=none and logger=wandb (offline), side by
side, each in a fresh process (so importing wandb and starting its service count).

    python benchmarks/bench_wandb.py                 # method=er, 2 rounds
    python benchmarks/bench_wandb.py method=lamaml --rounds 3

Prints the wall time and CPU time of each process and the run's own total_seconds (results.json), the
median of each logger and W&B's overhead in percent. The goal is at most 15% on a default run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children_cpu() -> float:
    """CPU seconds of finished child processes (theirs and their children's, W&B's service
    included): less sensitive than wall time to other work on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(logger: str, overrides: list[str], work: Path) -> dict:
    out = work / f"{logger}-{time.monotonic_ns()}"
    # This checkout's code, wherever the benchmark is started from.
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline" if logger == "wandb" else "disabled",
           "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(work / "wandb_config"),
           "WANDB_CACHE_DIR": str(work / "wandb_cache"), "WANDB_DATA_DIR": str(work / "wandb_data")}
    started, cpu_before = time.perf_counter(), _children_cpu()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"logger={logger}",
                           f"hydra.run.dir={out}", *overrides], cwd=work, env=env,
                          capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - started, _children_cpu() - cpu_before
    if proc.returncode != 0:
        raise SystemExit(f"{logger} run failed:\n{proc.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    return {"wall": wall, "cpu": cpu, "total": results["timing"]["total_seconds"],
            "matrix": results["accuracy_matrix"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args, overrides = parser.parse_known_args()
    overrides = overrides or ["method=er"]
    runs: dict[str, list[dict]] = {"none": [], "wandb": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # alternate, so drifting machine load hits both
            for logger in ("none", "wandb"):
                run = one_run(logger, overrides, Path(tmp))
                runs[logger].append(run)
                print(f"round {r} {logger:5s}: wall {run['wall']:6.2f} s  cpu {run['cpu']:6.2f} s"
                      f"  run total {run['total']:6.2f} s", flush=True)
    same = all(run["matrix"] == runs["none"][0]["matrix"] for v in runs.values() for run in v)
    wall = {k: statistics.median(run["wall"] for run in v) for k, v in runs.items()}
    cpu = {k: statistics.median(run["cpu"] for run in v) for k, v in runs.items()}
    total = {k: statistics.median(run["total"] for run in v) for k, v in runs.items()}
    print(json.dumps({
        "overrides": " ".join(overrides), "rounds": args.rounds,
        "median_wall_seconds": {k: round(v, 2) for k, v in wall.items()},
        "median_cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
        "median_run_total_seconds": {k: round(v, 2) for k, v in total.items()},
        "wandb_overhead_wall_percent": round(100 * (wall["wandb"] / wall["none"] - 1), 1),
        "wandb_overhead_cpu_percent": round(100 * (cpu["wandb"] / cpu["none"] - 1), 1),
        "wandb_overhead_run_total_percent": round(100 * (total["wandb"] / total["none"] - 1), 1),
        "same_accuracy_matrices": same,
    }, indent=2))


if __name__ == "__main__":
    main()
