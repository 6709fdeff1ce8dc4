"""Pieces shared by the distillation / regularisation baselines (iCaRL, LwF, LUCIR, EWC).

- `kd_loss`: knowledge distillation with temperature (soft-target cross-entropy).
- `FrozenCopy`: a snapshot of a module (the previous model), no gradients, run in eval mode,
  registered as a submodule so `state_dict()` restores it.
- `BufferList`: a list of tensors registered as buffers (Fisher, anchors).
- `diagonal_fisher`: the diagonal of the empirical Fisher from per-sample gradients (torch.func).
- `IncrementalMethod`: what these methods add to SGDMethod's loop. A per-task learning-rate
  schedule (the optimizer's state is cleared when a task starts, as LibContinual builds a
  fresh optimizer per task); an optional class-balanced herding exemplar memory whose samples
  join every incoming batch; nearest-mean-of-exemplars (NME) prediction from class means.
  Subclasses implement `objective(x, y, t)` and may hook `after_step`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from metacl.errors import ConfigError
from metacl.memory import ClassBalancedMemory, herding_selection
from metacl.methods.base import MASK_VALUE, SGDMethod
from metacl.reload import ReloadHooks

LR_SCHEDULES = ("constant", "multistep", "cosine")
EXEMPLAR_SELECTIONS = ("herding", "random")


# ------------------------------------------------------------------------------ distillation
def kd_loss(student: Tensor, teacher: Tensor, T: float = 2.0, mask: Tensor | None = None) -> Tensor:
    """Distillation loss: -sum_c softmax(teacher/T)_c * log_softmax(student/T)_c, batch mean.

    mask: (C,) or (B, C) bool, the classes the two distributions are taken over (the old
    classes); None uses every output. Equals KL(teacher || student) up to a constant in the
    student. No T^2 factor (as LwF and LibContinual; Hinton et al. add one).
    """
    teacher = teacher.detach()
    if mask is not None:
        student = student.masked_fill(~mask, MASK_VALUE)
        teacher = teacher.masked_fill(~mask, MASK_VALUE)
    log_p = F.log_softmax(student / T, dim=1)
    q = F.softmax(teacher / T, dim=1)
    return -(q * log_p).sum(dim=1).mean()


class FrozenCopy(ReloadHooks):
    """A frozen snapshot of `module` (e.g. the model as it was after the previous task).

    The copy is made once at construction, so its tensors are in `state_dict()` from the start;
    `update(module)` overwrites it with the current weights. It never requires grad, and its
    forward always runs in eval mode (batch norm uses the stored statistics and never updates
    them) whatever mode the owner is in.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(module)
        self.module.requires_grad_(False)
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))
        self._ready = False  # host mirror of `ready`

    def after_load(self) -> None:
        self._ready = bool(self.ready)

    @property
    def is_ready(self) -> bool:
        return self._ready

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.module.load_state_dict(module.state_dict())
        self.ready.fill_(True)
        self._ready = True

    def _run(self, fn, *args, **kwargs):
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                return fn(*args, **kwargs)
        finally:
            self.module.train(was_training)

    def forward(self, *args, **kwargs):
        return self._run(self.module, *args, **kwargs)

    def features(self, x: Tensor) -> Tensor:
        return self._run(self.module.features, x)


class BufferList(nn.Module):
    """Tensors registered as buffers "0", "1", ... (saved and moved with the owner)."""

    def __init__(self, tensors: Iterable[Tensor]):
        super().__init__()
        for i, tensor in enumerate(tensors):
            self.register_buffer(str(i), tensor)

    def __len__(self) -> int:
        return len(self._buffers)

    def __getitem__(self, i: int) -> Tensor:
        return self._buffers[str(i)]

    def __iter__(self):
        return (self._buffers[str(i)] for i in range(len(self)))


# ------------------------------------------------------------------------------ Fisher
FISHER_LABELS = ("dataset", "model")
FISHER_ESTIMATORS = ("per_sample", "batch")


