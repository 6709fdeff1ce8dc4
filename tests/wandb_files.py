"""Read offline W&B runs with wandb's own reader (`wandb leet inspect --json`), so tests check
what a `wandb sync` would upload rather than mocks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WANDB = str(Path(sys.executable).parent / "wandb")


def offline_runs(out_dir: Path) -> list[Path]:
    """The offline run folders under <out_dir>/wandb, oldest first."""
    return sorted((Path(out_dir) / "wandb").glob("offline-run-*"))


def records(run_dir: Path) -> list[dict]:
    """Every record of the run's .wandb file, decoded."""
    proc = subprocess.run([WANDB, "leet", "inspect", "--json", str(run_dir)],
                          capture_output=True, text=True, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def of_type(recs: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in recs if r.get("type") == kind]


def summary(recs: list[dict]) -> dict:
    """The run's final summary: the summary updates, in order (nested keys left as dicts)."""
    out: dict = {}
    for update in of_type(recs, "summary"):
        out.update(update.get("update", {}))
    return out


def config(recs: list[dict]) -> dict:
    out: dict = {}
    for run in of_type(recs, "run"):
        out.update(run.get("config", {}).get("update", {}))
    for update in of_type(recs, "config"):
        out.update(update.get("update", {}))
    return out
