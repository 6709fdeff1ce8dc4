"""The contract every continual method follows.

A method is a LightningModule with manual optimization. The continual loop (metacl.run) calls,
for each task t:  before_task(t, dm) -> Trainer.fit (training_step -> observe) -> after_task(t, dm),
then evaluates with `predict` on every task. Everything the method learns or remembers (weights,
learned learning rates, replay memory, ...) is registered as a parameter, buffer or submodule so
that `state_dict()` after any task restores it exactly.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacl.task_info import TaskInfo

MASK_VALUE = -1e10  # as La-MAML: large negative logits for classes outside the task


class ContinualMethod(pl.LightningModule):
    protocol = "continual"  # runs on ContinualDataModule streams (metacl.run.PROTOCOLS)

    def __init__(
        self,
        backbone: nn.Module,
        task_info: TaskInfo,
        batch_size: int = 10,
        n_epochs: int = 1,
        glances: int = 1,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.backbone = backbone
        self.task_info = task_info
        self.batch_size = batch_size  # incoming (stream) batch size; the datamodule reads it
        self.n_epochs = n_epochs  # passes over each task's data (1 = single pass)
        self.glances = glances  # repeated updates on each incoming batch (La-MAML's "glances")
        self.register_buffer("class_mask", task_info.class_mask(), persistent=False)
        # The task being trained, checkpointed so a restored method knows where it stopped.
        self.register_buffer("task_counter", torch.zeros((), dtype=torch.long))
        self.last_loss: Tensor | None = None

    # ----------------------------------------------------------------- task-aware heads
    @property
    def current_task(self) -> int:
        return int(self.task_counter)

    def mask_logits(self, logits: Tensor, t: Tensor | int) -> Tensor:
        """Mask logits outside each sample's task classes (class splits only).

        `t` is a task index, or a (B,) tensor of per-sample task indices (replay batches mix tasks).
        """
        if not self.task_info.multi_head:
            return logits
        mask = self.class_mask[t]
        if mask.dim() == 1:
            mask = mask.expand_as(logits)
        return logits.masked_fill(~mask, MASK_VALUE)

    def loss(self, logits: Tensor, y: Tensor, t: Tensor | int) -> Tensor:
        return F.cross_entropy(self.mask_logits(logits, t), y)

    def forward(self, x: Tensor, t: Tensor | int) -> Tensor:
        return self.mask_logits(self.backbone(x), t)

    # ----------------------------------------------------------------- lifecycle hooks
    def training_tasks(self, t: int, n_tasks: int) -> list[int]:
        """Tasks whose training data is streamed while the loop is at task t (joint overrides)."""
        return [t]

    def before_task(self, t: int, datamodule) -> None:
        self.task_counter.fill_(t)

    def after_task(self, t: int, datamodule) -> None:
        pass

    def task_metrics(self) -> dict[str, float]:
        """Statistics of the method's own state after a task (e.g. HAT's share of units used per
        layer), logged with the task's row and kept in results.json under `method_metrics`."""
        return {}

    def validation_loss(self, x: Tensor, y: Tensor, t: int) -> Tensor:
        """Mean loss on a validation batch of task t: what a plateau schedule
        (`schedule=hat`, metacl.schedule) watches. x is prepared (no augmentation)."""
        return self.loss(self(x, t), y, t)

    def observe(self, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """The method's whole update on one incoming batch; returns the (detached) loss.

        x: float (B, C, H, W) on the device; y: (B,) labels; t: (B,) task index of each sample.
        """
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        x, y, t = batch
        self.last_loss = self.observe(x, y, t)

    # ----------------------------------------------------------------- evaluation
    # Extra ways this method can predict, each evaluated into its own matrix
    # (accuracy_matrix_<variant>.csv), e.g. iCaRL's plain softmax head beside its
    # nearest-mean-of-exemplars classifier. The main matrix uses variant=None.
    eval_variants: tuple[str, ...] = ()

    @torch.no_grad()
    def predict(self, x: Tensor, t: int, allowed: Tensor | None = None,
                variant: str | None = None) -> Tensor:
        """Predicted labels for a batch of task t.

        allowed: None for task-aware prediction (only task t's classes, on class splits), or a
        (n_outputs,) bool mask of the classes a task-agnostic prediction may choose from.
        """
        logits = self.backbone(x)
        if allowed is None:
            logits = self.mask_logits(logits, t)
        else:
            logits = logits.masked_fill(~allowed, MASK_VALUE)
        return logits.argmax(dim=1)

    # ----------------------------------------------------------------- helpers
    def clip_and_step(self, optimizer, max_norm: float | None) -> None:
        """Manual optimization: clip inside the method (the Trainer's clipping raises)."""
        if max_norm:
            nn.utils.clip_grad_norm_(self.backbone.parameters(), max_norm)
        optimizer.step()
