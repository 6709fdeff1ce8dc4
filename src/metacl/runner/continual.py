"""The continual loop: evaluate, then for each task train on it and evaluate on every task.

    R = evaluate(method, dm)                        # row before any training: FWT baseline
    for t in tasks:
        before_task -> fresh Trainer.fit over task t -> after_task
        R[t] = evaluate(method, dm)                 # accuracy on every task
        V[t] = evaluate(method, dm, split="val")    # the same on the validation split, if any
        save matrix, metrics and checkpoint; log the row
"""

from __future__ import annotations

from hydra.utils import instantiate
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from metacl import checkpoint
from metacl.errors import ConfigError
from metacl.metrics import METRIC_KEYS, compute_metrics, partial_metrics
from metacl.metrics.plots import save_matrix_csv, save_matrix_heatmap
from metacl.runner.callbacks import InTaskCheckpoints, StreamCallback, start_mid_training
from metacl.runner.evaluator import Evaluator
from metacl.runner.health import check_finite_weights, check_last_loss
from metacl.runner.record import RunRecord
from metacl.runner.session import Session, console, say


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


def metric_values(results: dict) -> dict:
    m, val = results["metrics"], results.get("validation")
    values = {**m, **{f"test/{k}": v for k, v in m.items()}}
    if val:
        values.update({f"val/{k}": v for k, v in val["metrics"].items()})
    return values


