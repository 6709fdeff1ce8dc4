"""The continual loop: evaluate, then for each task train on it and evaluate on every task.

    R = evaluate(method, dm)                        # row before any training: FWT baseline
    for t in tasks:
        before_task -> fresh Trainer.fit over task t -> after_task
        R[t] = evaluate(method, dm)                 # accuracy on every task
        save matrix, metrics and checkpoint; log the row
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

# Lightning 2.6 on torch 2.14 warns about its own use of a deprecated torch API at every fit.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from metacl.errors import ConfigError
from metacl.metrics import compute_metrics, partial_metrics
from metacl.metrics.plots import save_matrix_csv, save_matrix_heatmap

log = logging.getLogger(__name__)
console = Console(stderr=True)


def resolve_device(accelerator: str) -> torch.device:
    """The device Lightning will train on, so data and evaluation can live there too."""
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible; "
                              "use trainer=cpu or trainer.accelerator=auto")
        return torch.device("cuda")
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if accelerator == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"trainer.accelerator={accelerator} is not supported; "
                      "allowed: auto, cpu, gpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StreamCallback(pl.Callback):
    """Times the training loop, drives the progress bar and logs the loss every few batches."""

    def __init__(self, progress: Progress, bar, run_logger, step: int, task: int,
                 log_every: int = 50):
        self.progress, self.bar, self.run_logger = progress, bar, run_logger
        self.step, self.task, self.log_every = step, task, log_every
        self.seconds = 0.0

    def on_train_start(self, trainer, pl_module):
        _synchronize(pl_module.device)
        self.started = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        _synchronize(pl_module.device)
        self.seconds += time.perf_counter() - self.started

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step += 1
        if self.step % self.log_every == 0 and pl_module.last_loss is not None:
            loss = float(pl_module.last_loss)  # the only host sync, every log_every batches
            self.run_logger.log_metrics({"train/loss": loss, "task": self.task}, self.step)
            self.progress.update(self.bar, loss=f"{loss:.3f}")
        self.progress.advance(self.bar)


@torch.no_grad()
def evaluate(method, dm, n_trained: int, variant: str | None = None
             ) -> tuple[list[float], list[float] | None]:
    """Accuracy on every task's test set: task-aware, and task-agnostic on class splits.

    Task-agnostic predictions may choose any class of the tasks trained so far (all classes
    before training). `variant` picks one of the method's `eval_variants`.
    """
    was_training = method.training
    method.eval()
    info = dm.task_info
    mask = method.class_mask.to(method.device)
    allowed = mask[:n_trained].any(0) if n_trained else torch.ones_like(mask[0])
    aware, agnostic = [], []
    for u, loader in enumerate(dm.eval_dataloaders("test")):
        correct_aware = torch.zeros((), device=method.device)
        correct_agnostic = torch.zeros((), device=method.device)
        for x, y, _ in loader:
            correct_aware += (method.predict(x, u, variant=variant) == y).sum()
            if info.multi_head:
                pred = method.predict(x, u, allowed=allowed, variant=variant)
                correct_agnostic += (pred == y).sum()
        n = len(loader.y)
        aware.append(float(correct_aware) / n)
        agnostic.append(float(correct_agnostic) / n)
    method.train(was_training)
    return aware, (agnostic if info.multi_head else None)


def _atomic_write(path: Path, write) -> None:
    """Write to a temporary file and rename, so an interrupted run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _hydra_info(cfg: DictConfig) -> tuple[str, str | None]:
    """A readable run name and, in a multirun, the sweep's name as the W&B group."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        choices = hc.runtime.choices
        name = f"{choices.get('method')}-{choices.get('dataset')}-seed{cfg.seed}"
        if hc.mode == RunMode.MULTIRUN:
            return f"{name}-job{hc.job.num}", Path(hc.sweep.dir).name
        return name, None
    except ValueError:  # composed without Hydra's runtime (tests, notebooks)
        return f"run-seed{cfg.seed}", None


# How a run proceeds is decided by its datamodule's `protocol`, never by the method's name:
# a stream of tasks (continual) or episodes of few-shot tasks (meta-learning).
PROTOCOLS = {
    "continual": "metacl.run:run_continual",
    "episodic": "metacl.fewshot.loop:run_episodic",
}


def main(cfg: DictConfig) -> float:
    started = time.perf_counter()
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, verbose=False)

    device = resolve_device(cfg.trainer.accelerator)
    dm = instantiate(cfg.dataset).build().to(device)
    protocol = getattr(dm, "protocol", "continual")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"dataset protocol '{protocol}' is unknown; allowed: "
                          f"{', '.join(PROTOCOLS)}")
    module_name, function_name = PROTOCOLS[protocol].split(":")
    runner = getattr(importlib.import_module(module_name), function_name)
    return runner(cfg, dm, device, out_dir, started)


def run_continual(cfg: DictConfig, dm, device: torch.device, out_dir: Path,
                  started: float) -> float:
    """The continual loop (module docstring); returns cfg.optimized_metric."""
    info = dm.task_info
    backbone = instantiate(cfg.model, input_shape=info.input_shape, n_outputs=info.n_outputs)
    # _partial_: the backbone and TaskInfo are objects, not config values to merge.
    method = instantiate(cfg.method, _partial_=True)(backbone=backbone, task_info=info)
    method = method.to(device)
    dm.batch_size = method.batch_size

    config = OmegaConf.to_container(cfg, resolve=True)
    run_logger = instantiate(cfg.logger)
    run_name, group = _hydra_info(cfg)
    run_logger.start(config, str(out_dir), run_name, group)

    results = {
        "config": config,
        "accuracy_matrix": [],
        "accuracy_matrix_agnostic": [] if info.multi_head else None,
        "accuracy_before": None,
        "metrics": None,
        "timing": {"train_seconds": 0.0, "total_seconds": 0.0},
        "status": "running",
    }

    def save_results():
        results["timing"]["total_seconds"] = time.perf_counter() - started
        _atomic_write(out_dir / "results.json",
                      lambda p: p.write_text(json.dumps(results, indent=2)))

    progress = Progress(TextColumn("[bold]task {task.fields[task]}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                        TimeElapsedColumn(), console=console, transient=True)
    step = 0
    variant_rows = {variant: [] for variant in method.eval_variants}
    try:
        before, _ = evaluate(method, dm, 0)
        results["accuracy_before"] = before
        with progress:
            for t in range(info.n_tasks):
                method.before_task(t, dm)
                train_tasks = method.training_tasks(t, info.n_tasks)
                if train_tasks:
                    dm.set_task(t, train_tasks)
                    n_batches = len(dm.train_dataloader()) * int(cfg.trainer.max_epochs)
                    bar = progress.add_task("", total=n_batches, task=f"{t + 1}/{info.n_tasks}",
                                            loss="-")
                    callback = StreamCallback(progress, bar, run_logger, step, t)
                    trainer = pl.Trainer(
                        **cfg.trainer, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[callback],
                    )
                    trainer.fit(method, datamodule=dm)
                    step = callback.step
                    results["timing"]["train_seconds"] += callback.seconds
                    progress.remove_task(bar)
                method.after_task(t, dm)

                aware, agnostic = evaluate(method, dm, t + 1)
                for variant in method.eval_variants:
                    variant_rows[variant].append(evaluate(method, dm, t + 1, variant)[0])
                results["accuracy_matrix"].append(aware)
                if info.multi_head:
                    results["accuracy_matrix_agnostic"].append(agnostic)
                done = results["accuracy_matrix"]
                results["metrics"] = partial_metrics(done, before)
                row_metrics = {f"acc/task_{u}": a for u, a in enumerate(aware[: t + 1])}
                row_metrics.update({"task": t, "acc/mean_seen": sum(aware[: t + 1]) / (t + 1)})
                run_logger.log_metrics(row_metrics, step)
                save_results()
                if cfg.get("save_checkpoints", True):
                    ckpt_dir = out_dir / "checkpoints"
                    ckpt_dir.mkdir(exist_ok=True)
                    state = {"method_state": method.state_dict(), "tasks_done": t + 1,
                             "accuracy_matrix": done, "accuracy_before": before}
                    _atomic_write(ckpt_dir / "last.ckpt", lambda p, state=state: torch.save(state, p))

        R = results["accuracy_matrix"]
        results["metrics"] = compute_metrics(R, before)
        results["status"] = "completed"
        save_matrix_csv(R, out_dir / "accuracy_matrix.csv")
        save_matrix_heatmap(R, out_dir / "accuracy_matrix.png",
                            title=f"{run_name}: accuracy after each task")
        if info.multi_head:
            save_matrix_csv(results["accuracy_matrix_agnostic"],
                            out_dir / "accuracy_matrix_agnostic.csv")
        for variant, rows in variant_rows.items():
            save_matrix_csv(rows, out_dir / f"accuracy_matrix_{variant}.csv")
        save_results()
        run_logger.log_matrix(R, str(out_dir / "accuracy_matrix.png"), step)
        run_logger.finish(results["metrics"], "completed")
    except BaseException as err:
        results["status"] = f"failed: {type(err).__name__}: {err}"
        save_results()
        run_logger.finish(results["metrics"] or {}, "failed")
        raise

    m, timing = results["metrics"], results["timing"]
    console.print(
        f"[bold]{run_name}[/bold]: RA {m['RA']:.4f}  BTI {m['BTI']:+.4f}  "
        f"train {timing['train_seconds']:.1f} s  total {timing['total_seconds']:.1f} s\n"
        f"results: {out_dir / 'results.json'}"
    )
    metric = cfg.get("optimized_metric", "RA")
    if metric not in m:
        raise ConfigError(f"optimized_metric={metric} is not a metric; allowed: {', '.join(m)}")
    return m[metric]