def check_fisher_options(labels: str, estimator: str) -> None:
    """Refuse unknown `fisher_labels` / `fisher_estimator` values with one line."""
    for key, value, allowed in (("fisher_labels", labels, FISHER_LABELS),
                                ("fisher_estimator", estimator, FISHER_ESTIMATORS)):
        if value not in allowed:
            raise ConfigError(f"{key} '{value}' unknown; allowed: {', '.join(allowed)}")


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    mask_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    labels: str = "dataset",
    estimator: str = "per_sample",
) -> list[Tensor]:
    """Diagonal Fisher: mean over samples of the squared gradient of -log p(y|x).

    model: a functional backbone (`model(x, params=...)`), evaluated in eval mode (batch norm on
    its running statistics). batches: (x, y, t) with x ready for the model. mask_fn(logits, t)
    restricts each sample's logits (task-aware heads). labels: "dataset" (the empirical Fisher)
    or "model" (labels drawn from the model's own predictive distribution, the Fisher's
    definition). estimator: "per_sample" squares each sample's own gradient
    (torch.func.vmap over a batch); "batch" squares the gradient of each batch's mean loss and
    weights it by the batch size, as FACIL / PyCIL / LibContinual do: about 1/batch-size times
    smaller away from a minimum of the loss, so it needs a larger lambda for the same effect.
    """
    check_fisher_options(labels, estimator)
    params = [p.detach() for p in model.parameters()]
    fisher = [torch.zeros_like(p) for p in params]

    def nll(ps, x, y, t):
        logits = model(x, params=ps)
        if mask_fn is not None:
            logits = mask_fn(logits, t)
        return F.cross_entropy(logits, y)

    def one_sample_nll(ps, x, y, t):
        return nll(ps, x.unsqueeze(0), y.unsqueeze(0), t.unsqueeze(0))

    per_sample_grads = vmap(grad(one_sample_nll), in_dims=(None, 0, 0, 0))
    was_training = model.training
    model.eval()
    n = 0
    try:
        for x, y, t in batches:
            if labels == "model":
                with torch.no_grad():
                    logits = model(x)
                    if mask_fn is not None:
                        logits = mask_fn(logits, t)
                    y = torch.distributions.Categorical(logits=logits).sample()
            if estimator == "per_sample":
                for f, g in zip(fisher, per_sample_grads(params, x, y, t)):
                    f += g.pow(2).sum(0)
            else:
                for f, g in zip(fisher, grad(nll)(params, x, y, t)):
                    f += g.pow(2) * x.shape[0]
            n += x.shape[0]
    finally:
        model.train(was_training)
    return [f / max(n, 1) for f in fisher]


# ------------------------------------------------------------------------------ schedule
def scheduled_lr(base: float, epoch: int, schedule: str, milestones: Sequence[int] = (),
                 gamma: float = 0.1, t_max: int | None = None) -> float:
    """Learning rate for 0-based `epoch` of a task, as the torch scheduler stepped per epoch.

    multistep: base * gamma^(number of milestones <= epoch) (MultiStepLR; StepLR(s) is
    milestones s, 2s, ...). cosine: base * (1 + cos(pi * epoch / t_max)) / 2 (CosineAnnealingLR
    with eta_min 0; past t_max it rises again, as torch's does).
    """
    if schedule == "constant":
        return base
    if schedule == "multistep":
        return base * gamma ** sum(epoch >= m for m in milestones)
    if schedule == "cosine":
        return base * (1 + math.cos(math.pi * epoch / t_max)) / 2
    raise ConfigError(f"lr_schedule '{schedule}' unknown; allowed: {', '.join(LR_SCHEDULES)}")


def _default_prepare(x: Tensor, train: bool) -> Tensor:
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()