class ContinualLoop:
    """start or resume, train one task, record one row, finish (module docstring)."""

    def __init__(self, session: Session, dm, resume=None):
        cfg, info = session.cfg, dm.task_info
        self.session, self.dm, self.info, self.resume = session, dm, info, resume
        self.has_val = bool(getattr(dm, "has_validation", False))
        self.metric = cfg.get("optimized_metric", "RA")
        check_optimized_metric(self.metric, self.has_val)  # before training, not after hours
        self.method = session.build_method(info, task_info=info)
        dm.batch_size = self.method.batch_size
        # An optional training schedule (schedule=hat): a Lightning callback on every task's
        # Trainer; it evaluates with the same Evaluator.
        self.schedule = instantiate(cfg.schedule) if cfg.get("schedule") else None
        if self.schedule is not None:
            self.schedule.check(dm)
        session.start(RunRecord.new(session.out_dir, session.config, stream=True,
                                    multi_head=info.multi_head, validation=self.has_val,
                                    started=session.started), resume=resume)
        self.record, self.evaluator = session.record, Evaluator(dm)
        self.ckpt_dir = session.out_dir / "checkpoints"
        self.step, self.first_task = 0, 0
        self.variant_rows = {variant: [] for variant in self.method.eval_variants}
        self.png = session.out_dir / "accuracy_matrix.png"
        self.in_task = InTaskCheckpoints(self.method, dm, self.ckpt_dir / checkpoint.STEP_FILE,
                                         session.checkpoint_every, session.signals,
                                         session.save_checkpoints)
        self.progress = Progress(TextColumn("[bold]task {task.fields[task]}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                                 TimeElapsedColumn(), console=console, transient=True)

    # ------------------------------------------------------------------ the run
    def run(self) -> float:
        """The whole run; returns cfg.optimized_metric."""
        session = self.session
        if self.resume is not None:
            self.continue_checkpoint()
        try:
            with session.signals:
                if self.resume is None:
                    self.evaluate_before()
                with self.progress:
                    for t in range(self.first_task, self.info.n_tasks):
                        self.train_task(t)
                        self.record_row(t)
                        if session.signals.pending is not None and t + 1 < self.info.n_tasks:
                            session.signals.hand_over(session.signals.pending)  # saved
            self.finish()
        except BaseException as err:
            self.fail(err)
            raise
        return self.report()

    def fail(self, err: BaseException) -> None:
        """Record why the run stopped, close the logger."""
        self.session.fail(err, self.summary())

    def report(self) -> float:
        """The finished run's line; its cfg.optimized_metric."""
        m, timing, val = self.record.data["metrics"], self.record.timing, self.record.validation
        validation = f"  val/RA {val['metrics']['RA']:.4f}" if val else ""
        say(
            f"[bold]{self.session.name}[/bold]: RA {m['RA']:.4f}  BTI {m['BTI']:+.4f}"
            f"{validation}  train {timing['train_seconds']:.1f} s  "
            f"total {timing['total_seconds']:.1f} s\nresults: {self.record.path}"
        )
        return metric_values(self.record.data)[self.metric]

    def continue_checkpoint(self) -> None:
        """Resume: the record, rows and counters of last.ckpt; the method's state."""
        boundary = self.resume.boundary
        self.record.continue_from(boundary["results"], self.session.config)
        self.variant_rows = {v: list(boundary["variant_rows"].get(v, []))
                             for v in self.variant_rows}
        self.step, self.first_task = int(boundary["step"]), int(boundary["tasks_done"])
        checkpoint.restore(self.method, boundary)
        where = (f"task {self.first_task}" if self.resume.step is None else
                 f"task {self.first_task}, batch {self.resume.step['step']}")
        diff = self.resume.config_diff
        say(f"resuming {self.session.out_dir} at {where}" + (
            f" (config differs at {', '.join(diff)}; resume.force=true)" if diff else ""))

    def evaluate_before(self) -> None:
        """The row before any training (FWT's baseline), then a first boundary checkpoint so
        that a stop inside the first task can resume too."""
        data, val = self.record.data, self.record.validation
        data["accuracy_before"] = self.evaluator.accuracy(self.method, 0)[0]
        if val:
            val["accuracy_before"] = self.evaluator.accuracy(self.method, 0, split="val")[0]
        self.record.save()
        self.save_boundary(0)

    # ------------------------------------------------------------------ one task
    def train_task(self, t: int) -> None:
        """before_task, a fresh Trainer's fit over task t (from a stored position when
        resuming inside it), after_task."""
        method, dm = self.method, self.dm
        train_tasks, position = self.start_task(t)
        max_epochs = int(self.session.cfg.trainer.max_epochs)
        start_epoch = 0 if position is None else int(position["epoch"])
        if train_tasks and start_epoch < max_epochs:
            dm.set_task(t, train_tasks)
            bar = self.progress.add_task("", total=len(dm.train_dataloader()) * max_epochs,
                                         task=f"{t + 1}/{self.info.n_tasks}", loss="-")
            callback = StreamCallback(self.progress, bar, self.session.logger, self.step, t,
                                      on_batch=self.in_task)
            trainer = self.session.trainer(
                [callback] + ([self.schedule] if self.schedule is not None else []))
            if position is not None:
                start_mid_training(trainer, dm, position, self.progress, bar,
                                   len(dm.train_loader))
            self.session.fit(trainer, method, dm)
            self.step = callback.step
            self.record.timing["train_seconds"] += callback.seconds
            self.progress.remove_task(bar)
            check_last_loss(method, t, self.step)
        self.end_task(t)

    def start_task(self, t: int) -> tuple[list[int], dict | None]:
        """before_task; the tasks whose data task t streams, and the in-task position to
        resume from (None: the task's start)."""
        self.in_task.task = t
        self.in_task.base = {"format": checkpoint.FORMAT_VERSION,
                             "config_hash": checkpoint.config_hash(self.session.config),
                             "train_seconds": self.record.timing["train_seconds"]}
        self.method.before_task(t, self.dm)
        position = self.resume_inside(t)
        return self.method.training_tasks(t, self.info.n_tasks), position

    def end_task(self, t: int) -> None:
        """This task's training seconds (a resumed task's include those before the stop),
        after_task, the divergence check on the weights."""
        timing = self.record.timing
        per_task = timing.setdefault("task_train_seconds", [])
        per_task.append(timing["train_seconds"] - sum(per_task))
        timing["train_batches"] = self.step  # incoming batches so far (per-batch speed)
        self.method.after_task(t, self.dm)
        check_finite_weights(self.method, t, self.step)

    def resume_inside(self, t: int) -> dict | None:
        """Inside task t of a resumed run: before_task ran from the boundary as it did
        originally; now the state of the last in-task checkpoint goes over it."""
        step_state = None if self.resume is None else self.resume.step
        if step_state is None or t != self.first_task:
            return None
        checkpoint.restore(self.method, step_state)
        self.step = int(step_state["step"])
        self.record.timing["train_seconds"] = float(step_state["train_seconds"])
        # The boundary's total predates the training the step checkpoint holds.
        self.record.elapsed_before = max(self.record.elapsed_before,
                                         float(step_state["train_seconds"]))
        self.in_task.base["train_seconds"] = self.record.timing["train_seconds"]
        return step_state["position"]

    def record_row(self, t: int) -> None:
        """R[t] (and the agnostic, variant and validation rows), saved and logged."""
        method, data, val = self.method, self.record.data, self.record.validation
        aware, agnostic = self.evaluator.accuracy(method, t + 1)
        for variant in method.eval_variants:
            self.variant_rows[variant].append(
                self.evaluator.accuracy(method, t + 1, variant)[0])
        data["accuracy_matrix"].append(aware)
        if self.info.multi_head:
            data["accuracy_matrix_agnostic"].append(agnostic)
        done = data["accuracy_matrix"]
        data["metrics"] = partial_metrics(done, data["accuracy_before"])
        so_far = {f"test/{k}": v for k, v in data["metrics"].items()}
        so_far["time/train_seconds"] = self.record.timing["task_train_seconds"][t]
        method_metrics = method.task_metrics()  # e.g. HAT's units used per layer
        if method_metrics:
            self.record.add_method_metrics(method_metrics)
            so_far.update(method_metrics)
        if val:
            val["accuracy_matrix"].append(self.evaluator.accuracy(method, t + 1, split="val")[0])
            val["metrics"] = partial_metrics(val["accuracy_matrix"], val["accuracy_before"])
            so_far.update({f"val/{k}": v for k, v in val["metrics"].items()})
        self.record.save()
        self.save_boundary(t + 1)
        # Numbers only: one heatmap is rendered and logged when the run ends (log_matrix).
        self.session.logger.log_task(t, aware, so_far, self.step)
        say(f"task {t}: RA so far {data['metrics']['RA']:.4f}  "
            f"train {so_far['time/train_seconds']:.1f} s", show=False)

    # ------------------------------------------------------------------ files
    def save_boundary(self, tasks_done: int) -> None:
        """last.ckpt: everything needed to go on with task `tasks_done` (module docstring of
        metacl.checkpoint); the in-task checkpoint of the finished task is obsolete."""
        if not self.session.save_checkpoints:
            return
        self.ckpt_dir.mkdir(exist_ok=True)
        config = self.session.config
        state = {"format": checkpoint.FORMAT_VERSION, "kind": "boundary",
                 "config": config, "config_hash": checkpoint.config_hash(config),
                 "tasks_done": tasks_done, "step": self.step, "results": self.record.data,
                 "variant_rows": self.variant_rows, **checkpoint.capture(self.method)}
        checkpoint.atomic_save(state, self.ckpt_dir / checkpoint.BOUNDARY_FILE)
        (self.ckpt_dir / checkpoint.STEP_FILE).unlink(missing_ok=True)

    def summary(self) -> dict:
        data, val = self.record.data, self.record.validation
        values = dict(data["metrics"] or {})
        if val and val["metrics"]:
            values.update({f"val/{k}": v for k, v in val["metrics"].items()})
        values.update(data["timing"])
        values["tasks_done"] = len(data["accuracy_matrix"])
        return values

    def finish(self) -> None:
        """Final metrics, matrices as CSV and heatmap, the finished checkpoint, the logger."""
        data, val, out_dir = self.record.data, self.record.validation, self.session.out_dir
        R = data["accuracy_matrix"]
        data["metrics"] = compute_metrics(R, data["accuracy_before"])
        if val:
            val["metrics"] = compute_metrics(val["accuracy_matrix"], val["accuracy_before"])
        data["status"] = "completed"
        save_matrix_csv(R, out_dir / "accuracy_matrix.csv")
        save_matrix_heatmap(R, self.png, title=f"{self.session.name}: accuracy after each task")
        if self.info.multi_head:
            save_matrix_csv(data["accuracy_matrix_agnostic"],
                            out_dir / "accuracy_matrix_agnostic.csv")
        for variant, rows in self.variant_rows.items():
            save_matrix_csv(rows, out_dir / f"accuracy_matrix_{variant}.csv")
        self.record.save()
        if self.session.save_checkpoints:  # a later resume=true reports it, trains nothing
            self.save_boundary(self.info.n_tasks)
        logger = self.session.logger
        logger.log_matrix(R, str(self.png), self.step)
        if self.info.multi_head:
            logger.log_matrix(data["accuracy_matrix_agnostic"], None, self.step,
                              name="accuracy_matrix_agnostic")
        self.session.finish(self.summary())


def finished_metric(cfg, results: dict) -> float:
    """cfg.optimized_metric of a finished continual run's results (a resume that has nothing
    left to do)."""
    return metric_values(results)[cfg.get("optimized_metric", "RA")]
