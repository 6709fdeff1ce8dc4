"""The contract every continual method follows.

A method is a LightningModule with manual optimization. The continual loop (metacl.runner.continual) calls,
for each task t:  before_task(t, dm) -> Trainer.fit (training_step -> observe) -> after_task(t, dm),
then evaluates with `predict` on every task. Everything the method learns or remembers (weights,
learned learning rates, replay memory, ...) is registered as a parameter, buffer or submodule so
that `state_dict()` after any task restores it exactly.

`SGDMethod` is the base of the methods whose weights follow one torch SGD optimizer: it owns
the optimizer and the update loop (for each incoming batch, `glances` times: batch -> objective
-> backward -> clip -> step), so such a method writes only what its paper changes in that loop.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacl.reload import ReloadHooks
from metacl.task_info import TaskInfo

MASK_VALUE = -1e10  # as La-MAML: large negative logits for classes outside the task


class ContinualMethod(ReloadHooks, pl.LightningModule):
    protocol = "continual"  # runs on ContinualDataModule streams (metacl.runner.main.LOOPS)
    # Lightning precisions (trainer.precision) under which this method's updates are correct;
    # the runner refuses the others. Add "bf16-mixed" only where a bf16 run was checked.
    precisions: tuple[str, ...] = ("32-true",)

    @classmethod
    def precisions_for(cls, method_cfg) -> tuple[tuple[str, ...], str]:
        """The precisions one configuration of the method allows, and why they are fewer than
        `precisions` ("" when they are not): some options are checked in fewer precisions."""
        return cls.precisions, ""

    # Population runs (hydra/launcher=population, metacl.population): the float
    # hyperparameters that may differ between members trained together as one program, and
    # the class that trains them (`population(members)`). A method without a Population class
    # trains one run at a time.
    population_keys: tuple[str, ...] = ()
    population_class = None

    def population_blocker(self) -> str | None:
        """Why this built member cannot train in a population (None: it can)."""
        from metacl.methods.population import has_random_layers

        if self.population_class is None:
            return f"{type(self).__name__} has no population implementation"
        if has_random_layers(self.backbone):
            return "its backbone has dropout or batch-norm running statistics"
        return None

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
        self._task = 0  # host mirror of task_counter: reading the buffer would sync the device
        self.last_loss: Tensor | None = None

    def after_load(self) -> None:
        super().after_load()
        self._task = int(self.task_counter)

    # ----------------------------------------------------------------- task-aware heads
    @property
    def current_task(self) -> int:
        return self._task

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
        self._task = t

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
        return self.restrict(self.backbone(x), t, allowed).argmax(dim=1)

    def restrict(self, logits: Tensor, t: int, allowed: Tensor | None) -> Tensor:
        """Mask logits as `predict` does: task-aware (allowed None) or to the `allowed` classes."""
        if allowed is None:
            return self.mask_logits(logits, t)
        return logits.masked_fill(~allowed, MASK_VALUE)


class SGDMethod(ContinualMethod):
    """A method whose trained tensors follow one torch SGD optimizer, for each incoming batch
    `glances` times::

        (x, y, t) <- glance_batch(x, y, t)        # e.g. joined by replayed samples
        zero the gradients;  loss <- objective(x, y, t);  backward
        step:  clip the gradients to grad_clip_norm (total norm);  optimizer step;  after_step()

    The optimizer holds the backbone's parameters unless the method names others with
    `set_trained_parameters` (e.g. its own heads); it is created once, so its state (momentum)
    survives the fresh Trainer of every task. Subclasses override the hooks, or `step` when
    their update is more than a clipped gradient step (GEM's projection, HAT's masks).
    """

    def __init__(self, backbone: nn.Module, task_info: TaskInfo, lr: float = 0.1,
                 momentum: float = 0.0, weight_decay: float = 0.0,
                 grad_clip_norm: float | None = None, **kwargs):
        super().__init__(backbone, task_info, **kwargs)
        self.lr = lr
        self.momentum, self.weight_decay = momentum, weight_decay
        self.grad_clip_norm = grad_clip_norm
        self.set_trained_parameters(self.backbone.parameters())

    def set_trained_parameters(self, params: Iterable[Tensor] | Iterable[dict]) -> None:
        """A fresh optimizer over `params` (tensors, or torch param-group dicts)."""
        self.optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                                         weight_decay=self.weight_decay)

    def trained_parameters(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def configure_optimizers(self):
        return self.optimizer

    # ----------------------------------------------------------------- the update loop
    def glance_batch(self, x: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The batch one glance trains on (drawn afresh for every glance)."""
        return x, y, t

    def objective(self, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """The loss one glance minimises."""
        return self.loss(self.backbone(x), y, t)

    def clip_gradients_(self) -> None:
        """Manual optimization: clip inside the method (the Trainer's clipping raises)."""
        if self.grad_clip_norm:
            nn.utils.clip_grad_norm_(self.trained_parameters(), self.grad_clip_norm)

    def step(self, optimizer) -> None:
        """Apply the gradients of one glance."""
        self.clip_gradients_()
        optimizer.step()
        self.after_step()

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. to restore frozen weights)."""

    def after_glances(self, x: Tensor, y: Tensor, t: Tensor) -> None:
        """Called once per incoming batch after its glances (e.g. ER offers it to memory)."""

    def observe(self, x, y, t):
        optimizer = self.optimizers()
        for _ in range(self.glances):
            bx, by, bt = self.glance_batch(x, y, t)
            optimizer.zero_grad()
            loss = self.objective(bx, by, bt)
            self.manual_backward(loss)
            self.step(optimizer)
        self.after_glances(x, y, t)
        return loss.detach()
