"""Training schedules that any continual method can run under (`schedule=<name>`).

`PlateauSchedule` is HAT's (Serra et al. 2018, reference approaches/*.py), used there by every
approach: each task starts at `lr`; after every epoch the loss on the validation split of the
task(s) being trained is measured with `method.validation_loss`; when it has not improved for
`lr_patience` epochs the learning rate is divided by `lr_factor` (the optimizer state is
cleared, as the reference builds a fresh optimizer), and the task stops when the rate falls
below `lr_min` (or at `trainer.max_epochs`, 200 with schedule=hat). At the end of the task the
parameters (and the backbone's buffers) of the epoch with the lowest validation loss are
restored.

It is a Lightning callback: the runner adds it to every task's Trainer and knows nothing else about
it. It sets the learning rate of every optimizer the method returns from
`configure_optimizers` (and `base_lr`, which methods with their own per-epoch schedule read).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from metacl.errors import ConfigError
from metacl.runner.evaluator import Evaluator


class PlateauSchedule(pl.Callback):
    def __init__(self, lr: float = 0.05, lr_factor: float = 3.0, lr_patience: int = 5,
                 lr_min: float = 1e-4, restore_best: bool = True, reset_optimizer: bool = True):
        if lr <= 0 or lr_factor <= 1 or lr_patience < 1 or lr_min < 0:
            raise ConfigError(f"schedule lr={lr}, lr_factor={lr_factor}, lr_patience="
                              f"{lr_patience}, lr_min={lr_min} are invalid; need lr > 0, "
                              "lr_factor > 1, lr_patience >= 1, lr_min >= 0")
        self.lr0, self.lr_factor, self.lr_patience, self.lr_min = lr, lr_factor, lr_patience, lr_min
        self.restore_best, self.reset_optimizer = restore_best, reset_optimizer
        self.epochs_per_task: list[int] = []  # epochs each task trained (for logs and tests)

    def check(self, datamodule) -> None:
        """Refuse a dataset without a validation split before anything is trained."""
        if not getattr(datamodule, "has_validation", False):
            raise ConfigError("the plateau schedule (schedule=hat) watches the validation loss; "
                              "set dataset.validation to a fraction, e.g. "
                              "++dataset.validation=0.15")

    # ------------------------------------------------------------------ helpers
    def set_lr(self, trainer, lr: float) -> None:
        for opt in trainer.optimizers:
            if self.reset_optimizer:
                opt.state.clear()
            for group in opt.param_groups:
                group["lr"] = lr
                if "base_lr" in group:
                    group["base_lr"] = lr

    @staticmethod
    def snapshot(module) -> dict[str, torch.Tensor]:
        state = {f"p.{n}": p.detach().clone() for n, p in module.named_parameters()}
        backbone = getattr(module, "backbone", None)
        if backbone is not None:
            state.update({f"b.{n}": b.detach().clone() for n, b in backbone.named_buffers()})
        return state

    @staticmethod
    @torch.no_grad()
    def restore(module, state: dict[str, torch.Tensor]) -> None:
        for n, p in module.named_parameters():
            p.copy_(state[f"p.{n}"])
        backbone = getattr(module, "backbone", None)
        if backbone is not None:
            for n, b in backbone.named_buffers():
                b.copy_(state[f"b.{n}"])

    @staticmethod
    def validation_loss(module, datamodule) -> float:
        """Mean validation loss over the samples of the tasks being trained."""
        return Evaluator(datamodule).mean_loss(module, datamodule.train_tasks)

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer, pl_module):
        self.lr, self.patience, self.best = self.lr0, self.lr_patience, math.inf
        self.best_state = self.snapshot(pl_module)
        self.epochs = 0
        self.set_lr(trainer, self.lr)

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs += 1
        loss = self.validation_loss(pl_module, trainer.datamodule)
        if loss < self.best:
            self.best, self.patience = loss, self.lr_patience
            self.best_state = self.snapshot(pl_module)
            return
        self.patience -= 1
        if self.patience <= 0:
            self.lr /= self.lr_factor
            if self.lr < self.lr_min:
                trainer.should_stop = True
                return
            self.patience = self.lr_patience
            self.set_lr(trainer, self.lr)

    def on_train_end(self, trainer, pl_module):
        self.epochs_per_task.append(self.epochs)
        # A method that keeps its own best state (PathNet: parameters that belong with its
        # evolved paths) restores it in after_task; restoring another epoch's would undo that.
        if self.restore_best and not getattr(pl_module, "keeps_own_best", False):
            self.restore(pl_module, self.best_state)
