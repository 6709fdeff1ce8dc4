"""Experiment loggers: one per run, shared by the fresh Trainer of every task.

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
    def start(self, config: dict, output_dir: str, name: str, group: str | None) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_matrix(self, matrix, png_path: str, step: int) -> None:
        pass

    def finish(self, summary: dict, status: str) -> None:
        pass


class CsvRunLogger(NullRunLogger):
    """Lightning's CSVLogger: <output_dir>/csv/metrics.csv and hparams.yaml."""

    def start(self, config, output_dir, name, group):
        from pytorch_lightning.loggers import CSVLogger

        self.logger = CSVLogger(save_dir=output_dir, name="csv", version="")
        self.logger.log_hyperparams(config)

    def log_metrics(self, metrics, step):
        self.logger.log_metrics(metrics, step=step)

    def finish(self, summary, status):
        self.logger.log_metrics({f"final/{k}": v for k, v in summary.items()})
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
    return "online" if _wandb_logged_in() and _wandb_reachable() else "offline"


class WandbRunLogger(NullRunLogger):
    def __init__(self, project: str = "metacl", entity: str | None = None, mode: str = "auto",
                 tags: list | None = None):
        self.project, self.entity, self.mode, self.tags = project, entity, mode, list(tags or [])
        self.logger = None

    def start(self, config, output_dir, name, group):
        from pytorch_lightning.loggers import WandbLogger

        self.mode = resolve_wandb_mode(self.mode)
        self.logger = WandbLogger(
            project=self.project, entity=self.entity, name=name, group=group, tags=self.tags,
            save_dir=output_dir, mode=self.mode, config=config,
        )
        self.run = self.logger.experiment  # starts the run now, not at the first metric
        # Per-task rows are plotted against the task index; the loss against the batch step.
        if hasattr(self.run, "define_metric"):
            self.run.define_metric("task")
            self.run.define_metric("acc/*", step_metric="task")

    def log_metrics(self, metrics, step):
        self.logger.log_metrics(metrics, step=step)

    def log_matrix(self, matrix, png_path, step):
        import wandb

        columns = [f"task_{u}" for u in range(len(matrix[0]))]
        rows = [[f"after_{t}"] + list(row) for t, row in enumerate(matrix)]
        self.run.log(
            {"accuracy_matrix": wandb.Table(columns=["row"] + columns, data=rows),
             "accuracy_heatmap": wandb.Image(png_path)},
            step=step,
        )

    def finish(self, summary, status):
        import wandb

        self.run.summary.update({**summary, "status": status})
        run_dir = getattr(self.run, "dir", None)
        wandb.finish(exit_code=0 if status == "completed" else 1)
        if self.mode == "offline" and run_dir:
            sync_dir = os.path.dirname(run_dir.rstrip("/"))
            print(f"W&B logged offline; upload this run with: wandb sync {sync_dir}",
                  file=sys.stderr)
