"""Experience Replay with a reservoir memory (La-MAML's eralg4, Chaudhry et al. 2019).

For each incoming batch, `glances` times: draw `replay_batch_size` samples from the memory, take
one SGD step on the incoming + replayed samples (each sample's loss masked to its own task's
classes on class splits). Then offer the incoming samples to the reservoir.
"""

from __future__ import annotations

import torch

from metacl.memory import ReservoirBuffer
from metacl.methods.base import ContinualMethod


class ER(ContinualMethod):
    def __init__(self, backbone, task_info, lr: float = 0.1, memories: int = 200,
                 replay_batch_size: int = 10, grad_clip_norm: float | None = 2.0, **kwargs):
        super().__init__(backbone, task_info, **kwargs)
        self.lr = lr
        self.replay_batch_size = replay_batch_size
        self.grad_clip_norm = grad_clip_norm
        self.memory = ReservoirBuffer(memories, task_info.input_shape)
        self.optimizer = torch.optim.SGD(self.backbone.parameters(), lr=lr)

    def configure_optimizers(self):
        return self.optimizer

    def observe(self, x, y, t):
        opt = self.optimizers()
        for _ in range(self.glances):
            mx, my, mt = self.memory.sample(self.replay_batch_size)
            bx, by, bt = torch.cat([x, mx]), torch.cat([y, my]), torch.cat([t, mt])
            opt.zero_grad()
            loss = self.loss(self.backbone(bx), by, bt)
            self.manual_backward(loss)
            self.clip_and_step(opt, self.grad_clip_norm)
        self.memory.add(x, y, t)
        return loss.detach()
