"""The episodic loop: meta-train on fresh meta-batches, then adapt on the fixed test episodes.

    method = Method(backbone, episode_info)            # a MetaLearner (metacl.fewshot.base)
    Trainer.fit(method, datamodule)                    # n_epochs x meta_batches_per_epoch
        after each epoch: adapt on the fixed val episodes, log val accuracy
    test = method.evaluate(test episodes)              # (episodes, inner steps + 1)
    results.json: mean and 95% CI after every inner step (step 0 = before adaptation)

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
from metacl.errors import ConfigError
from metacl.run import (
    StreamCallback,
    _atomic_write,
    _synchronize,
    console,
    mark_stopped,
    new_results,
    set_threads,
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
                 started: float) -> float:
    """Meta-train, evaluate on the fixed test episodes, write results.json; return the metric."""
    info = dm.episode_info
    metric_name = _optimized_metric(cfg, info.classification, bool(dm.n_episodes["val"]))
    backbone = instantiate(cfg.model, input_shape=info.input_shape, n_outputs=info.n_outputs)
    set_threads(cfg.get("threads", "auto"), device, backbone)
    method = instantiate(cfg.method, _partial_=True)(backbone=backbone, episode_info=info)
    method = method.to(device)
    dm.meta_batch_size = method.meta_batch_size

    job, config, run_logger = start_run(cfg, out_dir)
    run_name = job.name
    results = new_results(config, matrix=None, agnostic=None)  # no task stream in few-shot

    def save_results():
        results["timing"]["total_seconds"] = time.perf_counter() - started
        _atomic_write(out_dir / "results.json",
                      lambda p: p.write_text(json.dumps(results, indent=2)))

    progress = Progress(TextColumn("[bold]meta-train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                        console=console, transient=True)
    try:
        n_batches = dm.meta_batches_per_epoch * int(cfg.trainer.max_epochs)
        with progress:
            bar = progress.add_task("", total=n_batches, task="", loss="-")
            stream = StreamCallback(progress, bar, run_logger, 0, 0)
            validation = ValidationCallback(dm, run_logger, stream)
            callbacks = [stream] + ([validation] if dm.n_episodes["val"] else [])
            # Evaluation adapts with gradients, so inference mode stays off whatever the
            # trainer config says.
            trainer = pl.Trainer(
                **{**cfg.trainer, "inference_mode": False}, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
            )
            trainer.fit(method, datamodule=dm)
        results["timing"]["train_seconds"] = stream.seconds - validation.seconds
        if cfg.get("save_checkpoints", True):
            ckpt_dir = out_dir / "checkpoints"
            ckpt_dir.mkdir(exist_ok=True)
            # The trained meta-learner (weights_only-loadable); few-shot runs do not resume.
            state = {"method_state": method.state_dict(), "meta_batches": stream.step}
            checkpoint.atomic_save(state, ckpt_dir / "last.ckpt")

        test = method.evaluate(dm.eval_episodes("test"))
        metrics = episode_metrics(test, "test", info.classification)
        if validation.history:
            key = "val_acc" if info.classification else "val_mse"
            metrics.update(validation.last)
            metrics[f"{key}_per_epoch"] = validation.history
        results["metrics"] = metrics
        results["status"] = "completed"
        save_results()
        stem = "acc" if info.classification else "mse"
        run_logger.log_metrics({f"fewshot/test_{stem}_step_{k}": v
                                for k, v in enumerate(metrics[f"test_{stem}_per_step"])},
                               stream.step)
        run_logger.finish({k: v for k, v in metrics.items() if not isinstance(v, list)},
                          "completed", files=[out_dir / "results.json"])
    except BaseException as err:
        mark_stopped(results, err)
        save_results()
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
