"""Population runs side by side with one run (issue #16; docs/sweeps.md, "Population runs").

    python benchmarks/bench_population.py                    # 8 seeds of the default run
    python benchmarks/bench_population.py --members 32 trainer=gpu \\
        experiment=lamaml/lamaml_cifar100_single_pass        # any overrides
    python benchmarks/bench_population.py --separate         # also the 8 runs one by one

Each command is a fresh `train.py` process (imports, data, evaluation and files included):
  one       seed=0 alone
  population -m seed=0..N-1 hydra/launcher=population
  separate  (--separate) -m seed=0..N-1 with the basic launcher, one job after the other
and prints wall seconds, train seconds (time inside the training loops), the wall-time ratio
population / one and the throughput (N runs per population wall vs one run per its wall),
mean RA of the members (and of the separate runs, which a population must match within
seed noise), and the peak GPU memory per member on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> float:
    env = {**os.environ, "WANDB_MODE": "disabled", "METACL_ROOT_DIR": str(cwd)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          check=False,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"train.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return wall


def collect(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("results.json"))]


def summary(name: str, wall: float, results: list[dict]) -> dict:
    ras = [r["metrics"]["RA"] for r in results if r.get("status") == "completed"]
    row = {"command": name, "runs": len(results), "completed": len(ras),
           "wall_seconds": round(wall, 2),
           "train_seconds": round(max(r["timing"]["train_seconds"] for r in results), 2),
           "mean_RA": round(statistics.fmean(ras), 4) if ras else None}
    memory = [r.get("population", {}).get("peak_memory_per_member_mb") for r in results]
    if any(m is not None for m in memory):
        row["peak_memory_per_member_mb"] = max(m for m in memory if m is not None)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--separate", action="store_true",
                        help="also train the members one by one (mean RA comparison)")
    opts, overrides = parser.parse_known_args()
    base = ["logger=none", "save_checkpoints=false", *overrides]
    seeds = ",".join(str(s) for s in range(opts.members))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wall = run([*base, "seed=0", "hydra.run.dir=one"], tmp)
        rows.append(summary("one (seed=0)", wall, collect(tmp / "one")))
        wall = run(["-m", *base, f"seed={seeds}", "hydra/launcher=population",
                    "hydra.sweep.dir=population"], tmp)
        rows.append(summary(f"population ({opts.members} seeds)", wall,
                            collect(tmp / "population")))
        if opts.separate:
            wall = run(["-m", *base, f"seed={seeds}", "hydra.sweep.dir=separate"], tmp)
            rows.append(summary(f"separate ({opts.members} seeds, one by one)", wall,
                                collect(tmp / "separate")))
    one, pop = rows[0], rows[1]
    report = {
        "overrides": " ".join(overrides) or "(default experiment)",
        "rows": rows,
        "population_wall_over_one": round(pop["wall_seconds"] / one["wall_seconds"], 2),
        "population_train_over_one": round(pop["train_seconds"] / one["train_seconds"], 2),
        "throughput_vs_one": round(opts.members * one["wall_seconds"] / pop["wall_seconds"], 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
