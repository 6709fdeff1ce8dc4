"""Elastic Weight Consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018).

Training on task t minimises  loss_t(theta) + ewc_lambda / 2 * sum_i F_i (theta_i - theta*_i)^2,
where loss_t is the cross-entropy (masked to each sample's task classes on class splits) and
F is a diagonal Fisher. After each task, F_t is estimated on that task's training data (mean
squared per-sample gradients of -log p(y|x); `fisher_labels` chooses dataset labels or labels
sampled from the model; `fisher_estimator: batch` squares minibatch gradients instead, as
FACIL / PyCIL / LibContinual do) and consolidated:

- EWC (online=false): one quadratic per past task, sum_k F_k (theta - theta_k)^2. Stored in
  O(#params) as the equal quadratic F (theta - theta*)^2 + const with F = sum_k F_k and
  theta* = sum_k F_k theta_k / F (the Fisher-weighted mean anchor); the constant does not change
  any gradient and is left out of the reported loss.
- online EWC (online=true): F <- gamma * F + F_t and theta* <- theta_t (the latest weights).

Fisher and anchor are buffers, so `state_dict()` restores them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metacl.data.datamodule import TensorBatches
from metacl.methods.common import (
    BufferList,
    IncrementalMethod,
    check_fisher_options,
    diagonal_fisher,
)


class EWC(IncrementalMethod):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"

    def __init__(self, backbone, task_info, ewc_lambda: float = 1000.0, online: bool = False,
                 gamma: float = 1.0, fisher_labels: str = "dataset",
                 fisher_estimator: str = "per_sample", fisher_samples: int | None = None,
                 fisher_batch_size: int = 64, **kwargs):
        super().__init__(backbone, task_info, **kwargs)
        check_fisher_options(fisher_labels, fisher_estimator)  # before training, not after
        self.fisher_estimator = fisher_estimator
        self.ewc_lambda = ewc_lambda
        self.online = online
        self.gamma = gamma
        self.fisher_labels = fisher_labels
        self.fisher_samples = fisher_samples
        self.fisher_batch_size = fisher_batch_size
        params = list(self.backbone.parameters())
        self.fisher = BufferList(torch.zeros_like(p) for p in params)
        self.anchor = BufferList(p.detach().clone() for p in params)
        self.register_buffer("n_consolidated", torch.zeros((), dtype=torch.long))
        self._n_consolidated = 0  # host mirror: no penalty before the first consolidation

    def after_load(self) -> None:
        super().after_load()
        self._n_consolidated = int(self.n_consolidated)

    def penalty(self) -> Tensor:
        """sum_i F_i (theta_i - theta*_i)^2 (without the lambda/2 factor)."""
        total = torch.zeros((), device=self.n_consolidated.device)
        for p, a, f in zip(self.backbone.parameters(), self.anchor, self.fisher):
            total = total + (f * (p - a).pow(2)).sum()
        return total

    def objective(self, x, y, t):
        loss = self.loss(self.backbone(x), y, t)
        if self._n_consolidated:
            loss = loss + self.ewc_lambda / 2 * self.penalty()
        return loss

    @torch.no_grad()
    def consolidate(self, new_fisher: list[Tensor]) -> None:
        """Fold the current weights and their Fisher into the penalty (see module docstring)."""
        for p, a, f, fn in zip(self.backbone.parameters(), self.anchor, self.fisher, new_fisher):
            if self.online or self._n_consolidated == 0:
                f.mul_(self.gamma if self.online else 0.0).add_(fn)
                a.copy_(p)
            else:
                total = f + fn
                mean = (f * a + fn * p) / total.clamp_min(1e-30)
                a.copy_(torch.where(total > 0, mean, p))
                f.copy_(total)
        self._n_consolidated += 1
        self.n_consolidated.fill_(self._n_consolidated)

    def task_fisher(self, t: int, datamodule) -> list[Tensor]:
        task = datamodule.tasks[t]
        x, y = task.x_train, task.y_train
        if self.fisher_samples is not None and self.fisher_samples < len(y):
            keep = torch.randperm(len(y), device=y.device)[: self.fisher_samples]
            x, y = x[keep], y[keep]
        batches = TensorBatches(x, y, torch.full_like(y, t), self.fisher_batch_size, False,
                                lambda batch: self._prepare(batch, False))
        return diagonal_fisher(self.backbone, batches, self.mask_logits, self.fisher_labels,
                               self.fisher_estimator)

    def after_task(self, t: int, datamodule) -> None:
        super().after_task(t, datamodule)
        self.consolidate(self.task_fisher(t, datamodule))
