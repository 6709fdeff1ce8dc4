"""Incremental Moment Matching (Lee et al., NeurIPS 2017), as HAT's reference runs it.

Every task is trained with "L2-transfer": the cross-entropy plus l2_transfer/2 * ||theta -
theta_prev||^2, where theta_prev is the merged model after the previous task (the network also
starts from it: weight transfer). After task t > 0 the network is merged with theta_prev:

- mean-IMM (merge=mean): theta <- (theta_t + t * theta_prev) / (t + 1), the running average of
  the task models with equal weights.
- mode-IMM (merge=mode): theta <- (F_t theta_t + F_<t theta_prev) / (F_t + F_<t), a
  Fisher-weighted average, with F_<t the sum of the earlier tasks' diagonal Fishers (entries
  where both are zero keep theta_t). F_t is estimated on task t's training data after training
  (squared minibatch gradients of batches of `fisher_batch_size`, as the reference).

Every parameter is merged, output layer included (the reference does the same). The previous
model and the accumulated Fisher are submodules/buffers, so `state_dict()` restores them.
(The reference's mode merge rebinds a local name instead of writing the merged weights, so its
published mode-IMM is in effect L2-transfer alone; here the merge is applied.)
"""

from __future__ import annotations

import torch

from metacl.data.datamodule import TensorBatches
from metacl.errors import ConfigError
from metacl.methods.common import (
    BufferList,
    FrozenCopy,
    IncrementalMethod,
    check_fisher_options,
    diagonal_fisher,
)

MERGES = ("mean", "mode")


class IMM(IncrementalMethod):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"

    def __init__(self, backbone, task_info, merge: str = "mean", l2_transfer: float = 1e-4,
                 fisher_batch_size: int = 20, fisher_estimator: str = "batch", **kwargs):
        super().__init__(backbone, task_info, **kwargs)
        if merge not in MERGES:
            raise ConfigError(f"method.merge={merge!r} is unknown; allowed: {', '.join(MERGES)}")
        check_fisher_options("dataset", fisher_estimator)
        self.merge, self.l2_transfer = merge, l2_transfer
        self.fisher_batch_size, self.fisher_estimator = fisher_batch_size, fisher_estimator
        self.previous = FrozenCopy(self.backbone)
        self.fisher = BufferList(torch.zeros_like(p) for p in self.backbone.parameters())

    def penalty(self):
        """||theta - theta_prev||^2 / 2 over every parameter."""
        return sum((p - q).pow(2).sum() for p, q in
                   zip(self.backbone.parameters(), self.previous.module.parameters())) / 2

    def objective(self, x, y, t):
        loss = self.loss(self.backbone(x), y, t)
        if self.previous.is_ready:
            loss = loss + self.l2_transfer * self.penalty()
        return loss

    def task_fisher(self, t: int, datamodule) -> list[torch.Tensor]:
        task = datamodule.tasks[t]
        batches = TensorBatches(task.x_train, task.y_train, torch.full_like(task.y_train, t),
                                self.fisher_batch_size, False,
                                lambda batch: self._prepare(batch, False))
        return diagonal_fisher(self.backbone, batches, self.mask_logits, "dataset",
                               self.fisher_estimator)

    @torch.no_grad()
    def merge_into(self, t: int, new_fisher: list[torch.Tensor] | None) -> None:
        """Merge the just-trained weights with the previous merged model (module docstring)."""
        for i, (p, q) in enumerate(zip(self.backbone.parameters(),
                                       self.previous.module.parameters())):
            if self.merge == "mean":
                p.copy_((p + t * q) / (t + 1))
            else:
                f_old, f_new = self.fisher[i], new_fisher[i]
                total = f_old + f_new
                merged = (f_new * p + f_old * q) / torch.where(total > 0, total, 1.0)
                p.copy_(torch.where(total > 0, merged, p))

    def after_task(self, t: int, datamodule) -> None:
        super().after_task(t, datamodule)
        new_fisher = self.task_fisher(t, datamodule) if self.merge == "mode" else None
        if t > 0:
            self.merge_into(t, new_fisher)
        if new_fisher is not None:
            for f, fn in zip(self.fisher, new_fisher):
                f.add_(fn)
        self.previous.update(self.backbone)
