"""Meta-Experience Replay (Riemer et al., 2019), Algorithm 1 ("MER with reservoir sampling").

The stream is processed one sample at a time, whatever `batch_size` the loader uses. For each
incoming sample (x, y):

    theta_0 <- theta
    for i in 1..batches_per_example:
        B_i <- (x, y) followed by `replay_batch_size` distinct samples drawn from the memory
        theta_A <- theta
        for each sample of B_i in turn:              # plain SGD, batch of one, step size lr
            theta <- theta - lr * clip(grad loss(sample; theta), grad_clip_norm)
        theta <- theta_A + beta * (theta - theta_A)  # within-batch Reptile
    theta <- theta_0 + gamma * (theta - theta_0)     # across-batch Reptile
    offer (x, y) to the reservoir memory

Each sample's loss is masked to its own task's classes on class splits. The memory is a
reservoir of `memories` samples shared by all tasks (metacl.memory.ReservoirBuffer), updated
after every sample as in Algorithm 1, so a sample can be replayed by the next one of its batch.

Reference details kept: the incoming sample is the first of every batch; each single-sample
SGD step is clipped to `grad_clip_norm` (La-MAML's copy; MER's own code does not clip). One
difference: MER's code reshuffles the memory before each draw, so a batch can repeat a
memory; here the samples of one batch are distinct. `glances` is not used (the number of
updates per sample is set by batches_per_example and replay_batch_size).
"""

from __future__ import annotations

import torch

from metacl.memory import ReservoirBuffer
from metacl.methods.base import ContinualMethod


class MER(ContinualMethod):
    def __init__(self, backbone, task_info, lr: float = 0.1, memories: int = 200,
                 replay_batch_size: int = 10, batches_per_example: int = 5, beta: float = 0.01,
                 gamma: float = 1.0, grad_clip_norm: float | None = 10.0, **kwargs):
        super().__init__(backbone, task_info, **kwargs)
        self.lr = lr
        self.replay_batch_size = int(replay_batch_size)
        self.batches_per_example = int(batches_per_example)
        self.beta = beta
        self.gamma = gamma
        self.grad_clip_norm = grad_clip_norm
        self.memory = ReservoirBuffer(memories, task_info.input_shape)
        self.optimizer = torch.optim.SGD(self.backbone.parameters(), lr=lr)

    def configure_optimizers(self):
        return self.optimizer

    @staticmethod
    @torch.no_grad()
    def reptile(params: list[torch.Tensor], start: list[torch.Tensor], weight: float) -> None:
        """theta <- start + weight * (theta - start), in place on params."""
        torch._foreach_lerp_(start, params, weight)
        torch._foreach_copy_(params, start)

    def observe(self, x, y, t):
        opt = self.optimizers()
        params = list(self.backbone.parameters())
        total = torch.zeros((), device=x.device)
        n_steps = 0
        for i in range(x.shape[0]):
            xi, yi, ti = x[i:i + 1], y[i:i + 1], t[i:i + 1]
            theta_0 = [p.detach().clone() for p in params]
            for _ in range(self.batches_per_example):
                mx, my, mt = self.memory.sample(self.replay_batch_size)
                bx, by, bt = torch.cat([xi, mx]), torch.cat([yi, my]), torch.cat([ti, mt])
                theta_a = [p.detach().clone() for p in params]
                for j in range(len(by)):
                    opt.zero_grad()
                    loss = self.loss(self.backbone(bx[j:j + 1]), by[j:j + 1], bt[j:j + 1])
                    self.manual_backward(loss)
                    self.clip_and_step(opt, self.grad_clip_norm)
                    total += loss.detach()
                    n_steps += 1
                self.reptile(params, theta_a, self.beta)
            self.reptile(params, theta_0, self.gamma)
            self.memory.add(xi, yi, ti)
        return total / max(n_steps, 1)
