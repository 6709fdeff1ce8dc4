"""The runner's Lightning callbacks: the stream (timing, progress, loss), in-task checkpoints,
few-shot validation and few-shot checkpoints; and how a fresh Trainer starts mid-training."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
from rich.progress import Progress

from metacl import checkpoint
from metacl.checkpoint import StopSignals
from metacl.runner.health import (
    check_finite_loss,
    check_finite_weights,
    check_last_loss,
    synchronize,
)


class StreamCallback(pl.Callback):
    """Times the training loop, drives the progress bar and logs the loss every few batches.

    `on_batch(step, batch_in_epoch, epoch)`, if given, runs after every batch (the continual
    loop's in-task checkpoints and stop signals)."""

    def __init__(self, progress: Progress, bar, run_logger, step: int, task: int,
                 log_every: int = 50, on_batch=None):
        self.progress, self.bar, self.run_logger = progress, bar, run_logger
        self.step, self.task, self.log_every = step, task, log_every
        self.on_batch = on_batch
        self.seconds = 0.0
        self.started: float | None = None

    def on_train_start(self, trainer, pl_module):
        synchronize(pl_module.device)
        self.started = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        synchronize(pl_module.device)
        self.seconds += time.perf_counter() - self.started
        self.started = None

    def elapsed(self) -> float:
        """Training seconds so far, including the epoch in progress."""
        running = 0.0 if self.started is None else time.perf_counter() - self.started
        return self.seconds + running

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step += 1
        if self.step % self.log_every == 0 and pl_module.last_loss is not None:
            loss = float(pl_module.last_loss)  # the only host sync, every log_every batches
            check_finite_loss(loss, self.task, self.step)
            self.run_logger.log_metrics({"train/loss": loss, "task": self.task}, self.step)
            self.progress.update(self.bar, loss=f"{loss:.3f}")
        self.progress.advance(self.bar)
        if self.on_batch is not None:
            self.on_batch(self, trainer, pl_module, batch_idx)


class InTaskCheckpoints:
    """Saves step.ckpt every `every` batches and when a stop signal is pending (then stops)."""

    def __init__(self, method, dm, path: Path, every: int, signals: StopSignals,
                 enabled: bool):
        self.method, self.dm, self.path, self.every = method, dm, path, every
        self.signals, self.enabled = signals, enabled
        self.task = 0
        self.base: dict = {}  # what the step checkpoint repeats from the loop's state

    def __call__(self, stream: StreamCallback, trainer, pl_module, batch_idx: int) -> None:
        stop = self.signals.pending
        due = self.every > 0 and stream.step % self.every == 0
        if not (stop is not None or due):
            return
        if self.enabled:
            self.save(stream, trainer, batch_idx)
        if stop is not None:
            self.signals.hand_over(stop)

    def save(self, stream: StreamCallback, trainer, batch_idx: int) -> None:
        method, loader = self.method, self.dm.train_loader
        check_last_loss(method, self.task, stream.step)  # never checkpoint a diverged state
        check_finite_weights(method, self.task, stream.step)
        done = loader.epoch_start_batch + batch_idx + 1
        epoch = trainer.current_epoch
        order = loader.order
        if done >= len(loader):  # the epoch is over: resume at the next one
            epoch, done, order = epoch + 1, 0, None
        state = {
            **self.base,
            **checkpoint.capture(method),
            "kind": "step",
            "step": stream.step,
            "train_seconds": self.base["train_seconds"] + stream.elapsed(),
            "position": {"task": self.task, "epoch": epoch, "batch": done,
                         "order": None if order is None else order.cpu()},
        }
        checkpoint.atomic_save(state, self.path)


class ValidationCallback(pl.Callback):
    """Few-shot: after every epoch, adapt on the fixed val episodes and log the result."""

    def __init__(self, evaluator, run_logger, stream: StreamCallback, metrics) -> None:
        self.evaluator, self.run_logger, self.stream = evaluator, run_logger, stream
        self.metrics = metrics  # (episode results, prefix, classification) -> metrics dict
        self.history: list[float] = []
        self.last: dict = {}  # the last evaluation's scalar val metrics
        self.seconds = 0.0

    def on_train_epoch_end(self, trainer, pl_module):
        self.evaluate(pl_module, trainer.current_epoch)

    def evaluate(self, method, epoch: int) -> None:
        """The val episodes after `epoch` (0-based), logged at the stream's step (also called
        by a population, which trains without a Trainer)."""
        synchronize(method.device)
        started = time.perf_counter()
        out = self.evaluator.episodes(method, "val")
        metrics = self.metrics(out, "val", method.classification)
        key = "val_acc" if method.classification else "val_mse"
        self.history.append(metrics[key])
        self.last = {k: v for k, v in metrics.items() if not isinstance(v, list)}
        self.run_logger.log_metrics({f"fewshot/{key}": metrics[key], "epoch": epoch},
                                    self.stream.step)
        self.seconds += time.perf_counter() - started


class EpisodicCheckpoints(pl.Callback):
    """Few-shot checkpoints/last.ckpt during meta-training: every `every` meta-batches, after
    every epoch (once its validation ran), and when a stop signal is pending (then stops).

    Inside an epoch the position is (epoch, meta-batches done); a save due on an epoch's last
    meta-batch waits for the epoch's end, so that a resumed run never skips a validation.
    ``on_batch`` is StreamCallback's per-batch hook; the callback itself must come after the
    ValidationCallback in the Trainer's list.
    """

    def __init__(self, save, every: int, signals: StopSignals) -> None:
        self.save, self.every, self.signals = save, every, signals

    def on_batch(self, stream: StreamCallback, trainer, pl_module, batch_idx: int) -> None:
        loader = trainer.datamodule.train_loader
        done = loader.epoch_start_batch + batch_idx + 1
        if done >= len(loader):
            return  # on_train_epoch_end saves
        stop = self.signals.pending
        if stop is not None or (self.every > 0 and stream.step % self.every == 0):
            self.save(trainer.current_epoch, done)
        if stop is not None:
            self.signals.hand_over(stop)

    def on_train_epoch_end(self, trainer, pl_module):
        self.save(trainer.current_epoch + 1, 0)
        if self.signals.pending is not None:
            self.signals.hand_over(self.signals.pending)


def start_mid_training(trainer, dm, position: dict, progress, bar,
                       batches_per_epoch: int) -> None:
    """Make a fresh Trainer begin at a stored epoch and batch (a task's, or few-shot
    meta-training's; see metacl.checkpoint): Lightning counts the epochs already done, the
    loader goes on from the next batch (replaying a stored shuffle order, if any)."""
    epoch, batch = int(position["epoch"]), int(position["batch"])
    epochs = trainer.fit_loop.epoch_progress
    for counter in (epochs.total, epochs.current):
        counter.ready = counter.started = counter.processed = counter.completed = epoch
    if batch or position.get("order") is not None:
        dm.resume_train_at(position.get("order"), batch)
    progress.advance(bar, epoch * batches_per_epoch + batch)
