"""Finetune (plain SGD on the stream), Joint (the IID oracle over all tasks at once), and HAT's
references SGD-frozen (shared layers frozen after the first tasks) and Random (never trained)."""

from __future__ import annotations

import torch

from metacl.methods.base import SGDMethod
from metacl.methods.population import SGDPopulation


class Finetune(SGDMethod):
    """For each incoming batch, `glances` SGD steps on its loss (SGDMethod's loop as is)."""
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"
    population_keys, population_class = ("lr",), SGDPopulation

    def __init__(self, backbone, task_info, lr: float = 0.1, grad_clip_norm: float | None = 2.0,
                 **kwargs):
        super().__init__(backbone, task_info, lr=lr, grad_clip_norm=grad_clip_norm, **kwargs)


class Joint(Finetune):
    """Trains on the union of every task's training data, once, when the first task starts."""

    def training_tasks(self, t: int, n_tasks: int) -> list[int]:
        return list(range(n_tasks)) if t == 0 else []


class FrozenFeatures(Finetune):
    """HAT's `sgd-frozen`: plain SGD, but once `freeze_after` tasks are learned every layer
    except the output layer is frozen, so later tasks only train their own head."""
    population_keys, population_class = (), None  # frozen layers: one run at a time

    def __init__(self, backbone, task_info, freeze_after: int = 1, **kwargs):
        super().__init__(backbone, task_info, **kwargs)
        self.freeze_after = freeze_after
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    def after_load(self) -> None:
        super().after_load()
        self._apply_freeze()

    def _apply_freeze(self) -> None:
        for p in list(self.backbone.parameters())[:-2]:  # all but the linear head
            p.requires_grad_(not bool(self.frozen))

    def after_task(self, t: int, datamodule) -> None:
        super().after_task(t, datamodule)
        if t + 1 >= self.freeze_after:
            self.frozen.fill_(True)
            self._apply_freeze()


class Random(Finetune):
    """An untrained network (HAT's `random`): the floor of the forgetting ratio. Trains nothing,
    so every row of its matrix is its accuracy before training."""

    def training_tasks(self, t: int, n_tasks: int) -> list[int]:
        return []
