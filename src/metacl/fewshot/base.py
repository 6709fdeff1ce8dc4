"""The contract every few-shot meta-learner follows.

A meta-learner is a LightningModule with manual optimization. The episodic loop
(``metacl.runner.episodic``) fits it on meta-batches of training episodes, then calls
``adapt_and_evaluate`` on the fixed test episodes. Unlike a continual method there is no task
stream: every training step sees a fresh meta-batch of tasks.

Subclasses describe one task functionally, as pure functions of tensors, so that the same code
runs task by task in a Python loop or vmapped over the tasks of a meta-batch (``torch.func``):

* ``functional_state()``: the tuple of tensor lists the task functions read (the backbone's
  parameters, plus e.g. learned learning rates); the outer optimizer learns these.
* ``task_loss(state, sx, sy, qx, qy)``: the meta-training loss of one task (a scalar).
* ``task_eval(state, sx, sy, qx, qy)``: query (losses, accuracies) of one evaluation task,
  each of shape (S + 1,): before adaptation (step 0) and after each of S inner steps.

``vectorize``: ``vmap`` runs the tasks of a meta-batch as one batched computation, ``loop`` runs
them one by one (backpropagating task by task during training), ``auto`` picks vmap on a GPU
and, on the CPU, the loop for convolutional networks (compute bound, where vmap's grouped
convolutions are slower) and vmap for MLPs (overhead bound, 7x faster vmapped for sinusoids).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from metacl.data.episodic import EpisodeInfo, Episodes
from metacl.errors import ConfigError
from metacl.models.conv4 import vmap_safe_batch_norm

VECTORIZE = ("auto", "vmap", "loop")


def _dataset_choice() -> str | None:
    """The dataset chosen on the command line, when Hydra's runtime is up (for messages)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("dataset")
    except (ValueError, ImportError):
        return None


