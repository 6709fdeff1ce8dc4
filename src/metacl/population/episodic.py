"""The episodic (few-shot) loop of a population: every member's EpisodicLoop, meta-trained
together.

    every member: resume its checkpoint (all at the same epoch and meta-batch)
    pop = Method.population_class(members)              # stacked weights and Adam state
    for each epoch, for each meta-batch:
        every member draws its meta-batch               (its own episode generator and
                                                          random state, as its separate run)
        pop.observe(the N meta-batches)                 # one meta-update of every member
        every LOG_EVERY meta-batches: the losses (a NaN/inf member leaves, the others go on)
        every checkpoint.every_n_steps / on a stop signal: write_back, every member's last.ckpt
    after each epoch: write_back; every member: val episodes, last.ckpt
    every member: finish (test episodes, results.json, final checkpoint, W&B summary)

Everything a member writes goes through its own EpisodicLoop (metacl.runner.episodic), so its
folder, results.json, checkpoints and W&B run are those of a separate run; its checkpoints
resume as a single run or as a member. The members are not trained by a Lightning Trainer; a
Trainer is built once only for the global torch flags its fit would set (deterministic
algorithms, cuDNN benchmark). Evaluation (val and test episodes) runs member by member.
"""

from __future__ import annotations

import math
import time

import torch

from metacl.population.base import MemberLoops
from metacl.runner.health import DivergedError, synchronize

LOG_EVERY = 50  # meta-batches between loss logs (one host sync for all members), as a single run


def position_of(member) -> tuple[int, int]:
    """(epoch, meta-batches done) where the member's training starts."""
    resume = member.loop.resume
    if resume is None:
        return 0, 0
    position = resume.boundary["position"]
    return int(position["epoch"]), int(position["batch"])


class EpisodicPopulationLoop(MemberLoops):
    @staticmethod
    def blocker(members: list) -> str | None:
        """Why these prepared members cannot train together (None: they can)."""
        precision = MemberLoops.precision_blocker(members, "few-shot")
        if precision:
            return precision
        positions = {position_of(m) for m in members}
        if len(positions) > 1:
            return f"members resume at different (epoch, meta-batch) {sorted(positions)}"
        return None

    def __init__(self, members: list):
        super().__init__(members)
        first = members[0].loop
        self.max_epochs = first.max_epochs
        self.per_epoch = first.dm.meta_batches_per_epoch
        self.has_val = bool(first.dm.n_episodes["val"])
        self.every = first.session.checkpoint_every
        self.progress, self.bar = first.progress, first.bar
        self.mark = 0.0

    def train(self) -> None:
        if self.active:
            with self.active[0].job():  # the torch flags a single run's fit sets
                self.active[0].loop.session.trainer([], inference_mode=False)
            with self.progress:
                self.meta_train(position_of(self.active[0]))

    # ------------------------------------------------------------------ meta-training
    def account(self, training: list) -> None:
        """The wall time since the last mark is every training member's training time."""
        synchronize(self.device)
        now = time.perf_counter()
        for m in training:
            m.loop.stream.seconds += now - self.mark
        self.mark = now

    def meta_train(self, position: tuple[int, int]) -> None:
        start_epoch, start_batch = position
        if start_epoch >= self.max_epochs:
            return
        training = self.active
        self.progress.update(self.bar, loss=f"{len(training)} members")
        self.progress.advance(self.bar, start_epoch * self.per_epoch + start_batch)
        if start_batch:
            for m in training:
                m.loop.dm.resume_train_at(None, start_batch)
        synchronize(self.device)
        self.mark = time.perf_counter()
        pop = self.population_class([m.method for m in training])
        losses = None
        for epoch in range(start_epoch, self.max_epochs):
            iters = [iter(m.loop.dm.train_dataloader()) for m in training]
            done = start_batch if epoch == start_epoch else 0
            while done < self.per_epoch:
                batches = []
                for m, it in zip(training, iters):
                    with m.random:
                        batches.append(next(it))
                losses = pop.observe(batches, [m.random for m in training], epoch)
                done += 1
                for m in training:
                    m.loop.stream.step += 1
                self.progress.advance(self.bar)
                step = training[0].loop.stream.step
                if step % LOG_EVERY == 0:
                    self.log_losses(training, losses)
                pending = self.signals.pending if done < self.per_epoch else None
                if pending is not None or (done < self.per_epoch and self.every > 0
                                           and step % self.every == 0):
                    self.save(pop, training, losses, epoch, done)
                if any(not m.active for m in training):  # diverged: the others go on
                    pop.write_back()
                    pop, training, iters, losses = self.survivors(training, iters, losses)
                    if not training:
                        return
                if pending is not None:
                    self.interrupt(pending)
            # the epoch's end: as the single run's ValidationCallback, then its checkpoint
            self.write_back(pop, training, losses)
            self.account(training)
            for m in training:
                if self.has_val:
                    seconds = m.loop.validation.seconds
                    self.guard(m, lambda m=m, e=epoch: m.loop.validation.evaluate(m.method, e))
                    m.loop.stream.seconds += m.loop.validation.seconds - seconds
                if m.active:
                    self.guard(m, lambda m=m, e=epoch: m.loop.save_state(e + 1, 0))
            synchronize(self.device)
            self.mark = time.perf_counter()
            if any(not m.active for m in training):
                pop, training, iters, losses = self.survivors(training, iters, losses)
                if not training:
                    return
            if self.signals.pending is not None:
                self.interrupt(self.signals.pending)

    def survivors(self, training: list, iters: list, losses):
        """After a write_back: the population of the members still training."""
        kept = [i for i, m in enumerate(training) if m.active]
        training = [training[i] for i in kept]
        pop = self.population_class([m.method for m in training]) if training else None
        return pop, training, [iters[i] for i in kept], losses[kept]

    def write_back(self, pop, training: list, losses) -> None:
        pop.write_back()
        for i, m in enumerate(training):
            m.method.last_loss = losses[i]

    def save(self, pop, training: list, losses, epoch: int, done: int) -> None:
        """Every member's last.ckpt after `done` meta-batches of `epoch` (in-epoch saves)."""
        self.write_back(pop, training, losses)
        self.account(training)
        for m in training:
            if m.active:
                self.guard(m, lambda m=m: m.loop.save_state(epoch, done))
        self.mark = time.perf_counter()

    def log_losses(self, training: list, losses: torch.Tensor) -> None:
        """Every member's loss to its logger (one host sync); a NaN/inf member is dropped as
        its separate run would stop (diverged)."""
        self.account(training)
        for m, loss in zip(training, losses.tolist()):
            step = m.loop.stream.step
            if math.isfinite(loss):
                m.loop.session.logger.log_metrics({"train/loss": loss, "task": 0}, step)
            else:
                self.drop(m, DivergedError(f"training loss became {loss} in task 0 "
                                           f"(batch {step})"))
