"""Population runs side by side with one run (issue #16; docs/sweeps.md, "Population runs").

    python benchmarks/bench_population.py                    # 8 seeds of the default run
    python benchmarks/bench_population.py --members 32 trainer=gpu \\
        experiment=lamaml/lamaml_cifar100_single_pass        # any overrides
    python benchmarks/bench_population.py --separate         # also the 8 runs one by one
    python benchmarks/bench_population.py --rounds 3         # one/population, three times
    python benchmarks/bench_population.py --members 32 --cifar-lookalike 500 trainer=gpu \
        experiment=lamaml/lamaml_cifar100_single_pass        # no CIFAR-100 files at hand

Each command is a fresh `train.py` process (imports, data, evaluation and files included):
  one       seed=0 alone
  population -m seed=0..N-1 hydra/launcher=population
  separate  (--separate) -m seed=0..N-1 with the basic launcher, one job after the other
and prints wall seconds, train seconds (time inside the training loops), the wall-time ratio
population / one and the throughput (N runs per population wall vs one run per its wall),
mean RA of the members (and of the separate runs, which a population must match within
seed noise), and the peak GPU memory per member on a GPU. A shared VM's speed drifts by
10-20% over minutes, so one run and the population are measured interleaved, `--rounds`
times (default 2): each round's ratio is printed as it ends, the report gives the medians.
`--cifar-lookalike K` trains on a CIFAR-10/100 lookalike with K training images per class,
written in torchvision's layout (tests/fixtures.py; same shapes and class counts, learnable
colour patterns), for machines without the real files (the lent GPU machine has no network).
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
sys.path.insert(0, str(ROOT / "tests"))


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
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of one run then the population (medians are reported)")
    parser.add_argument("--cifar-lookalike", type=int, default=0, metavar="K",
                        help="CIFAR-10 and -100 lookalikes with K images per class as data_dir")
    opts, overrides = parser.parse_known_args()
    base = ["logger=none", "save_checkpoints=false", *overrides]
    seeds = ",".join(str(s) for s in range(opts.members))
    ones, pops, rounds = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if opts.cifar_lookalike:
            from fixtures import write_cifar

            k = opts.cifar_lookalike
            for classes in (10, 100):
                write_cifar(tmp / "data", classes, train_per_class=k,
                            test_per_class=max(2, k // 5))
            base += [f"data_dir={tmp / 'data'}", "dataset.source.verify_md5=false"]
        for r in range(opts.rounds):
            wall = run([*base, "seed=0", f"hydra.run.dir=one{r}"], tmp)
            ones.append(summary("one (seed=0)", wall, collect(tmp / f"one{r}")))
            wall = run(["-m", *base, f"seed={seeds}", "hydra/launcher=population",
                        f"hydra.sweep.dir=population{r}"], tmp)
            pops.append(summary(f"population ({opts.members} seeds)", wall,
                                collect(tmp / f"population{r}")))
            rounds.append(round(pops[-1]["wall_seconds"] / ones[-1]["wall_seconds"], 2))
            print(json.dumps({"round": r, "one": ones[-1], "population": pops[-1],
                              "population_wall_over_one": rounds[-1]}), flush=True)
        rows = [median_row(ones), median_row(pops)]
        if opts.separate:
            wall = run(["-m", *base, f"seed={seeds}", "hydra.sweep.dir=separate"], tmp)
            rows.append(summary(f"separate ({opts.members} seeds, one by one)", wall,
                                collect(tmp / "separate")))
    one, pop = rows[0], rows[1]
    report = {
        "overrides": " ".join(overrides) or "(default experiment)",
        "rounds": opts.rounds,
        "rows (medians over the rounds)": rows,
        "population_wall_over_one": round(pop["wall_seconds"] / one["wall_seconds"], 2),
        "per_round_wall_over_one": rounds,
        "population_train_over_one": round(pop["train_seconds"] / one["train_seconds"], 2),
        "throughput_vs_one": round(opts.members * one["wall_seconds"] / pop["wall_seconds"], 2),
    }
    print(json.dumps(report, indent=2))


def median_row(rows: list[dict]) -> dict:
    """The rows' medians of the timings (the first row's other fields: every round trains the
    same runs, so their RA does not change)."""
    out = dict(rows[0])
    for key in ("wall_seconds", "train_seconds"):
        out[key] = round(statistics.median(r[key] for r in rows), 2)
    return out


if __name__ == "__main__":
    main()
