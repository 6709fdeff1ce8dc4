"""One member of a population: its prepared job and its own random state."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from metacl.checkpoint import rng_state, set_rng_state


class MemberRandom:
    """A member's global random state, kept while other members use the generators.

    `with random:` (the hot path, around every random draw of one training step) swaps in the
    member's torch generator states (CPU, and the GPU's when the run is on one) and stores them
    back afterwards; `with random.full():` swaps every generator a checkpoint saves (python,
    numpy, torch, CUDA) for the work between tasks. A member's sequence of draws is therefore
    exactly its separate run's."""

    def __init__(self, device: torch.device):
        self.state = rng_state()
        self.cuda = device.index or 0 if device.type == "cuda" else None
        self._outside: list = []

    def _generators(self) -> list[tuple[torch.Generator, str]]:
        gens = [(torch.default_generator, "torch")]
        if self.cuda is not None:
            gens.append((torch.cuda.default_generators[self.cuda], "cuda"))
        return gens

    def _get(self, key: str):
        return self.state["cuda"][self.cuda] if key == "cuda" else self.state[key]

    def _put(self, key: str, value) -> None:
        if key == "cuda":
            self.state["cuda"][self.cuda] = value
        else:
            self.state[key] = value

    def __enter__(self):
        gens = self._generators()
        self._outside.append([g.get_state() for g, _ in gens])
        for g, key in gens:
            g.set_state(self._get(key))
        return self

    def __exit__(self, *exc) -> None:
        outside = self._outside.pop()
        for (g, key), state in zip(self._generators(), outside):
            self._put(key, g.get_state())
            g.set_state(state)

    @contextmanager
    def full(self):
        outside = rng_state()
        set_rng_state(self.state)
        try:
            yield self
        finally:
            self.state = rng_state()
            set_rng_state(outside)


@dataclass
class Member:
    """A prepared job of the population: Hydra's view of it (to re-activate when the job
    writes), its JobReturn (filled in at the end), its loop and folder lock, its random state."""

    index: int  # position in the launcher's job list
    hydra_cfg: object  # HydraConfig.instance().cfg while this job was set up
    ret: object  # hydra.core.utils.JobReturn
    loop: object | None = None  # ContinualLoop (None: finished or failed in preparation)
    lock: object | None = None
    random: MemberRandom | None = None
    value: float = float("nan")  # the job's return value so far
    active: bool = True
    notes: list[str] = field(default_factory=list)
    processes: int = 1  # the processes its group was split over (hydra.launcher.processes)
    out_of_memory: bool = False  # failed because its population did not fit (retried smaller)

    @property
    def method(self):
        return self.loop.method

    @contextmanager
    def job(self):
        """This member's Hydra config (`${hydra:...}`) and full random state."""
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.instance()
        previous = hc.cfg
        if self.hydra_cfg is not None:  # None: composed without Hydra's runtime (tests)
            hc.cfg = self.hydra_cfg
        try:
            with self.random.full():
                yield self
        finally:
            hc.cfg = previous
