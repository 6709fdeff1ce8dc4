"""The episodic loop: meta-train on fresh meta-batches, then adapt on the fixed test episodes.

    method = Method(backbone, episode_info)            # a MetaLearner (metacl.fewshot.base)
    Trainer.fit(method, datamodule)                    # n_epochs x meta_batches_per_epoch
        after each epoch: adapt on the fixed val episodes, log val accuracy
    test = Evaluator.episodes(method, "test")          # (episodes, inner steps + 1)
    results.json: mean and 95% CI after every inner step (step 0 = before adaptation)
    checkpoints/last.ckpt: during meta-training and at the end; resume=true continues a run
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from metacl import checkpoint
from metacl.errors import ConfigError
from metacl.runner.callbacks import (
    EpisodicCheckpoints,
    StreamCallback,
    ValidationCallback,
    start_mid_training,
)
from metacl.runner.evaluator import Evaluator
from metacl.runner.health import check_finite_weights, check_last_loss
from metacl.runner.record import RunRecord
from metacl.runner.session import Session, console, say

# train.yaml's default optimized_metric is the continual one; few-shot runs that leave it
# unset return their primary metric instead (test_acc, or test_mse for regression).
CONTINUAL_DEFAULT_METRIC = "RA"
Z_95 = 1.96  # normal quantile of the reference's 95% intervals (1.96 * std / sqrt(episodes))


def summarize(values: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-step mean and 95% confidence half-width over episodes, values (E, S + 1)."""
    values = values.double().cpu()
    mean = values.mean(0)
    # Population std, as the reference (np.std) computes it.
    ci95 = Z_95 * values.std(0, correction=0) / math.sqrt(values.shape[0])
    return mean.tolist(), ci95.tolist()


def episode_metrics(out: dict, prefix: str, classification: bool) -> dict:
    """metrics.<prefix>_acc / _acc_ci95 / _acc_per_step ... (or _mse for regression)."""
    losses, loss_ci = summarize(out["loss"])
    metrics: dict = {f"{prefix}_episodes": int(out["loss"].shape[0])}
    if classification:
        accs, acc_ci = summarize(out["acc"])
        metrics.update({
            f"{prefix}_acc": accs[-1],
            f"{prefix}_acc_ci95": acc_ci[-1],
            f"{prefix}_acc_per_step": accs,
            f"{prefix}_acc_ci95_per_step": acc_ci,
            f"{prefix}_loss_per_step": losses,
        })
    else:
        metrics.update({
            f"{prefix}_mse": losses[-1],
            f"{prefix}_mse_ci95": loss_ci[-1],
            f"{prefix}_mse_per_step": losses,
            f"{prefix}_mse_ci95_per_step": loss_ci,
        })
    return metrics


def optimized_metric(cfg: DictConfig, classification: bool, has_val: bool) -> str:
    """The metrics key to return; ``test/acc`` is accepted for ``test_acc`` (and so on)."""
    primary = "test_acc" if classification else "test_mse"
    metric = cfg.get("optimized_metric") or primary
    if metric == CONTINUAL_DEFAULT_METRIC:
        return primary
    stem = "acc" if classification else "mse"
    allowed = [f"{p}_{stem}{s}" for p in ("test", "val") for s in ("", "_ci95")]
    key = metric.replace("/", "_")
    if key not in allowed:
        raise ConfigError(f"optimized_metric={metric} is not a metric of this few-shot run; "
                          f"allowed: {', '.join(allowed)}")
    if key.startswith("val") and not has_val:
        raise ConfigError(f"optimized_metric={metric} needs validation episodes; set "
                          "dataset.val_episodes above 0")
    return key


def finished_metric(cfg: DictConfig, results: dict) -> float:
    """The optimized metric of a finished few-shot run's results (a resume with nothing left)."""
    metrics = results["metrics"]
    classification = "test_acc" in metrics
    has_val = any(k.startswith("val_") for k in metrics)
    return metrics[optimized_metric(cfg, classification, has_val)]


