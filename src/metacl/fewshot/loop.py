"""The episodic loop: meta-train on fresh meta-batches, then adapt on the fixed test episodes.

    method = Method(backbone, episode_info)            # a MetaLearner (metacl.fewshot.base)
    Trainer.fit(method, datamodule)                    # n_epochs x meta_batches_per_epoch
        after each epoch: adapt on the fixed val episodes, log val accuracy
    test = method.evaluate(test episodes)              # (episodes, inner steps + 1)
    results.json: mean and 95% CI after every inner step (step 0 = before adaptation)
    checkpoints/last.ckpt: during meta-training and at the end; resume=true continues a run

``metacl.run.main`` calls ``run_episodic`` for datamodules whose ``protocol`` is "episodic" (and
refuses methods whose class ``protocol`` differs).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from metacl import checkpoint
from metacl.checkpoint import Interrupted, StopSignals
from metacl.errors import ConfigError
from metacl.run import (
    StreamCallback,
    _atomic_write,
    _check_finite_loss,
    _check_finite_weights,
    _synchronize,
    configure_cpu,
    console,
    mark_stopped,
    new_results,
    start_mid_training,
    start_run,
)

log = logging.getLogger(__name__)

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


class ValidationCallback(pl.Callback):
    """After every epoch: adapt on the fixed val episodes and log the result."""

    def __init__(self, dm, run_logger, stream: StreamCallback) -> None:
        self.dm, self.run_logger, self.stream = dm, run_logger, stream
        self.history: list[float] = []
        self.last: dict = {}  # the last evaluation's scalar val metrics
        self.seconds = 0.0

    def on_train_epoch_end(self, trainer, pl_module):
        _synchronize(pl_module.device)
        started = time.perf_counter()
        out = pl_module.evaluate(self.dm.eval_episodes("val"))
        metrics = episode_metrics(out, "val", pl_module.classification)
        key = "val_acc" if pl_module.classification else "val_mse"
        self.history.append(metrics[key])
        self.last = {k: v for k, v in metrics.items() if not isinstance(v, list)}
        self.run_logger.log_metrics({f"fewshot/{key}": metrics[key],
                                     "epoch": trainer.current_epoch}, self.stream.step)
        self.seconds += time.perf_counter() - started


class EpisodicCheckpoints(pl.Callback):
    """checkpoints/last.ckpt during meta-training: every `every` meta-batches, after every
    epoch (once its validation ran), and when a stop signal is pending (then stops the run).

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


def finished_metric(cfg: DictConfig, results: dict) -> float:
    """The optimized metric of a finished few-shot run's results (a resume with nothing left)."""
    metrics = results["metrics"]
    classification = "test_acc" in metrics
    has_val = any(k.startswith("val_") for k in metrics)
    return metrics[_optimized_metric(cfg, classification, has_val)]


def _optimized_metric(cfg: DictConfig, classification: bool, has_val: bool) -> str:
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


