"""The continual loop: evaluate, then for each task train on it and evaluate on every task.

    R = evaluate(method, dm)                        # row before any training: FWT baseline
    for t in tasks:
        before_task -> fresh Trainer.fit over task t -> after_task
        R[t] = evaluate(method, dm)                 # accuracy on every task
        V[t] = evaluate(method, dm, split="val")    # the same on the validation split, if any
        save matrix, metrics and checkpoint; log the row

A run whose loss or weights become NaN/inf stops with `DivergedError`. In a multirun (`-m`,
Optuna, submitit, joblib) a failing job never stops the sweep: `main` records it as failed in its
results.json and returns NaN, which the Optuna sweeper records as a failed trial.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# Lightning 2.6 on torch 2.14 warns about its own use of a deprecated torch API at every fit.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from metacl import checkpoint
from metacl.allocator import set_cpu_allocator
from metacl.checkpoint import Interrupted, StopSignals, plan_resume
from metacl.cli import user_error as find_user_error
from metacl.errors import ConfigError
from metacl.metrics import METRIC_KEYS, compute_metrics, partial_metrics
from metacl.metrics.plots import save_matrix_csv, save_matrix_heatmap
from metacl.validate import check_writable, validate_config

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


class DivergedError(RuntimeError):
    """The training loss or the weights became NaN or infinite."""


def _check_finite_loss(loss: float, task: int, step: int) -> None:
    if not math.isfinite(loss):
        raise DivergedError(f"training loss became {loss} in task {task} (batch {step})")


def _check_finite_weights(method, task: int, step: int | None = None) -> None:
    params = [p for p in method.parameters() if p.is_floating_point()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        where = f"task {task}" + (f" (batch {step})" if step is not None else "")
        raise DivergedError(f"weights became NaN or infinite in {where}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        _synchronize(pl_module.device)
        self.started = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        _synchronize(pl_module.device)
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
            _check_finite_loss(loss, self.task, self.step)
            self.run_logger.log_metrics({"train/loss": loss, "task": self.task}, self.step)
            self.progress.update(self.bar, loss=f"{loss:.3f}")
        self.progress.advance(self.bar)
        if self.on_batch is not None:
            self.on_batch(self, trainer, pl_module, batch_idx)


@torch.no_grad()
def evaluate(method, dm, n_trained: int, variant: str | None = None, split: str = "test"
             ) -> tuple[list[float], list[float] | None]:
    """Accuracy on every task's test set: task-aware, and task-agnostic on class splits.

    Task-agnostic predictions may choose any class of the tasks trained so far (all classes
    before training). `variant` picks one of the method's `eval_variants`; `split="val"`
    evaluates on the held-out validation split instead (hyperparameter search).
    """
    was_training = method.training
    method.eval()
    info = dm.task_info
    mask = method.class_mask.to(method.device)
    allowed = mask[:n_trained].any(0) if n_trained else torch.ones_like(mask[0])
    aware, agnostic = [], []
    for u, loader in enumerate(dm.eval_dataloaders(split)):
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


@dataclass
class JobInfo:
    """Who this job is: its readable name, W&B group/job type/tags, and Hydra's view of it."""

    name: str
    group: str | None = None
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    multirun: bool = False
    hydra: dict = field(default_factory=dict)  # choices, overrides, job_num, sweep_dir


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def job_info(cfg: DictConfig) -> JobInfo:
    """Name the job from its overrides; in a multirun, its sweep is the W&B group.

    name: `<method>-<dataset>-seed<seed>[-<other overrides>]` (the keys Hydra's output folder
    names also leave out are left out here); group: `<task_name>-<sweep folder>`.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except ValueError:  # composed without Hydra's runtime (tests, notebooks)
        return JobInfo(name=f"run-seed{cfg.seed}")
    choices = {k: v for k, v in hc.runtime.choices.items()
               if k != "hydra" and not str(k).startswith("hydra/")}
    method, dataset = choices.get("method"), choices.get("dataset")
    search = choices.get("hparams_search")
    overrides = [str(o) for o in hc.overrides.task]
    excluded = {"method", "dataset", "seed", "hparams_search"}
    excluded |= set(hc.job.config.override_dirname.exclude_keys or [])
    extra = [o for o in overrides if _override_key(o) not in excluded]
    name = f"{method}-{dataset}-seed{cfg.seed}" + (f"-{','.join(extra)}" if extra else "")
    multirun = hc.mode == RunMode.MULTIRUN
    info = {"choices": choices, "overrides": overrides,
            "mode": "MULTIRUN" if multirun else "RUN"}
    group = None
    if multirun:
        info.update(job_num=int(hc.job.num), sweep_dir=str(hc.sweep.dir))
        group = f"{cfg.get('task_name', 'train')}-{Path(str(hc.sweep.dir)).name}"
    return JobInfo(
        name=name[:128], group=group,
        job_type="hparams_search" if search else ("sweep" if multirun else "train"),
        tags=[str(t) for t in (method, dataset, search) if t], multirun=multirun, hydra=info,
    )


def resolved_config(cfg: DictConfig, job: JobInfo) -> dict:
    """The resolved config (as results.json and W&B keep it) plus Hydra's choices/overrides
    under `hydra`, so a report can tell runs apart without the .hydra folder."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # an unresolvable value is itself why a job failed
        config = OmegaConf.to_container(cfg, resolve=False)
    if job.hydra:
        config["hydra"] = job.hydra
    return config