class EpisodicLoop:
    """start or resume, meta-train, test, finish (module docstring)."""

    def __init__(self, session: Session, dm, resume=None):
        cfg, info = session.cfg, dm.episode_info
        self.session, self.dm, self.info, self.resume = session, dm, info, resume
        self.metric = optimized_metric(cfg, info.classification, bool(dm.n_episodes["val"]))
        self.method = session.build_method(info, episode_info=info)
        dm.meta_batch_size = self.method.meta_batch_size
        session.start(RunRecord.new(session.out_dir, session.config, stream=False,
                                    started=session.started), resume=resume)
        self.record, self.evaluator = session.record, Evaluator(dm)
        self.ckpt_path = session.out_dir / "checkpoints" / checkpoint.BOUNDARY_FILE
        self.max_epochs = int(cfg.trainer.max_epochs)
        self.train_before = 0.0  # training seconds of the runs this one continues
        self.progress = Progress(TextColumn("[bold]meta-train"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                                 TimeElapsedColumn(), console=console, transient=True)
        self.bar = self.progress.add_task(
            "", total=dm.meta_batches_per_epoch * self.max_epochs, task="", loss="-")
        self.saver = EpisodicCheckpoints(self.save_state, session.checkpoint_every,
                                         session.signals)
        self.stream = StreamCallback(self.progress, self.bar, session.logger, 0, 0,
                                     on_batch=self.saver.on_batch)
        self.validation = ValidationCallback(self.evaluator, session.logger, self.stream,
                                             episode_metrics)
        self.position = {"epoch": 0, "batch": 0}

    def train_seconds(self) -> float:
        return self.train_before + self.stream.elapsed() - self.validation.seconds

    def save_state(self, epoch: int, batch: int) -> None:
        """last.ckpt: everything needed to go on after `batch` meta-batches of `epoch`."""
        if not self.session.save_checkpoints:
            return
        check_last_loss(self.method, 0, self.stream.step)  # never checkpoint a diverged state
        check_finite_weights(self.method, 0, self.stream.step)
        self.ckpt_path.parent.mkdir(exist_ok=True)
        config, validation = self.session.config, self.validation
        state = {"format": checkpoint.FORMAT_VERSION, "kind": "episodic", "config": config,
                 "config_hash": checkpoint.config_hash(config), "results": self.record.data,
                 "step": self.stream.step, "position": {"epoch": epoch, "batch": batch},
                 "train_seconds": self.train_seconds(),
                 "validation": {"history": validation.history, "last": validation.last},
                 "generator": self.dm.generator.get_state(), **checkpoint.capture(self.method)}
        checkpoint.atomic_save(state, self.ckpt_path)

    def continue_checkpoint(self) -> None:
        """Resume from last.ckpt: weights, optimizer and LR-schedule states, random states
        (the episode generator's included), the validation history and the position."""
        state = self.resume.boundary
        self.record.continue_from(state["results"], self.session.config)
        self.train_before = float(state["train_seconds"])
        checkpoint.restore(self.method, state)
        self.dm.generator.set_state(state["generator"])
        self.stream.step, self.position = int(state["step"]), state["position"]
        self.validation.history = list(state["validation"]["history"])
        self.validation.last = dict(state["validation"]["last"])
        diff = self.resume.config_diff
        say(f"resuming {self.session.out_dir} at epoch {self.position['epoch']}, "
                      f"meta-batch {self.position['batch']}" + (
                          f" (config differs at {', '.join(diff)}; resume.force=true)"
                          if diff else ""))

    def meta_train(self) -> None:
        if self.position["epoch"] >= self.max_epochs:
            return
        callbacks = [self.stream] + ([self.validation] if self.dm.n_episodes["val"] else [])
        # Evaluation adapts with gradients, so inference mode stays off whatever the trainer
        # config says.
        trainer = self.session.trainer(callbacks + [self.saver], inference_mode=False)
        if self.position["epoch"] or self.position["batch"]:
            start_mid_training(trainer, self.dm, self.position, self.progress, self.bar,
                               self.dm.meta_batches_per_epoch)
        self.session.fit(trainer, self.method, self.dm)

    def test(self) -> dict:
        """Adapt on the fixed test episodes; the run's metrics (val history included)."""
        classification = self.info.classification
        metrics = episode_metrics(self.evaluator.episodes(self.method, "test"), "test",
                                  classification)
        if self.validation.history:
            key = "val_acc" if classification else "val_mse"
            metrics.update(self.validation.last)
            metrics[f"{key}_per_epoch"] = self.validation.history
        return metrics

    def run(self) -> float:
        """The whole run: resume or start, meta-train, finish; the optimized metric."""
        session = self.session
        if self.resume is not None:
            self.continue_checkpoint()
        try:
            with session.signals, self.progress:
                self.meta_train()
            self.finish()
        except BaseException as err:
            self.fail(err)
            raise
        return self.report()

    # ------------------------------------------------------------------ endings
    # A population (metacl.population.episodic) trains its members together, then calls these
    # for every member, so a member's folder, results and logger end as its separate run's.
    def finish(self) -> None:
        """After meta-training: test, results.json, the final checkpoint, the logger."""
        session, record = self.session, self.record
        stem = "acc" if self.info.classification else "mse"
        record.timing["train_seconds"] = self.train_seconds()
        metrics = self.test()
        record.data["metrics"] = metrics
        record.data["status"] = "completed"
        record.save()
        self.save_state(self.max_epochs, 0)  # the trained learner; resume=true reports it
        session.logger.log_metrics({f"fewshot/test_{stem}_step_{k}": v for k, v in
                                    enumerate(metrics[f"test_{stem}_per_step"])},
                                   self.stream.step)
        session.finish({k: v for k, v in metrics.items() if not isinstance(v, list)})

    def summary(self) -> dict:
        return self.record.data["metrics"] or {}

    def fail(self, err: BaseException) -> None:
        """Record why the run stopped (its training time so far), close the logger."""
        self.record.timing["train_seconds"] = self.train_seconds()
        self.session.fail(err, self.summary())

    def report(self) -> float:
        """The finished run's line; its optimized metric."""
        session, record = self.session, self.record
        stem = "acc" if self.info.classification else "mse"
        metrics = record.data["metrics"]
        timing, per_step = record.timing, metrics[f"test_{stem}_per_step"]
        say(
            f"[bold]{session.name}[/bold]: test_{stem} {metrics[f'test_{stem}']:.4f} ± "
            f"{metrics[f'test_{stem}_ci95']:.4f} ({self.dm.describe()}, "
            f"{metrics['test_episodes']} episodes; step 0 {per_step[0]:.4f})  "
            f"train {timing['train_seconds']:.1f} s  total {timing['total_seconds']:.1f} s\n"
            f"results: {record.path}")
        return metrics[self.metric]
