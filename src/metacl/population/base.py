"""What the population loops share: the members, one member's failure, the run's frame.

    every member: resume its checkpoint, or not
    with the stop signals:  train()  (the protocol's loop: ContinualPopulationLoop, ...)
    every member: finish;  then every member's report line and metric

A member whose work raises ends alone (recorded in its results.json as its separate run would
record it); a stop signal ends every member as interrupted.
"""

from __future__ import annotations

import sys

import torch

from metacl.checkpoint import Interrupted, StopSignals
from metacl.runner.trainer import PRECISION_ALIASES


class MemberLoops:
    def __init__(self, members: list):
        self.members = members
        self.signals = StopSignals()
        self.device = members[0].loop.session.device
        self.population_class = type(members[0].method).population_class

    @staticmethod
    def precision_blocker(members: list, kind: str) -> str | None:
        """Populations train in 32-true precision only (`kind`: continual, few-shot)."""
        precisions = {PRECISION_ALIASES.get(str(m.loop.session.cfg.trainer.precision))
                      for m in members}
        if precisions != {"32-true"}:
            return f"{kind} populations train in 32-true precision, not {precisions}"
        return None

    @property
    def active(self) -> list:
        return [m for m in self.members if m.active]

    # ------------------------------------------------------------------ failures
    def guard(self, member, work) -> None:
        """Run `work()` for one member (its Hydra config and random state); an exception ends
        that member only, recorded as its separate run would record it."""
        try:
            with member.job():
                work()
        except Exception as err:  # noqa: BLE001  (one member's failure is its own)
            self.drop(member, err)

    def drop(self, member, err: Exception, alone: bool = True) -> None:
        """End one member with err (`alone`: the others go on)."""
        member.active = False
        member.value = float("nan")
        with member.job():
            member.loop.fail(err)
        status = member.loop.record.data["status"]
        why = status if status.startswith("failed") else f"{status}: {err}"  # failed: names it
        others = "; the others go on" if alone and self.active else ""
        print(f"population member {member.loop.session.name} {why}{others}", file=sys.stderr)

    def interrupt(self, signum: int) -> None:
        """A stop signal: every member ends as interrupted (at its last checkpoint)."""
        err = Interrupted(signum)
        for m in self.active:
            with m.job():
                m.loop.fail(err)
            m.active = False
        raise err

    # ------------------------------------------------------------------ the run
    def run(self) -> None:
        for k, m in enumerate(self.members):
            if m.loop.resume is not None:
                self.guard(m, m.loop.continue_checkpoint)
            m.loop.record.data["population"] = {"members": len(self.members), "index": k}
            if m.processes > 1:  # one part of a group split over processes
                m.loop.record.data["population"]["processes"] = m.processes
        try:
            with self.signals:
                self.train()
                for m in self.active:
                    self.guard(m, m.loop.finish)
        except Interrupted:
            raise
        except BaseException as err:
            if isinstance(err, torch.OutOfMemoryError):
                err = self.out_of_memory()
                for m in self.active:
                    m.out_of_memory = True
            for m in self.active:
                self.drop(m, err if isinstance(err, Exception) else RuntimeError(str(err)),
                          alone=False)
            if not isinstance(err, Exception):
                raise
            return
        for m in self.active:
            with m.job():
                m.value = m.loop.report()

    def out_of_memory(self) -> RuntimeError:
        """The members' failure when they do not fit together: one line that says how many
        trained together, the device's peak, and the `max_members` that halves the groups."""
        n = len(self.active)
        peak = ""
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            used = torch.cuda.max_memory_allocated(self.device)
            peak = f" (peak {used / 2**30:.1f} GiB allocated of {total / 2**30:.1f} GiB)"
        half = max(1, n // 2)
        return RuntimeError(f"out of memory training {n} members together{peak}; "
                            f"hydra.launcher.max_members={half} trains at most {half} at once")

    def train(self) -> None:
        raise NotImplementedError