def check_optimized_metric(metric: str, has_validation: bool) -> None:
    """`RA`/`test/RA` (test split) or `val/RA` (validation split), any key of METRIC_KEYS."""
    allowed = [*METRIC_KEYS, *(f"test/{k}" for k in METRIC_KEYS),
               *(f"val/{k}" for k in METRIC_KEYS)]
    if metric not in allowed:
        raise ConfigError(f"optimized_metric={metric} is not a metric; allowed: "
                          f"{', '.join(allowed)}")
    if metric.startswith("val/") and not has_validation:
        raise ConfigError(f"optimized_metric={metric} needs a validation split; set "
                          "dataset.validation to a fraction, e.g. ++dataset.validation=0.1")


# How a run proceeds is decided by its datamodule's `protocol`, never by the method's name:
# a stream of tasks (continual) or episodes of few-shot tasks (meta-learning). Each protocol
# names its runner and how it reads the optimized metric back from a finished run's results.
PROTOCOLS = {
    "continual": {"run": "metacl.run:run_continual",
                  "finished_metric": "metacl.run:finished_metric"},
    "episodic": {"run": "metacl.fewshot.loop:run_episodic",
                 "finished_metric": "metacl.fewshot.loop:finished_metric"},
}


def _protocol_function(protocol: str, role: str):
    module_name, function_name = PROTOCOLS[protocol][role].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def main(cfg: DictConfig) -> float:
    """Run one job. In a multirun a failing job is recorded as failed and returns NaN, so the
    other jobs (and the sweeper) go on; a single run raises as usual."""
    job = job_info(cfg)
    try:
        return _main(cfg)
    except Exception as err:
        if not job.multirun:
            raise
        return _record_failed_job(cfg, job, err)


DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before any run changed it


def set_threads(setting, device: torch.device, backbone) -> None:
    """torch intra-op threads: an int, null (torch's default: one per core) or `auto`.

    auto: on CPU, the backbone's `cpu_threads` preference if it declares one (the MLP: 1; its
    operations are too small to split, and measured 1.5x faster with 1 thread than 2), else
    torch's default. See docs/architecture.md.
    """
    if setting == "auto":
        setting = getattr(backbone, "cpu_threads", None) if device.type == "cpu" else None
    if setting is None:  # also undoes an earlier job's setting in the same multirun process
        setting = DEFAULT_THREADS
    if not isinstance(setting, int) or isinstance(setting, bool) or setting < 1:
        raise ConfigError(f"threads={setting!r}: use a positive integer, null (torch's "
                          "default) or auto")
    torch.set_num_threads(setting)


def configure_cpu(cfg: DictConfig, device: torch.device, backbone) -> None:
    """The job's CPU settings: intra-op threads and the C library's malloc (metacl.allocator)."""
    set_threads(cfg.get("threads", "auto"), device, backbone)
    set_cpu_allocator(cfg.get("cpu_allocator", "tuned"))


def start_run(cfg: DictConfig, out_dir: Path):
    """The job's identity, its resolved config and a started run logger (every protocol)."""
    job = job_info(cfg)
    config = resolved_config(cfg, job)
    run_logger = instantiate(cfg.logger)
    run_logger.start(config, str(out_dir), job.name, job.group, tags=job.tags,
                     job_type=job.job_type)
    return job, config, run_logger


def new_results(config: dict, matrix, agnostic, status: str = "running") -> dict:
    """The results.json skeleton shared by every protocol (same top-level keys)."""
    return {
        "config": config,
        "accuracy_matrix": matrix,
        "accuracy_matrix_agnostic": agnostic,
        "accuracy_before": None,
        "metrics": None,
        "timing": {"train_seconds": 0.0, "total_seconds": 0.0},
        "status": status,
    }


