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
marked `diverged` and leaves the population; the others go on. A stop signal ends every
member as interrupted at its last task boundary (population runs keep no in-task
checkpoints); rerunning the command into the same folders resumes them all from there.
"""

from __future__ import annotations

import math
import time

import torch

from metacl.population.base import MemberLoops
from metacl.runner.health import DivergedError, check_last_loss, synchronize
from metacl.runner.trainer import PRECISION_ALIASES

LOG_EVERY = 50  # batches between loss logs (one host sync for all members), as a single run


class PopulationLoop(MemberLoops):
    @staticmethod
    def blocker(members: list) -> str | None:
        """Why these prepared members cannot train together (None: they can)."""
        precisions = {PRECISION_ALIASES.get(str(m.loop.session.cfg.trainer.precision))
                      for m in members}
        if precisions != {"32-true"}:
            return f"continual populations train in 32-true precision, not {precisions}"
        if any(m.loop.resume is not None and m.loop.resume.step is not None for m in members):
            return "a member resumes inside a task (populations resume at task boundaries)"
        starts = {0 if m.loop.resume is None else int(m.loop.resume.boundary["tasks_done"])
                  for m in members}
        if len(starts) > 1:
            return f"members resume at different tasks {sorted(starts)}"
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
        streams = {}
        for m in self.active:
            def start(m=m):
                train_tasks, position = m.loop.start_task(t)
                if position is not None:
                    raise RuntimeError("a population resumes at task boundaries only")
                if train_tasks and self.max_epochs > 0:
                    m.loop.dm.set_task(t, train_tasks)
                    streams[id(m)] = m.loop.dm.train_dataloader()
            self.guard(m, start)
        training = [m for m in self.active if id(m) in streams]
        if training:
            self.fit(t, training, [streams[id(m)] for m in training])
        for m in self.active:
            self.guard(m, lambda m=m: (check_last_loss(m.method, t, m.loop.step),
                                       m.loop.end_task(t)))

    def fit(self, t: int, training: list, loaders: list) -> None:
        """Every epoch of task t for the training members, one step for all at a time."""
        total = max(len(loader) for loader in loaders) * self.max_epochs
        bar = self.progress.add_task("", total=total, task=f"{t + 1}/{self.n_tasks}",
                                     loss=f"{len(training)} members")
        synchronize(self.device)
        started = time.perf_counter()
        pop = self.population_class([m.method for m in training])
        losses = None
        for epoch in range(self.max_epochs):
            iters = []
            for m, loader in zip(training, loaders):
                iters.append(iter(loader))
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
                self.progress.advance(bar)
                step = max(m.loop.step for m in training)
                if step % LOG_EVERY == 0:
                    keep = self.log_losses(t, training, losses)
                    if len(keep) < len(training):  # a member diverged: the rest go on
                        pop.write_back()
                        iters = [it for m, it in zip(training, iters) if m in keep]
                        losses = losses[[training.index(m) for m in keep]]
                        training = keep
                        if not training:
                            break
                        pop = self.population_class([m.method for m in training])
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
            m.method.last_loss = losses[i]
            if memory is not None:
                population = m.loop.record.data["population"]
                population["peak_memory_per_member_mb"] = max(
                    memory, population.get("peak_memory_per_member_mb", 0.0))
        if self.signals.pending is not None:
            self.interrupt(self.signals.pending)

    def peak_memory_per_member(self, n: int) -> float | None:
        """The GPU's peak allocated memory so far divided by the members (MiB); None on CPU."""
        if self.device.type != "cuda" or n == 0:
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / n / 2**20, 1)

    def log_losses(self, t: int, training: list, losses: torch.Tensor) -> list:
        """Every member's loss to its logger (one host sync); the members still finite."""
        keep = []
        for m, loss in zip(training, losses.tolist()):
            if math.isfinite(loss):
                m.loop.session.logger.log_metrics({"train/loss": loss, "task": t}, m.loop.step)
                keep.append(m)
            else:
                self.drop(m, DivergedError(f"training loss became {loss} in task {t} "
                                           f"(batch {m.loop.step})"))
        return keep

