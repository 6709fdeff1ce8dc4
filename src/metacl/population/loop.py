"""The continual loop of a population: every member's ContinualLoop, trained together.

    every member: resume its checkpoint, or evaluate the row before training
    for t in tasks:
        every member: before_task                       (under its own random state)
        pop = Method.population_class(members)          # stacked trained state
        for each epoch, for each step: pop.observe(one batch of every member)
        pop.write_back();  every member: after_task, R[t], checkpoint, W&B row
    every member: finish (results.json, matrices, W&B summary)

Everything a member writes goes through its own ContinualLoop, so its folder, results.json,
checkpoints and W&B run are those of a separate run. A member whose loss becomes NaN/inf is
marked `diverged` and leaves the population; the others go on. Every
`checkpoint.every_n_steps` batches, and when a stop signal arrives, every member saves its
in-task step.ckpt (the separate run's format: its state, random state and stream position); a
stop signal then ends every member as interrupted. Rerunning the command into the same folders
resumes them all together from there (or one by one if they stopped at different positions).
"""

from __future__ import annotations

import math
import time

import torch

from metacl import checkpoint
from metacl.population.base import MemberLoops
from metacl.runner.health import (
    DivergedError,
    check_finite_weights,
    check_last_loss,
    synchronize,
)

LOG_EVERY = 50  # batches between loss logs (one host sync for all members), as a single run