def failure_status(err: BaseException) -> str:
    """results.json's status for a run that stopped early: `diverged` (NaN/inf), `interrupted`
    (a stop signal; a checkpoint was saved, resume with resume=true), else `failed: ...`."""
    if isinstance(err, DivergedError):
        return "diverged"
    if isinstance(err, Interrupted | KeyboardInterrupt | SystemExit):
        return "interrupted"  # SystemExit: submitit requeues the job after our checkpoint
    return f"failed: {type(err).__name__}: {err}"


def mark_stopped(results: dict, err: BaseException) -> None:
    """Record why a run stopped: `status` plus the one-line reason in `error`."""
    results["status"] = failure_status(err)
    results["error"] = f"{type(err).__name__}: {err}"


def _record_failed_job(cfg: DictConfig, job: JobInfo, err: Exception) -> float:
    out_dir = Path(str(cfg.paths.output_dir))
    path = out_dir / "results.json"
    user_error = find_user_error(err)
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = None
    if results is None:
        results = new_results(resolved_config(cfg, job), matrix=[], agnostic=None)
        mark_stopped(results, err)
    elif results.get("status") == "running":
        mark_stopped(results, err)
    # A bad config never rewrites an existing run's results (e.g. a refused resume).
    if user_error is None or not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda p: p.write_text(json.dumps(results, indent=2)))
    if user_error is not None:
        print(f"error: {user_error}", file=sys.stderr)
    elif not isinstance(err, DivergedError):  # a bug: keep its traceback in the job's log
        log.error("job %s failed", job.name, exc_info=err)
    print(f"job {job.hydra.get('job_num', '')} ({job.name}) {results['status']}\n"
          f"recorded in {path}; the other jobs go on", file=sys.stderr)
    return float("nan")


def _main(cfg: DictConfig) -> float:
    started = time.perf_counter()
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out_dir = Path(cfg.paths.output_dir)
    # Everything that can be checked from the config alone is checked before any data is
    # loaded and before anything is written (metacl.validate).
    protocol = validate_config(cfg)
    device = resolve_device(cfg.trainer.accelerator)
    plan = plan_resume(cfg, out_dir, resolved_config(cfg, job_info(cfg)))
    if plan is not None and plan.finished:
        console.print(f"{plan.out_dir} already completed; nothing to resume. "
                      f"results: {plan.out_dir / 'results.json'}")
        return _protocol_function(protocol, "finished_metric")(cfg, plan.boundary["results"])
    check_writable(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, verbose=False)
    dm = instantiate(cfg.dataset).build().to(device)
    return _protocol_function(protocol, "run")(cfg, dm, device, out_dir, started, resume=plan)


def _metric_values(results: dict) -> dict:
    m, val = results["metrics"], results.get("validation")
    values = {**m, **{f"test/{k}": v for k, v in m.items()}}
    if val:
        values.update({f"val/{k}": v for k, v in val["metrics"].items()})
    return values


def finished_metric(cfg: DictConfig, results: dict) -> float:
    """cfg.optimized_metric of a finished continual run's results (a resume that has nothing
    left to do)."""
    return _metric_values(results)[cfg.get("optimized_metric", "RA")]


class _InTaskCheckpoints:
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
        if method.last_loss is not None:  # never checkpoint a diverged state
            _check_finite_loss(float(method.last_loss), self.task, stream.step)
        _check_finite_weights(method, self.task, stream.step)
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