def run_episodic(cfg: DictConfig, dm, device: torch.device, out_dir: Path,
                 started: float, resume=None) -> float:
    """Meta-train, evaluate on the fixed test episodes, write results.json; return the metric.

    `resume` (a metacl.checkpoint.ResumePlan) continues from checkpoints/last.ckpt: weights,
    optimizer and LR-schedule states, random states (the episode generator's included), the
    validation history and the position (epoch, meta-batches done in it).
    """
    info = dm.episode_info
    metric_name = _optimized_metric(cfg, info.classification, bool(dm.n_episodes["val"]))
    backbone = instantiate(cfg.model, input_shape=info.input_shape, n_outputs=info.n_outputs)
    configure_cpu(cfg, device, backbone)
    method = instantiate(cfg.method, _partial_=True)(backbone=backbone, episode_info=info)
    method = method.to(device)
    dm.meta_batch_size = method.meta_batch_size

    job, config, run_logger = start_run(cfg, out_dir)
    run_name = job.name
    results = new_results(config, matrix=None, agnostic=None)  # no task stream in few-shot
    save_ckpts = bool(cfg.get("save_checkpoints", True))
    every = int(cfg.get("checkpoint", {}).get("every_n_steps", 0) or 0)
    ckpt_path = out_dir / "checkpoints" / checkpoint.BOUNDARY_FILE
    max_epochs = int(cfg.trainer.max_epochs)
    n_batches = dm.meta_batches_per_epoch * max_epochs
    elapsed_before, train_before = 0.0, 0.0  # seconds of the runs this one continues

    def save_results():
        results["timing"]["total_seconds"] = elapsed_before + time.perf_counter() - started
        _atomic_write(out_dir / "results.json",
                      lambda p: p.write_text(json.dumps(results, indent=2)))

    def train_seconds() -> float:
        return train_before + stream.elapsed() - validation.seconds

    def save_state(epoch: int, batch: int) -> None:
        """last.ckpt: everything needed to go on after `batch` meta-batches of `epoch`."""
        if not save_ckpts:
            return
        if method.last_loss is not None:  # never checkpoint a diverged state
            _check_finite_loss(float(method.last_loss), 0, stream.step)
        _check_finite_weights(method, 0, stream.step)
        ckpt_path.parent.mkdir(exist_ok=True)
        state = {"format": checkpoint.FORMAT_VERSION, "kind": "episodic", "config": config,
                 "config_hash": checkpoint.config_hash(config), "results": results,
                 "step": stream.step, "position": {"epoch": epoch, "batch": batch},
                 "train_seconds": train_seconds(),
                 "validation": {"history": validation.history, "last": validation.last},
                 "generator": dm.generator.get_state(), **checkpoint.capture(method)}
        checkpoint.atomic_save(state, ckpt_path)

    progress = Progress(TextColumn("[bold]meta-train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                        console=console, transient=True)
    bar = progress.add_task("", total=n_batches, task="", loss="-")
    signals = StopSignals()
    saver = EpisodicCheckpoints(save_state, every, signals)
    stream = StreamCallback(progress, bar, run_logger, 0, 0, on_batch=saver.on_batch)
    validation = ValidationCallback(dm, run_logger, stream)
    position = {"epoch": 0, "batch": 0}
    if resume is not None:
        state = resume.boundary
        results = state["results"]
        results.pop("error", None)
        results.update(config=config, status="running")
        elapsed_before = float(results["timing"]["total_seconds"])
        train_before = float(state["train_seconds"])
        checkpoint.restore(method, state)
        dm.generator.set_state(state["generator"])
        stream.step, position = int(state["step"]), state["position"]
        validation.history = list(state["validation"]["history"])
        validation.last = dict(state["validation"]["last"])
        console.print(f"resuming {out_dir} at epoch {position['epoch']}, meta-batch "
                      f"{position['batch']}" + (
                          f" (config differs at {', '.join(resume.config_diff)}; "
                          "resume.force=true)" if resume.config_diff else ""))
    try:
        with signals, progress:
            if position["epoch"] < max_epochs:
                callbacks = [stream] + ([validation] if dm.n_episodes["val"] else []) + [saver]
                # Evaluation adapts with gradients, so inference mode stays off whatever the
                # trainer config says.
                trainer = pl.Trainer(
                    **{**cfg.trainer, "inference_mode": False}, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                )
                if position["epoch"] or position["batch"]:
                    start_mid_training(trainer, dm, position, progress, bar,
                                       dm.meta_batches_per_epoch)
                trainer.fit(method, datamodule=dm)
        results["timing"]["train_seconds"] = train_seconds()

        test = method.evaluate(dm.eval_episodes("test"))
        metrics = episode_metrics(test, "test", info.classification)
        if validation.history:
            key = "val_acc" if info.classification else "val_mse"
            metrics.update(validation.last)
            metrics[f"{key}_per_epoch"] = validation.history
        results["metrics"] = metrics
        results["status"] = "completed"
        save_results()
        save_state(max_epochs, 0)  # the trained meta-learner; a later resume=true reports it
        stem = "acc" if info.classification else "mse"
        run_logger.log_metrics({f"fewshot/test_{stem}_step_{k}": v
                                for k, v in enumerate(metrics[f"test_{stem}_per_step"])},
                               stream.step)
        run_logger.finish({k: v for k, v in metrics.items() if not isinstance(v, list)},
                          "completed", files=[out_dir / "results.json"])
    except BaseException as err:
        mark_stopped(results, err)
        results["timing"]["train_seconds"] = train_seconds()
        save_results()
        if isinstance(err, Interrupted):
            console.print(f"checkpoint saved; resume with: python train.py <same overrides> "
                          f"resume={out_dir}", soft_wrap=True)
        run_logger.finish(results["metrics"] or {}, "failed")
        raise

    timing = results["timing"]
    per_step = metrics[f"test_{stem}_per_step"]
    console.print(
        f"[bold]{run_name}[/bold]: test_{stem} {metrics[f'test_{stem}']:.4f} ± "
        f"{metrics[f'test_{stem}_ci95']:.4f} ({dm.describe()}, {metrics['test_episodes']} "
        f"episodes; step 0 {per_step[0]:.4f})  train {timing['train_seconds']:.1f} s  "
        f"total {timing['total_seconds']:.1f} s\nresults: {out_dir / 'results.json'}",
        soft_wrap=True,
    )
    return metrics[metric_name]
