"""`RunRecord`: the results.json of one run, the only code that knows its schema.

    config                     the resolved config (plus Hydra's choices and overrides)
    accuracy_matrix            R[t][u] task-aware, fractions (continual; null for few-shot)
    accuracy_matrix_agnostic   the same over the classes seen so far (class splits, else null)
    accuracy_before            b[u], the row before any training (continual)
    metrics                    RA, BTI, ... (continual) or test_acc, ... (few-shot)
    timing                     train_seconds, total_seconds, task_train_seconds (one per task)
    status                     running | completed | interrupted | diverged | failed: ...
    error                      the one-line reason, when not completed
    validation                 {accuracy_matrix, accuracy_before, metrics} with a validation split
    method_metrics             one dict per task, for methods that report their own statistics
    logger                     {run_id}: the logger's run (W&B), which a resume continues

It is rewritten atomically after every task (status `running`), so a stopped run still shows its
partial matrix; `metacl.report` reads it with `RunRecord.read`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from metacl.checkpoint import Interrupted
from metacl.runner.health import DivergedError

FILE = "results.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file and rename, so an interrupted run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def failure_status(err: BaseException) -> str:
    """status for a run that stopped early: `diverged` (NaN/inf), `interrupted` (a stop signal;
    a checkpoint was saved, resume with resume=true), else `failed: ...`."""
    if isinstance(err, DivergedError):
        return "diverged"
    if isinstance(err, Interrupted | KeyboardInterrupt | SystemExit):
        return "interrupted"  # SystemExit: submitit requeues the job after our checkpoint
    return f"failed: {type(err).__name__}: {err}"


class RunRecord:
    """results.json of the run in `out_dir`; `data` is the dict written there."""

    def __init__(self, out_dir: Path, data: dict, started: float | None = None):
        self.path = Path(out_dir) / FILE
        self.data = data
        self.started = time.perf_counter() if started is None else started
        self.elapsed_before = 0.0  # total seconds of the runs this one continues

    @classmethod
    def new(cls, out_dir: Path, config: dict, *, stream: bool, multi_head: bool = False,
            validation: bool = False, started: float | None = None) -> RunRecord:
        """A fresh record: `stream` for the continual protocol (matrices), else few-shot."""
        data = {
            "config": config,
            "accuracy_matrix": [] if stream else None,
            "accuracy_matrix_agnostic": [] if stream and multi_head else None,
            "accuracy_before": None,
            "metrics": None,
            "timing": {"train_seconds": 0.0, "total_seconds": 0.0},
            "status": "running",
        }
        if validation:  # task-aware accuracies on the held-out validation split
            data["validation"] = {"accuracy_matrix": [], "accuracy_before": None,
                                  "metrics": None}
        return cls(out_dir, data, started)

    @staticmethod
    def read(path: Path) -> dict:
        """A results.json as a dict (a run folder or the file itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / FILE
        return json.loads(path.read_text())

    def continue_from(self, stored: dict, config: dict) -> None:
        """Go on with a checkpointed run's record (resume): its rows, its timing."""
        stored.pop("error", None)
        stored.update(config=config, status="running")
        if "logger" in self.data:  # the logger's run as started now (the same id, or a
            stored["logger"] = self.data["logger"]  # new one if the run had none before)
        self.data = stored
        self.elapsed_before = float(stored["timing"]["total_seconds"])

    # ------------------------------------------------------------------ fields
    @property
    def timing(self) -> dict:
        return self.data["timing"]

    @property
    def validation(self) -> dict | None:
        return self.data.get("validation")

    @property
    def matrix(self) -> list:
        return self.data["accuracy_matrix"]

    def add_method_metrics(self, values: dict) -> None:
        self.data.setdefault("method_metrics", []).append(values)

    def mark_stopped(self, err: BaseException) -> None:
        """Record why the run stopped: `status` plus the one-line reason in `error`."""
        self.data["status"] = failure_status(err)
        self.data["error"] = f"{type(err).__name__}: {err}"

    def save(self) -> None:
        self.timing["total_seconds"] = (self.elapsed_before + time.perf_counter()
                                        - self.started)
        atomic_write_text(self.path, json.dumps(self.data, indent=2))
