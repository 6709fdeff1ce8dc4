"""What a method needs to know about the task stream, independent of where the data comes from."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TaskInfo:
    n_tasks: int
    input_shape: tuple[int, ...]  # (C, H, W) of one sample as the model sees it
    n_outputs: int  # size of the (shared) output layer
    task_classes: tuple[tuple[int, ...], ...]  # labels used by each task
    scenario: str  # "domain" (same labels, new inputs) or "class" (new labels per task)

    @property
    def multi_head(self) -> bool:
        """Class splits are evaluated task-aware: logits outside the task's classes are masked."""
        return self.scenario == "class"

    def class_mask(self) -> torch.Tensor:
        """(n_tasks, n_outputs) bool: which outputs belong to each task."""
        mask = torch.zeros(self.n_tasks, self.n_outputs, dtype=torch.bool)
        for t, classes in enumerate(self.task_classes):
            mask[t, list(classes)] = True
        return mask
