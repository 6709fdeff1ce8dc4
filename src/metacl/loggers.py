"""Experiment loggers: one per run (one per job of a sweep), shared by the fresh Trainer of every task.

The loop drives them through five calls:

    start(config, output_dir, name, group, tags, job_type)   # once, config already resolved
    log_metrics(metrics, step)                                # training loss every few batches
    log_task(task, row, metrics, step, png_path)              # after each task: accuracy row,
                                                              # metrics so far, heatmap so far
    log_matrix(matrix, png_path, step, name)                  # at the end: the whole matrix
    finish(summary, status, files)                            # final metrics, results.json

The loop logs with an explicit cumulative step (and a `task` value), because manual-optimization
methods do not advance Lightning's global_step in a meaningful way.
"""

from __future__ import annotations

import netrc
import os
import socket
import sys
from urllib.parse import urlparse


class NullRunLogger:
    wants_images = False  # whether log_task wants a heatmap PNG of the matrix so far

    def start(self, config: dict, output_dir: str, name: str, group: str | None,
              tags: list[str] | None = None, job_type: str | None = None) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_task(self, task: int, row: list[float], metrics: dict, step: int,
                 png_path: str | None = None) -> None:
        """After task `task`: its accuracy row R[task][:] and the metrics so far (prefixed keys,
        e.g. test/RA, val/RA)."""

    def log_matrix(self, matrix, png_path: str | None, step: int,
                   name: str = "accuracy_matrix") -> None:
        pass

    def finish(self, summary: dict, status: str, files: tuple | list = ()) -> None:
        pass


def _row_metrics(task: int, row: list[float], metrics: dict) -> dict:
    out = {f"acc/task_{u}": a for u, a in enumerate(row)}
    out["acc/mean_seen"] = sum(row[: task + 1]) / (task + 1)
    out.update(metrics)
    out["task"] = task
    return out


class CsvRunLogger(NullRunLogger):
    """Lightning's CSVLogger: <output_dir>/csv/metrics.csv and hparams.yaml."""

    def start(self, config, output_dir, name, group, tags=None, job_type=None):
        from pytorch_lightning.loggers import CSVLogger

        self.logger = CSVLogger(save_dir=output_dir, name="csv", version="")
        self.logger.log_hyperparams(config)

    def log_metrics(self, metrics, step):
        self.logger.log_metrics(metrics, step=step)

    def log_task(self, task, row, metrics, step, png_path=None):
        self.logger.log_metrics(_row_metrics(task, row, metrics), step=step)

    def finish(self, summary, status, files=()):
        self.logger.log_metrics({f"final/{k}": v for k, v in summary.items()
                                 if isinstance(v, (int, float))})
        self.logger.finalize(status)


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb_reachable(timeout: float = 2.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str) -> str:
    """`auto`: online only when logged in and the server answers within 2 s, else offline.

    Checking first avoids wandb.init's long network timeouts on machines without network.
    WANDB_MODE in the environment always wins (tests set it to `disabled`).
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    if not _wandb_logged_in():
        reason = "not logged in (wandb login)"
    elif not _wandb_reachable():
        reason = "the W&B server does not answer"
    else:
        return "online"
    print(f"W&B: {reason}; logging offline into the run folder (wandb sync it later)",
          file=sys.stderr)
    return "offline"


class WandbRunLogger(NullRunLogger):
    """One W&B run per job; `wandb.finish()` at the end of every job, so the jobs of a sweep
    that share a process (joblib, Optuna's in-process trials) never share a run.

    group: the W&B group; null = the sweep (its output folder) in a multirun, none for a single
    run, so W&B can average the seeds of one configuration. job_type: null = `train`, `sweep`
    or `hparams_search` (set by the loop). tags: added to the method and dataset names.
    """

    wants_images = True

    def __init__(self, project: str = "metacl", entity: str | None = None, mode: str = "auto",
                 tags: list | None = None, group: str | None = None,
                 job_type: str | None = None):
        self.project, self.entity, self.mode, self.tags = project, entity, mode, list(tags or [])
        self.group, self.job_type = group, job_type
        self.run = None

    def start(self, config, output_dir, name, group, tags=None, job_type=None):
        import wandb

        self.mode = resolve_wandb_mode(self.mode)
        all_tags = list(dict.fromkeys([*self.tags, *(tags or [])]))  # ordered, no repeats
        self.run = wandb.init(
            project=self.project, entity=self.entity, name=name,
            group=self.group or group, job_type=self.job_type or job_type,
            tags=[str(t)[:64] for t in all_tags], config=config, dir=output_dir, mode=self.mode,
        )
        # Per-task values are plotted against the task index; the loss against the batch step.
        self.run.define_metric("trainer/global_step")
        self.run.define_metric("train/*", step_metric="trainer/global_step")
        self.run.define_metric("task")
        for key in ("acc/*", "test/*", "val/*", "accuracy_heatmap"):
            self.run.define_metric(key, step_metric="task")

    def log_metrics(self, metrics, step):
        self.run.log({**metrics, "trainer/global_step": step})

    def log_task(self, task, row, metrics, step, png_path=None):
        import wandb

        values = _row_metrics(task, row, metrics)
        values["trainer/global_step"] = step
        if png_path:
            values["accuracy_heatmap"] = wandb.Image(png_path)
        self.run.log(values)

    def log_matrix(self, matrix, png_path, step, name="accuracy_matrix"):
        import wandb

        columns = ["after_task"] + [f"task_{u}" for u in range(len(matrix[0]))]
        rows = [[t] + [float(a) for a in row] for t, row in enumerate(matrix)]
        values = {name: wandb.Table(columns=columns, data=rows), "trainer/global_step": step}
        if png_path:
            values[f"{name}_heatmap"] = wandb.Image(png_path)
        self.run.log(values)

    def finish(self, summary, status, files=()):
        import wandb

        self.run.summary.update({**summary, "status": status})
        existing = [f for f in files if os.path.exists(f)]
        if existing and self.mode != "disabled":
            # results.json (and friends) as a versioned artifact of this run.
            artifact = wandb.Artifact(f"results-{self.run.id}", type="results",
                                      metadata={"status": status})
            for path in existing:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)
        run_dir = getattr(self.run, "dir", None)
        self.run.finish(exit_code=0 if status == "completed" else 1)
        self.run = None
        if self.mode == "offline" and run_dir:
            sync_dir = os.path.dirname(run_dir.rstrip("/"))
            print(f"W&B logged offline; upload this run with: wandb sync {sync_dir}",
                  file=sys.stderr)
