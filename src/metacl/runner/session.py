"""The Session: one job's identity, its device, its results record, its logger, its stop
signals and its failure record.

Lightning moves a LightningModule back to the CPU when a `fit` ends (the strategy's teardown);
the Session puts the method back on the run's device after every Lightning call, so the code
between fits (after_task, evaluation, checkpoints) always finds model and data on one device.
Methods never move themselves, never write files and never read the config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console

from metacl.checkpoint import Interrupted, StopSignals
from metacl.runner.cpu import configure_cpu
from metacl.runner.job import job_info, resolved_config
from metacl.runner.record import RunRecord
from metacl.runner.trainer import build_trainer, run_device

log = logging.getLogger(__name__)
console = Console(stderr=True)


class Session:
    """Owns what one job shares between its loop, its callbacks and its files."""

    def __init__(self, cfg: DictConfig, out_dir: Path, started: float | None = None,
                 device: torch.device | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.started = time.perf_counter() if started is None else started
        self.job = job_info(cfg)
        self.config = resolved_config(cfg, self.job)
        self.device = run_device(cfg.trainer) if device is None else torch.device(device)
        if self.device.type == "cuda":  # ops that name no device land on the run's GPU too
            torch.cuda.set_device(self.device)
        self.signals = StopSignals()
        self.record: RunRecord | None = None
        self.logger = None
        self.save_checkpoints = bool(cfg.get("save_checkpoints", True))
        self.checkpoint_every = int(cfg.get("checkpoint", {}).get("every_n_steps", 0) or 0)

    @property
    def name(self) -> str:
        return self.job.name

    # ------------------------------------------------------------------ building
    def build_method(self, info, **info_kwarg):
        """Backbone for the data's shapes, the job's CPU settings, the method, on the device.
        `info_kwarg` names how the method receives `info` (task_info= or episode_info=)."""
        backbone = instantiate(self.cfg.model, input_shape=info.input_shape,
                               n_outputs=info.n_outputs)
        configure_cpu(self.cfg, self.device, backbone)
        # _partial_: the backbone and the info are objects, not config values to merge.
        method = instantiate(self.cfg.method, _partial_=True)(backbone=backbone, **info_kwarg)
        return self.place(method)

    def start(self, record: RunRecord) -> None:
        """Take the run's record and start its logger (one run of it per job)."""
        self.record = record
        self.logger = instantiate(self.cfg.logger)
        self.logger.start(self.config, str(self.out_dir), self.job.name, self.job.group,
                          tags=self.job.tags, job_type=self.job.job_type)

    def trainer(self, callbacks: list, **overrides) -> pl.Trainer:
        return build_trainer(self.cfg.trainer, callbacks, **overrides)

    # ------------------------------------------------------------------ Lightning calls
    def place(self, method):
        """The method on the run's device (Parameter objects kept, so optimizers stay valid)."""
        return method.to(self.device)

    def fit(self, trainer: pl.Trainer, method, datamodule) -> None:
        """trainer.fit, then the method back on the run's device (Lightning's teardown moved
        it to the CPU), also when the fit stopped with an exception."""
        try:
            trainer.fit(method, datamodule=datamodule)
        finally:
            self.place(method)

    # ------------------------------------------------------------------ endings
    def fail(self, err: BaseException, summary: dict) -> None:
        """Record why the run stopped, save the record and close the logger."""
        if isinstance(err, Interrupted):
            err.saved = self.save_checkpoints
        self.record.mark_stopped(err)
        self.record.save()
        if isinstance(err, Interrupted) and err.saved:
            console.print(f"checkpoint saved; resume with: python train.py <same overrides> "
                          f"resume={self.out_dir}", soft_wrap=True)
        try:
            self.logger.finish(summary, "failed", files=[str(self.record.path)])
        except Exception as log_err:  # noqa: BLE001  (never hide the real error behind it)
            log.warning("the logger could not finish: %s", log_err)
