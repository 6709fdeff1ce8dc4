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
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console

from metacl import checkpoint
from metacl.checkpoint import Interrupted, StopSignals
from metacl.errors import ConfigError
from metacl.loggers import LightningBridge, prewarm
from metacl.runner.callbacks import StreamCallback
from metacl.runner.cpu import configure_cpu
from metacl.runner.extras import apply_extras
from metacl.runner.job import job_info, resolved_config
from metacl.runner.record import RunRecord
from metacl.runner.trainer import auto_device, build_trainer, run_device

log = logging.getLogger(__name__)
# A method's self.log is flushed every log_every_n_steps batches and at the end of each fit;
# short debug tasks need no warning about it.
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
# soft_wrap: messages and paths are never broken at 80 columns when stderr is a file, a pipe
# (tee) or a SLURM log; a terminal still wraps them itself.
console = Console(stderr=True, soft_wrap=True)


def say(text: str, show: bool = True) -> None:
    """A run message: in the job's log file (train.log) and, if `show`, on the console."""
    if show:
        console.print(text)
    log.info(Console(width=10_000, markup=True).render_str(text).plain)


def user_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The `callbacks` group: one Lightning callback per entry with a `_target_`
    (`callbacks=lr_monitor`, `+callbacks.mine._target_=pkg.MyCallback`), built once per job
    and added to every task's Trainer after the runner's own."""
    built = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node:
            continue
        try:
            callback = instantiate(node)
        except Exception as err:  # noqa: BLE001  (a config mistake: one line, exit 2)
            raise ConfigError(f"callbacks.{name} could not be built: {err}") from None
        if not isinstance(callback, pl.Callback):
            raise ConfigError(f"callbacks.{name}: {node._target_} is not a Lightning "
                              "Callback (pytorch_lightning.Callback)")
        built.append(callback)
    return built


class Session:
    """Owns what one job shares between its loop, its callbacks and its files."""

    def __init__(self, cfg: DictConfig, out_dir: Path, started: float | None = None,
                 device: torch.device | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.started = time.perf_counter() if started is None else started
        self.job = job_info(cfg)
        self.config = resolved_config(cfg, self.job)
        # The trainer settings of every fit: cfg.trainer, with `auto` resolved for a backbone
        # that declares a GPU cannot win for it (its note is printed).
        self.trainer_cfg, note = auto_device(cfg.trainer, cfg.get("model"))
        if note and device is None:
            say(note)
        self.device = run_device(self.trainer_cfg) if device is None else torch.device(device)
        if self.device.type == "cuda":  # ops that name no device land on the run's GPU too
            torch.cuda.set_device(self.device)
        self.signals = StopSignals()
        self.record: RunRecord | None = None
        self.logger = None
        self.save_checkpoints = bool(cfg.get("save_checkpoints", True))
        self.checkpoint_every = int(cfg.get("checkpoint", {}).get("every_n_steps", 0) or 0)
        self.callbacks = user_callbacks(cfg)
        prewarm(cfg.get("logger"))  # W&B's import and service start overlap the data build
        apply_extras(cfg, console)

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

    def start(self, record: RunRecord, resume=None) -> None:
        """Take the run's record and start its logger (one run of it per job). A resumed run
        goes on in the logger's run named in its checkpoint (results.json's `logger.run_id`)."""
        self.record = record
        self.logger = instantiate(self.cfg.logger)
        previous = {} if resume is None else resume.boundary["results"].get("logger") or {}
        self.logger.start(self.config, str(self.out_dir), self.job.name, self.job.group,
                          tags=self.job.tags, job_type=self.job.job_type,
                          run_id=previous.get("run_id"))
        if self.logger.run_id is not None:  # saved with the record, so in every checkpoint
            record.data["logger"] = {"run_id": self.logger.run_id}
        say(f"{self.name}: output in {self.out_dir} (device {self.device})", show=False)

    def trainer(self, callbacks: list, **overrides) -> pl.Trainer:
        """A fresh Trainer: the runner's callbacks, then the `callbacks` group's; its logger
        bridges `self.log` in methods to the run's logger at the run's step."""
        stream = next((c for c in callbacks if isinstance(c, StreamCallback)), None)
        bridge = LightningBridge(self.logger, (lambda: stream.step) if stream else (lambda: 0))
        return build_trainer(self.trainer_cfg, [*callbacks, *self.callbacks], logger=bridge,
                             **overrides)

    def finish(self, summary: dict) -> None:
        """Close the logger of a completed run: the summary, results.json and (logger
        option log_model) the final checkpoint."""
        model = self.out_dir / "checkpoints" / checkpoint.BOUNDARY_FILE
        self.logger.finish(summary, "completed", files=[str(self.record.path)],
                           model=str(model) if model.exists() else None)

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
            say(f"checkpoint saved; resume with: python train.py <same overrides> "
                f"resume={self.out_dir}")
        status = self.record.data["status"]
        try:
            self.logger.finish(summary, status, files=[str(self.record.path)],
                               exit_code=getattr(err, "exit_code", 255 if status ==
                                                 "interrupted" else 1))
        except Exception as log_err:  # noqa: BLE001  (never hide the real error behind it)
            log.warning("the logger could not finish: %s", log_err)