class PopulationLoop(MemberLoops):
    @staticmethod
    def blocker(members: list) -> str | None:
        """Why these prepared members cannot train together (None: they can)."""
        precision = MemberLoops.precision_blocker(members, "continual")
        if precision:
            return precision
        starts = {0 if m.loop.resume is None else int(m.loop.resume.boundary["tasks_done"])
                  for m in members}
        if len(starts) > 1:
            return f"members resume at different tasks {sorted(starts)}"
        positions = {None if m.loop.resume is None or m.loop.resume.step is None else
                     (int(m.loop.resume.step["step"]),
                      *(int(m.loop.resume.step["position"][k]) for k in ("epoch", "batch")))
                     for m in members}
        if len(positions) > 1:
            return "members resume at different positions inside the task"
        return None

    def __init__(self, members: list):
        super().__init__(members)
        first = members[0].loop
        self.n_tasks = first.info.n_tasks
        self.max_epochs = int(first.session.cfg.trainer.max_epochs)
        self.progress = first.progress

    def train(self) -> None:
        for m in self.active:
            if m.loop.resume is None:
                self.guard(m, m.loop.evaluate_before)
        starts = {m.loop.first_task for m in self.active}
        if len(starts) > 1:
            raise RuntimeError(f"population members resume at different tasks "
                               f"{sorted(starts)}; run them one by one")
        first = starts.pop() if starts else self.n_tasks
        with self.progress:
            for t in range(first, self.n_tasks):
                self.train_task(t)
                for m in self.active:
                    self.guard(m, lambda m=m, t=t: m.loop.record_row(t))
                if self.signals.pending is not None and t + 1 < self.n_tasks:
                    self.interrupt(self.signals.pending)

    # ------------------------------------------------------------------ one task
    def train_task(self, t: int) -> None:
        streams, epochs = {}, set()
        for m in self.active:
            def start(m=m):
                train_tasks, position = m.loop.start_task(t)
                epochs.add(0 if position is None else int(position["epoch"]))
                if train_tasks and self.max_epochs > 0:
                    m.loop.dm.set_task(t, train_tasks)
                    if position is not None and (position["batch"] or
                                                 position.get("order") is not None):
                        m.loop.dm.resume_train_at(position.get("order"), position["batch"])
                    streams[id(m)] = m.loop.dm.train_dataloader()
            self.guard(m, start)
        training = [m for m in self.active if id(m) in streams]
        if len(epochs) > 1:  # the blocker compares positions before the members are built
            raise RuntimeError(f"population members resume task {t} at epochs {epochs}")
        if training:
            self.fit(t, training, [streams[id(m)] for m in training], epochs.pop())
        for m in self.active:
            self.guard(m, lambda m=m: (check_last_loss(m.method, t, m.loop.step),
                                       m.loop.end_task(t)))

    def fit(self, t: int, training: list, loaders: list, first_epoch: int = 0) -> None:
        """Every epoch of task t for the training members, one step for all at a time (from
        `first_epoch` and each loader's resumed batch when a step checkpoint resumes)."""
        total = max(len(loader) for loader in loaders) * self.max_epochs
        bar = self.progress.add_task("", total=total, task=f"{t + 1}/{self.n_tasks}",
                                     loss=f"{len(training)} members")
        every = training[0].loop.session.checkpoint_every
        synchronize(self.device)
        started = time.perf_counter()
        pop = self.population_class([m.method for m in training])
        losses = None
        for epoch in range(first_epoch, self.max_epochs):
            if epoch == first_epoch:  # a resumed task: the batches done before the stop
                self.progress.advance(bar, epoch * len(loaders[0]) + loaders[0].resume_batch)
            iters = []
            for m, loader in zip(training, loaders):
                iters.append(iter(loader))
            seen = {id(m): 0 for m in training}  # batches of this epoch, per member
            while True:
                batches = []
                for m, it in zip(training, iters):
                    with m.random:
                        batch = next(it, None)
                        if batch is not None:
                            batch = m.loop.dm.on_after_batch_transfer(batch, 0)
                    batches.append(batch)
                if all(b is None for b in batches):
                    break
                step_losses = pop.observe(batches, [m.random for m in training], epoch)
                had = [i for i, b in enumerate(batches) if b is not None]
                if losses is None or len(had) == len(batches):
                    losses = step_losses
                else:  # members past the end of a shorter task keep their last loss
                    losses[had] = step_losses[had]
                for m, batch in zip(training, batches):
                    if batch is not None:
                        m.loop.step += 1
                        seen[id(m)] += 1
                self.progress.advance(bar)
                step = max(m.loop.step for m in training)
                save = self.signals.pending is not None or (every > 0 and step % every == 0)
                if step % LOG_EVERY == 0 or save:  # a checkpoint needs finite members too
                    keep = self.log_losses(t, training, losses, log=step % LOG_EVERY == 0)
                    if len(keep) < len(training):  # a member diverged: the rest go on
                        pop.write_back()
                        iters = [it for m, it in zip(training, iters) if m in keep]
                        losses = losses[[training.index(m) for m in keep]]
                        training = keep
                        if not training:
                            break
                        pop = self.population_class([m.method for m in training])
                if save and training:
                    pop.write_back()
                    elapsed = time.perf_counter() - started
                    for i, m in enumerate(training):
                        m.method.last_loss = losses[i]
                        args = (m, t, epoch, seen[id(m)], elapsed)
                        self.guard(m, lambda args=args: self.save_step(*args))
                if self.signals.pending is not None:
                    break
            if self.signals.pending is not None or not training:
                break
        if training:
            pop.write_back()
        synchronize(self.device)
        seconds = time.perf_counter() - started
        self.progress.remove_task(bar)
        memory = self.peak_memory_per_member(len(training))
        for i, m in enumerate(training):
            m.loop.record.timing["train_seconds"] += seconds
            if losses is not None:  # None: resumed at the end of the task's last epoch
                m.method.last_loss = losses[i]
            if memory is not None:
                population = m.loop.record.data["population"]
                population["peak_memory_per_member_mb"] = max(
                    memory, population.get("peak_memory_per_member_mb", 0.0))
        if self.signals.pending is not None:
            self.interrupt(self.signals.pending)

    @staticmethod
    def save_step(m, t: int, epoch: int, seen: int, elapsed: float) -> None:
        """Member m's step.ckpt after `seen` batches of `epoch`: what its separate run's
        InTaskCheckpoints saves at the same step (runner.callbacks)."""
        in_task = m.loop.in_task
        if not in_task.enabled:
            return
        check_last_loss(m.method, t, m.loop.step)  # never checkpoint a diverged state
        check_finite_weights(m.method, t, m.loop.step)
        loader = m.loop.dm.train_loader
        done, order = loader.epoch_start_batch + seen, loader.order
        if done >= len(loader):  # the epoch is over: resume at the next one
            epoch, done, order = epoch + 1, 0, None
        state = {
            **in_task.base,
            **checkpoint.capture(m.method),  # inside m.job(): the member's random state
            "kind": "step",
            "step": m.loop.step,
            "train_seconds": in_task.base["train_seconds"] + elapsed,
            "position": {"task": t, "epoch": epoch, "batch": done,
                         "order": None if order is None else order.cpu()},
        }
        checkpoint.atomic_save(state, in_task.path)

    def peak_memory_per_member(self, n: int) -> float | None:
        """The GPU's peak allocated memory so far divided by the members (MiB); None on CPU."""
        if self.device.type != "cuda" or n == 0:
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / n / 2**20, 1)

    def log_losses(self, t: int, training: list, losses: torch.Tensor, log: bool = True) -> list:
        """Every member's loss to its logger (one host sync; `log` false: the check alone, as
        a separate run logs only every LOG_EVERY batches); the members still finite."""
        keep = []
        for m, loss in zip(training, losses.tolist()):
            if math.isfinite(loss):
                if log:
                    m.loop.session.logger.log_metrics({"train/loss": loss, "task": t},
                                                      m.loop.step)
                keep.append(m)
            else:
                self.drop(m, DivergedError(f"training loss became {loss} in task {t} "
                                           f"(batch {m.loop.step})"))
        return keep