class MetaLearner(pl.LightningModule):
    # Which datamodule protocol this method runs on (metacl.runner.main.LOOPS); continual
    # methods have none and run on the "continual" protocol.
    protocol = "episodic"
    # Lightning precisions (trainer.precision) under which this learner's meta-updates are
    # correct; the runner refuses the others. Add "bf16-mixed" only where a bf16 run was checked.
    precisions: tuple[str, ...] = ("32-true",)
    # Population runs (hydra/launcher=population; metacl.fewshot.population): the float
    # hyperparameters members may differ in (none: a few-shot population is a seed sweep) and
    # the class that trains them together; None: one run at a time.
    population_keys: tuple[str, ...] = ()
    population_class = None

    def population_blocker(self) -> str | None:
        """Why this built learner cannot train in a population (None: it can)."""
        from metacl.fewshot.population import blocker

        return blocker(self)

    def __init__(
        self,
        backbone: nn.Module,
        episode_info: EpisodeInfo | None = None,
        n_epochs: int = 1,
        meta_batch_size: int = 4,
        meta_lr: float = 1e-3,
        meta_grad_clip: float | None = None,
        lr_step: int | None = None,
        lr_gamma: float = 0.5,
        eval_batch_size: int | None = None,
        vectorize: str = "auto",
        task_info=None,
        batch_size: int | None = None,
    ):
        # task_info and batch_size are what the continual loop passes or a continual dataset
        # config reads (method.batch_size): their only use here is to refuse that combination.
        if task_info is not None or episode_info is None:
            where = _dataset_choice()
            if where:
                where = f"dataset={where}"
            elif task_info is not None:
                where = (f"a continual dataset ({task_info.n_tasks} tasks, scenario "
                         f"'{task_info.scenario}')")
            else:
                where = "a dataset without episodes (no episode_info)"
            raise ConfigError(
                f"method {type(self).__name__} is a few-shot meta-learner and cannot run on "
                f"{where}: it needs an episodic dataset (digits_fewshot, omniglot, "
                "miniimagenet or sinusoid)"
            )
        if vectorize not in VECTORIZE:
            raise ConfigError(f"method.vectorize={vectorize} is invalid; allowed: "
                              f"{', '.join(VECTORIZE)}")
        super().__init__()
        self.automatic_optimization = False
        self.backbone = backbone
        self.info = episode_info
        self.n_epochs = int(n_epochs)  # epochs of dataset.meta_batches_per_epoch meta-batches
        self.meta_batch_size = int(meta_batch_size)  # tasks per meta-update; the loop tells dm
        self.meta_lr = float(meta_lr)
        self.meta_grad_clip = meta_grad_clip  # clip each meta-gradient entry to +-this value
        self.lr_step, self.lr_gamma = lr_step, float(lr_gamma)
        self.eval_batch_size = int(eval_batch_size or meta_batch_size)
        self.vectorize = vectorize
        self.last_loss: Tensor | None = None
        self._optimizers = None  # configure_optimizers' result, built on its first call

    # ----------------------------------------------------------------- what subclasses provide
    def functional_state(self) -> tuple[list[Tensor], ...]:
        return (list(self.backbone.parameters()),)

    def task_loss(self, state, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        raise NotImplementedError

    def task_eval(self, state, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
                  ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # ----------------------------------------------------------------- shared helpers
    @property
    def classification(self) -> bool:
        return self.info.classification

    def loss_fn(self, out: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy (classification) or mean squared error (regression)."""
        if self.classification:
            return F.cross_entropy(out, y)
        return F.mse_loss(out, y)

    def accuracy(self, out: Tensor, y: Tensor) -> Tensor:
        if self.classification:
            return (out.argmax(dim=-1) == y).float().mean()
        return torch.zeros((), device=out.device)  # regression: reported as MSE only

    @property
    def use_vmap(self) -> bool:
        """vmap on a GPU; on the CPU only for networks without convolutions (tiny MLPs are
        overhead bound and gain from batching; convolutions are compute bound, and vmap turns
        per-task weights into grouped convolutions, which are slower there)."""
        if self.vectorize == "auto":
            if self.device.type == "cuda":
                return True
            return not any(p.dim() > 2 for p in self.backbone.parameters())
        return self.vectorize == "vmap"

    def map_tasks(self, fn, state, episodes: Episodes):
        """fn(state, sx, sy, qx, qy) for every task, stacked along a leading task dimension."""
        data = (episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)
        if self.use_vmap:
            with vmap_safe_batch_norm():
                return vmap(fn, in_dims=(None, 0, 0, 0, 0))(state, *data)
        outs = [fn(state, *(d[i] for d in data)) for i in range(episodes.n_tasks)]
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(o) for o in zip(*outs))
        return torch.stack(outs)

    # ----------------------------------------------------------------- training
    def configure_optimizers(self):
        """Adam on every parameter (and a StepLR, stepped by hand once per meta-batch), built
        once and handed out again on every call: a resumed run loads their states before
        Lightning asks for them (metacl.checkpoint.capture / restore)."""
        if self._optimizers is None:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.meta_lr)
            self._optimizers = optimizer
            if self.lr_step:
                scheduler = torch.optim.lr_scheduler.StepLR(optimizer, int(self.lr_step),
                                                            self.lr_gamma)
                self._optimizers = ([optimizer], [scheduler])
        return self._optimizers

    def backprop(self, loss: Tensor) -> None:
        """Lightning's manual_backward inside a Trainer; plain backward outside one (tests,
        benchmarks, notebooks)."""
        if self._trainer is None:
            loss.backward()
        else:
            self.manual_backward(loss)

    def meta_step(self, episodes: Episodes) -> Tensor:
        """Backpropagate the meta-loss of a meta-batch (mean over its tasks); return it detached.

        With the loop, each task is backpropagated as soon as its loss is known, so only one
        task's graph is alive at a time; with vmap, the whole meta-batch at once.
        """
        state = self.functional_state()
        if self.use_vmap:
            loss = self.map_tasks(self.task_loss, state, episodes).mean()
            self.backprop(loss)
            return loss.detach()
        losses = []
        n = episodes.n_tasks
        for i in range(n):
            loss = self.task_loss(state, episodes.support_x[i], episodes.support_y[i],
                                  episodes.query_x[i], episodes.query_y[i])
            self.backprop(loss / n)
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    def training_step(self, batch: Episodes, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        loss = self.meta_step(batch)
        if self.meta_grad_clip:
            nn.utils.clip_grad_value_(self.parameters(), float(self.meta_grad_clip))
        optimizer.step()
        if self.lr_step:
            self.lr_schedulers().step()
        self.last_loss = loss

    # ----------------------------------------------------------------- evaluation
    def adapt_and_evaluate(self, episodes: Episodes) -> dict[str, Tensor | None]:
        """Adapt to each episode's support set; query loss and accuracy after every step.

        Returns ``{"loss": (B, S + 1), "acc": (B, S + 1) or None}``: column 0 is before any
        adaptation, column s after s inner steps. Gradients must be enabled (the inner loop
        differentiates); nothing is backpropagated into the meta-parameters.
        """
        state = tuple([t.detach() for t in group] for group in self.functional_state())
        with torch.enable_grad():
            losses, accs = self.map_tasks(self.task_eval, state, episodes)
        return {"loss": losses.detach(), "acc": accs.detach() if self.classification else None}