# ------------------------------------------------------------------------------ base method
class IncrementalMethod(SGDMethod):
    def __init__(
        self,
        backbone,
        task_info,
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        lr_milestones: Sequence[int] = (),
        lr_gamma: float = 0.1,
        lr_t_max: int | None = None,
        reset_optimizer: bool = True,
        grad_clip_norm: float | None = None,
        memory_size: int = 0,
        replay_batch_size: int | None = None,
        exemplar_selection: str = "herding",
        **kwargs,
    ):
        super().__init__(backbone, task_info, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, grad_clip_norm=grad_clip_norm, **kwargs)
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"lr_schedule '{lr_schedule}' unknown; allowed: {', '.join(LR_SCHEDULES)}"
            )
        if lr_schedule == "cosine" and not lr_t_max:
            raise ConfigError("lr_schedule=cosine needs lr_t_max (epochs of one half period)")
        if exemplar_selection not in EXEMPLAR_SELECTIONS:
            raise ConfigError(f"exemplar_selection '{exemplar_selection}' unknown; allowed: "
                              f"{', '.join(EXEMPLAR_SELECTIONS)}")
        self.lr_schedule, self.lr_milestones = lr_schedule, tuple(lr_milestones or ())
        self.lr_gamma, self.lr_t_max = lr_gamma, lr_t_max
        self.reset_optimizer = reset_optimizer
        self.replay_batch_size = replay_batch_size
        self.exemplar_selection = exemplar_selection

        n_out = task_info.n_outputs
        self.memory = (ClassBalancedMemory(memory_size, task_info.input_shape)
                       if memory_size > 0 else None)
        # Class means of the exemplars (normalised features) for NME prediction.
        self.register_buffer("class_means", torch.zeros(n_out, backbone.feature_dim))
        self.register_buffer("class_means_valid", torch.zeros(n_out, dtype=torch.bool))
        # Class groups of the current task (set by before_task; derived, not checkpointed).
        self.register_buffer("current_classes", task_info.class_mask()[0], persistent=False)
        self.register_buffer("previous_classes", torch.zeros(n_out, dtype=torch.bool),
                             persistent=False)
        self.register_buffer("seen_classes", task_info.class_mask()[0], persistent=False)
        self._replay_n = 0
        self._prepare: Callable[[Tensor, bool], Tensor] = _default_prepare

    # -------------------------------------------------------------------------- task hooks
    def set_task_classes(self, t: int) -> None:
        mask = self.class_mask
        self.current_classes.copy_(mask[t])
        self.previous_classes.copy_(mask[:t].any(0) if t else torch.zeros_like(mask[0]))
        self.seen_classes.copy_(mask[: t + 1].any(0))

    def before_task(self, t: int, datamodule) -> None:
        super().before_task(t, datamodule)
        self.set_task_classes(t)
        self._prepare = datamodule.prepare_batch
        if self.reset_optimizer:
            self.optimizer.state.clear()
        self.set_epoch_lr(0)
        n_new = len(datamodule.tasks[t].y_train)
        if self.memory is None or len(self.memory) == 0:
            self._replay_n = 0
        elif self.replay_batch_size is None:
            # As if the exemplars were appended to the task's data: each batch carries them in
            # proportion, so one epoch replays the memory about once.
            self._replay_n = math.ceil(self.batch_size * len(self.memory) / max(n_new, 1))
        else:
            self._replay_n = int(self.replay_batch_size)

    def after_task(self, t: int, datamodule) -> None:
        super().after_task(t, datamodule)
        if self.memory is not None:
            self.update_exemplars(t, datamodule)
            self.compute_class_means()

    def set_epoch_lr(self, epoch: int) -> None:
        for group in self.optimizer.param_groups:
            base = group.setdefault("base_lr", group["lr"])
            group["lr"] = scheduled_lr(base, epoch, self.lr_schedule, self.lr_milestones,
                                       self.lr_gamma, self.lr_t_max)

    def on_train_epoch_start(self) -> None:
        self.set_epoch_lr(self.trainer.current_epoch)

    # -------------------------------------------------------------------------- training
    def glance_batch(self, x: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The incoming batch joined by `_replay_n` exemplars (prepared with augmentation);
        a fresh exemplar draw for every glance."""
        if self._replay_n == 0:
            return x, y, t
        mx, my, mt = self.memory.sample(self._replay_n)
        return (torch.cat([x, self._prepare(mx, True)]), torch.cat([y, my]), torch.cat([t, mt]))

    # -------------------------------------------------------------------------- exemplars
    @torch.no_grad()
    def embed(self, x_raw: Tensor, chunk: int = 500) -> Tensor:
        """L2-normalised backbone features of stored samples (eval mode, no augmentation)."""
        if x_raw.shape[0] == 0:
            return torch.zeros(0, self.backbone.feature_dim, device=self.class_means.device)
        was_training = self.backbone.training
        self.backbone.eval()
        feats = [F.normalize(self.backbone.features(self._prepare(x_raw[i : i + chunk], False)),
                             dim=1) for i in range(0, x_raw.shape[0], chunk)]
        self.backbone.train(was_training)
        return torch.cat(feats)

    @torch.no_grad()
    def update_exemplars(self, t: int, datamodule) -> None:
        """Shrink old exemplar sets to the new quota, then pick task t's by herding."""
        n_groups = sum(len(classes) for classes in self.task_info.task_classes[: t + 1])
        quota = self.memory.quota(n_groups)
        self.memory.reduce(quota)
        task = datamodule.tasks[t]
        x, y = task.x_train, task.y_train.to(self.class_means.device)
        feats = self.embed(x) if self.exemplar_selection == "herding" else None
        for c in self.task_info.task_classes[t]:
            idx = torch.nonzero(y == c).flatten()
            if self.exemplar_selection == "herding":
                order = herding_selection(feats[idx], quota, normalize=False)
            else:
                order = torch.randperm(len(idx), device=idx.device)[:quota]
            self.memory.add(x[idx[order].to(x.device)], c, t)

    @torch.no_grad()
    def compute_class_means(self) -> None:
        """Mean of the normalised exemplar features of each class, normalised (iCaRL)."""
        x, y, _ = self.memory.all()
        feats = self.embed(x)
        n_out = self.class_means.shape[0]
        sums = torch.zeros_like(self.class_means).index_add_(0, y, feats)
        counts = torch.bincount(y, minlength=n_out)
        self.class_means.copy_(F.normalize(sums, dim=1))
        self.class_means_valid.copy_(counts > 0)

    # -------------------------------------------------------------------------- prediction
    def head_logits(self, feats: Tensor) -> Tensor:
        """The method's classifier on backbone features (the backbone's linear head here)."""
        return self.backbone.head(feats)

    @torch.no_grad()
    def nme_predict(self, x: Tensor, t: int, allowed: Tensor | None = None) -> Tensor:
        """Nearest mean of exemplars among the candidate classes that have exemplars.

        Falls back to the linear head when no candidate class has exemplars yet (before the
        first task ends, or task-aware on a task not trained yet).
        """
        feats = self.backbone.features(x)
        head = self.restrict(self.head_logits(feats), t, allowed).argmax(dim=1)
        if allowed is None:
            allowed = self.class_mask[t] if self.task_info.multi_head else self.class_means_valid
        candidates = allowed & self.class_means_valid
        dist = torch.cdist(F.normalize(feats, dim=1), self.class_means)
        nme = dist.masked_fill(~candidates, float("inf")).argmin(dim=1)
        return torch.where(candidates.any(), nme, head)