def run_continual(cfg: DictConfig, dm, device: torch.device, out_dir: Path,
                  started: float, resume=None) -> float:
    """The continual loop (module docstring); returns cfg.optimized_metric.

    `resume` (a metacl.checkpoint.ResumePlan) continues a checkpointed run: from the task
    boundary in last.ckpt, then, if step.ckpt holds a position inside the next task, from there.
    """
    info = dm.task_info
    has_val = bool(getattr(dm, "has_validation", False))
    metric = cfg.get("optimized_metric", "RA")
    check_optimized_metric(metric, has_val)  # before training, not after hours of it
    backbone = instantiate(cfg.model, input_shape=info.input_shape, n_outputs=info.n_outputs)
    configure_cpu(cfg, device, backbone)
    # _partial_: the backbone and TaskInfo are objects, not config values to merge.
    method = instantiate(cfg.method, _partial_=True)(backbone=backbone, task_info=info)
    method = method.to(device)
    dm.batch_size = method.batch_size
    # An optional training schedule (schedule=hat): a Lightning callback on every task's Trainer.
    schedule = instantiate(cfg.schedule) if cfg.get("schedule") else None
    if schedule is not None:
        schedule.check(dm)

    job, config, run_logger = start_run(cfg, out_dir)
    run_name = job.name
    results = new_results(config, matrix=[], agnostic=[] if info.multi_head else None)
    if has_val:  # task-aware accuracies on the held-out validation split (hparam search)
        results["validation"] = {"accuracy_matrix": [], "accuracy_before": None,
                                 "metrics": None}
    results_path = out_dir / "results.json"
    ckpt_dir = out_dir / "checkpoints"
    save_ckpts = bool(cfg.get("save_checkpoints", True))
    every = int(cfg.get("checkpoint", {}).get("every_n_steps", 0) or 0)
    elapsed_before = 0.0  # total seconds of the runs this one continues

    def save_results():
        results["timing"]["total_seconds"] = elapsed_before + time.perf_counter() - started
        _atomic_write(results_path, lambda p: p.write_text(json.dumps(results, indent=2)))

    def save_boundary(tasks_done: int) -> None:
        """last.ckpt: everything needed to go on with task `tasks_done` (module docstring of
        metacl.checkpoint); the in-task checkpoint of the finished task is obsolete."""
        if not save_ckpts:
            return
        ckpt_dir.mkdir(exist_ok=True)
        state = {"format": checkpoint.FORMAT_VERSION, "kind": "boundary",
                 "config": config, "config_hash": checkpoint.config_hash(config),
                 "tasks_done": tasks_done, "step": step, "results": results,
                 "variant_rows": variant_rows, **checkpoint.capture(method)}
        checkpoint.atomic_save(state, ckpt_dir / checkpoint.BOUNDARY_FILE)
        (ckpt_dir / checkpoint.STEP_FILE).unlink(missing_ok=True)

    def summary() -> dict:
        values = dict(results["metrics"] or {})
        if val and val["metrics"]:
            values.update({f"val/{k}": v for k, v in val["metrics"].items()})
        values.update(results["timing"])
        values["tasks_done"] = len(results["accuracy_matrix"])
        return values

    progress = Progress(TextColumn("[bold]task {task.fields[task]}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                        TimeElapsedColumn(), console=console, transient=True)
    step = 0
    first_task = 0
    variant_rows = {variant: [] for variant in method.eval_variants}
    png = out_dir / "accuracy_matrix.png"
    signals = StopSignals()
    in_task = _InTaskCheckpoints(method, dm, ckpt_dir / checkpoint.STEP_FILE, every, signals,
                                 save_ckpts)
    if resume is not None:
        boundary = resume.boundary
        results = boundary["results"]
        results.pop("error", None)
        results.update(config=config, status="running")
        variant_rows = {v: list(boundary["variant_rows"].get(v, [])) for v in variant_rows}
        step, first_task = int(boundary["step"]), int(boundary["tasks_done"])
        elapsed_before = float(results["timing"]["total_seconds"])
        checkpoint.restore(method, boundary)
        where = (f"task {first_task}" if resume.step is None else
                 f"task {first_task}, batch {resume.step['step']}")
        console.print(f"resuming {out_dir} at {where}" + (
            f" (config differs at {', '.join(resume.config_diff)}; resume.force=true)"
            if resume.config_diff else ""))
    val = results.get("validation")
    try:
        with signals:
            if resume is None:
                before, _ = evaluate(method, dm, 0)
                results["accuracy_before"] = before
                if val:
                    val["accuracy_before"] = evaluate(method, dm, 0, split="val")[0]
                save_results()
                save_boundary(0)  # so a stop inside the first task can resume too
            before = results["accuracy_before"]
            with progress:
                for t in range(first_task, info.n_tasks):
                    in_task.task = t
                    in_task.base = {"format": checkpoint.FORMAT_VERSION,
                                    "config_hash": checkpoint.config_hash(config),
                                    "train_seconds": results["timing"]["train_seconds"]}
                    method.before_task(t, dm)
                    position = None
                    if resume is not None and resume.step is not None and t == first_task:
                        # Inside task t: before_task ran from the boundary as it did originally;
                        # now the state of the last in-task checkpoint goes over it.
                        checkpoint.restore(method, resume.step)
                        position = resume.step["position"]
                        step = int(resume.step["step"])
                        results["timing"]["train_seconds"] = float(resume.step["train_seconds"])
                        in_task.base["train_seconds"] = results["timing"]["train_seconds"]
                    train_tasks = method.training_tasks(t, info.n_tasks)
                    max_epochs = int(cfg.trainer.max_epochs)
                    start_epoch = 0 if position is None else int(position["epoch"])
                    if train_tasks and start_epoch < max_epochs:
                        dm.set_task(t, train_tasks)
                        n_batches = len(dm.train_dataloader()) * max_epochs
                        bar = progress.add_task("", total=n_batches,
                                                task=f"{t + 1}/{info.n_tasks}", loss="-")
                        callback = StreamCallback(progress, bar, run_logger, step, t,
                                                  on_batch=in_task)
                        trainer = pl.Trainer(
                            **cfg.trainer, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0,
                            callbacks=[callback] + ([schedule] if schedule is not None else []),
                        )
                        if position is not None:
                            start_mid_training(trainer, dm, position, progress, bar,
                                               len(dm.train_loader))
                        trainer.fit(method, datamodule=dm)
                        step = callback.step
                        results["timing"]["train_seconds"] += callback.seconds
                        progress.remove_task(bar)
                        if method.last_loss is not None:
                            _check_finite_loss(float(method.last_loss), t, step)
                    method.after_task(t, dm)
                    _check_finite_weights(method, t, step)

                    aware, agnostic = evaluate(method, dm, t + 1)
                    for variant in method.eval_variants:
                        variant_rows[variant].append(evaluate(method, dm, t + 1, variant)[0])
                    results["accuracy_matrix"].append(aware)
                    if info.multi_head:
                        results["accuracy_matrix_agnostic"].append(agnostic)
                    done = results["accuracy_matrix"]
                    results["metrics"] = partial_metrics(done, before)
                    so_far = {f"test/{k}": v for k, v in results["metrics"].items()}
                    method_metrics = method.task_metrics()  # e.g. HAT's units used per layer
                    if method_metrics:
                        results.setdefault("method_metrics", []).append(method_metrics)
                        so_far.update(method_metrics)
                    if val:
                        val["accuracy_matrix"].append(
                            evaluate(method, dm, t + 1, split="val")[0])
                        val["metrics"] = partial_metrics(val["accuracy_matrix"],
                                                         val["accuracy_before"])
                        so_far.update({f"val/{k}": v for k, v in val["metrics"].items()})
                    save_results()
                    save_boundary(t + 1)
                    heatmap = None
                    if run_logger.wants_images:  # the matrix so far, as an image per task
                        save_matrix_heatmap(done, png, title=f"{run_name}: after task {t}")
                        heatmap = str(png)
                    run_logger.log_task(t, aware, so_far, step, heatmap)
                    if signals.pending is not None and t + 1 < info.n_tasks:
                        signals.hand_over(signals.pending)  # last.ckpt was just saved

        R = results["accuracy_matrix"]
        results["metrics"] = compute_metrics(R, before)
        if val:
            val["metrics"] = compute_metrics(val["accuracy_matrix"], val["accuracy_before"])
        results["status"] = "completed"
        save_matrix_csv(R, out_dir / "accuracy_matrix.csv")
        save_matrix_heatmap(R, png, title=f"{run_name}: accuracy after each task")
        if info.multi_head:
            save_matrix_csv(results["accuracy_matrix_agnostic"],
                            out_dir / "accuracy_matrix_agnostic.csv")
        for variant, rows in variant_rows.items():
            save_matrix_csv(rows, out_dir / f"accuracy_matrix_{variant}.csv")
        save_results()
        if save_ckpts:  # the finished state: a later resume=true reports it, trains nothing
            save_boundary(info.n_tasks)
        run_logger.log_matrix(R, str(png), step)
        if info.multi_head:
            run_logger.log_matrix(results["accuracy_matrix_agnostic"], None, step,
                                  name="accuracy_matrix_agnostic")
        run_logger.finish(summary(), "completed", files=[str(results_path)])
    except BaseException as err:
        mark_stopped(results, err)
        save_results()
        if isinstance(err, Interrupted):
            console.print(f"checkpoint saved; resume with: python train.py <same overrides> "
                          f"resume={out_dir}", soft_wrap=True)
        try:
            run_logger.finish(summary(), "failed", files=[str(results_path)])
        except Exception as log_err:  # noqa: BLE001  (never hide the real error behind it)
            log.warning("the logger could not finish: %s", log_err)
        raise

    m, timing = results["metrics"], results["timing"]
    validation = f"  val/RA {val['metrics']['RA']:.4f}" if val else ""
    console.print(
        f"[bold]{run_name}[/bold]: RA {m['RA']:.4f}  BTI {m['BTI']:+.4f}{validation}  "
        f"train {timing['train_seconds']:.1f} s  total {timing['total_seconds']:.1f} s\n"
        f"results: {results_path}"
    )
    return _metric_values(results)[metric]


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
