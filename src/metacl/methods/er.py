"""Experience Replay with a reservoir memory (La-MAML's eralg4, Chaudhry et al. 2019).

For each incoming batch, `glances` times: draw `replay_batch_size` samples from the memory, take
one SGD step on the incoming + replayed samples (each sample's loss masked to its own task's
classes on class splits). Then offer the incoming samples to the reservoir.
"""

from __future__ import annotations

import torch

from metacl.memory import ReservoirBuffer
from metacl.methods.base import SGDMethod
from metacl.methods.population import SGDPopulation


class ER(SGDMethod):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"
    population_keys, population_class = ("lr",), SGDPopulation

    def __init__(self, backbone, task_info, lr: float = 0.1, memories: int = 200,
                 replay_batch_size: int = 10, grad_clip_norm: float | None = 2.0, **kwargs):
        super().__init__(backbone, task_info, lr=lr, grad_clip_norm=grad_clip_norm, **kwargs)
        self.replay_batch_size = replay_batch_size
        self.memory = ReservoirBuffer(memories, task_info.input_shape)

    def glance_batch(self, x, y, t):
        mx, my, mt = self.memory.sample(self.replay_batch_size)
        return torch.cat([x, mx]), torch.cat([y, my]), torch.cat([t, mt])

    def after_glances(self, x, y, t):
        self.memory.add(x, y, t)
