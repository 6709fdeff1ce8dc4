"""Finetune (plain SGD on the stream) and Joint (the IID oracle over all tasks at once)."""

from __future__ import annotations

import torch

from metacl.methods.base import ContinualMethod


class Finetune(ContinualMethod):
    def __init__(self, backbone, task_info, lr: float = 0.1, grad_clip_norm: float | None = 2.0,
                 **kwargs):
        super().__init__(backbone, task_info, **kwargs)
        self.lr = lr
        self.grad_clip_norm = grad_clip_norm
        # Created once so optimizer state (if any) survives the fresh Trainer of every task.
        self.optimizer = torch.optim.SGD(self.backbone.parameters(), lr=lr)

    def configure_optimizers(self):
        return self.optimizer

    def observe(self, x, y, t):
        opt = self.optimizers()
        for _ in range(self.glances):
            opt.zero_grad()
            loss = self.loss(self.backbone(x), y, t)
            self.manual_backward(loss)
            self.clip_and_step(opt, self.grad_clip_norm)
        return loss.detach()


class Joint(Finetune):
    """Trains on the union of every task's training data, once, when the first task starts."""

    def training_tasks(self, t: int, n_tasks: int) -> list[int]:
        return list(range(n_tasks)) if t == 0 else []
