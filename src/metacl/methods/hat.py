"""Hard Attention to the Task (Serra et al., ICML 2018).

Every gated layer l of the backbone (an MLP's hidden layers, AlexNet's conv channels and fc
units) has one learned embedding row e_t^l per task; the task's gate on that layer is
a_t^l = sigmoid(s * e_t^l), multiplied into the layer's output. Each task has its own head.

Training task t, batch by batch:

- s grows linearly within every epoch from 1/smax (first batch) to smax (last batch):
  s = 1/smax + (smax - 1/smax) * b / B for batch b of B (`anneal_s`); s = smax at test time,
  where the gates are nearly binary.
- loss = CE(head_t(features gated by a_t)) + lamb * R, with the attention regulariser
  R = sum_l sum_i a_t,i (1 - a_<t,i) / sum_l sum_i (1 - a_<t,i): it charges the units that no
  earlier task uses (a_<t = elementwise max of the earlier tasks' gates at s = smax, the
  "cumulative mask"); on the first task, where nothing is claimed, R = mean of the gates.
- embedding-gradient compensation: the embeddings' gradients are multiplied by
  smax/s * (cosh(clamp(s e, +-50)) + 1) / (cosh(e) + 1), so that the annealing of s does not
  shrink them; after each step the embeddings are clamped to +-6.
- weight-update conditioning: a weight connecting unit i (below) to unit j (above) may move only
  by the factor 1 - min(a_<t,i, a_<t,j) (biases: 1 - a_<t,j); only task t's head and embedding
  rows may move at all. The paper multiplies the *gradient* by that factor, which is the same
  thing under plain SGD; here the factor multiplies the *update* the optimizer made
  (p <- p_old + m * (p_new - p_old)), so momentum, weight decay or Adam state can never move a
  weight claimed by an earlier task either. Gradient clipping (`grad_clip_norm`, 10000 in the
  reference, so practically never) sees the raw gradient.

After task t (at s = smax): a_<t+1 = max(a_<t, a_t). `task_metrics` reports the share of units
of each layer whose cumulative gate exceeds 0.5 (`hat/used_layer<l>`), and of all layers.
Embeddings, heads and cumulative masks are parameters/buffers: `state_dict()` restores them.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacl.errors import ConfigError
from metacl.methods.base import SGDMethod
from metacl.methods.common import BufferList
from metacl.models.backbones import gated_backbones


def anneal_s(progress: float, smax: float) -> float:
    """HAT's s at a point of the epoch: 1/smax at progress 0, rising linearly to smax at 1."""
    return 1.0 / smax + (smax - 1.0 / smax) * progress


def attention_regulariser(gates: list[Tensor], cumulative: list[Tensor] | None) -> Tensor:
    """sum a_t (1 - a_<t) / sum (1 - a_<t) over every unit of every layer; with no earlier task
    (cumulative None) the mean of the gates."""
    if cumulative is None:
        return sum(g.sum() for g in gates) / sum(g.numel() for g in gates)
    free = [1 - c for c in cumulative]
    return sum((g * f).sum() for g, f in zip(gates, free)) / sum(f.sum() for f in free)


def embedding_compensation(e: Tensor, s: float, smax: float, cosh_clamp: float = 50.0) -> Tensor:
    """The factor HAT multiplies the embedding gradients by: smax/s (cosh(s e) + 1)/(cosh(e) + 1)
    with s e clamped to +-cosh_clamp (the reference's overflow guard)."""
    num = torch.cosh(torch.clamp(s * e, -cosh_clamp, cosh_clamp)) + 1
    return smax / s * num / (torch.cosh(e) + 1)


class HAT(SGDMethod):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"
    # The gated models (their units carry HAT's task embeddings): refused before data loads.
    network_models: ClassVar[dict[str, str]] = {"MLP": "mlp, mlp_hat", "AlexNet": "alexnet"}

    def __init__(self, backbone, task_info, lr: float = 0.05, momentum: float = 0.0,
                 weight_decay: float = 0.0, smax: float = 400.0, lamb: float = 0.75,
                 grad_clip_norm: float | None = 10000.0, embedding_clamp: float = 6.0,
                 cosh_clamp: float = 50.0, usage_threshold: float = 0.5, **kwargs):
        super().__init__(backbone, task_info, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, grad_clip_norm=grad_clip_norm, **kwargs)
        if not getattr(backbone, "gate_sizes", ()):
            raise ConfigError(f"method=hat needs a gated model, not {type(backbone).__name__}; "
                              f"allowed: model={', '.join(gated_backbones())}")
        if smax < 1:
            raise ConfigError(f"method.smax={smax} is invalid; it must be >= 1")
        self.smax, self.lamb = float(smax), float(lamb)
        self.embedding_clamp, self.cosh_clamp = embedding_clamp, cosh_clamp
        self.usage_threshold = usage_threshold
        n_tasks, n_out, dim = task_info.n_tasks, task_info.n_outputs, backbone.feature_dim
        # One embedding row per task and gated layer, N(0, 1) as the reference's nn.Embedding.
        self.embeddings = nn.ParameterList(
            nn.Parameter(torch.randn(n_tasks, units)) for units in backbone.gate_sizes)
        heads = [nn.Linear(dim, n_out) for _ in range(n_tasks)]  # PyTorch's default init
        self.head_weight = nn.Parameter(torch.stack([h.weight.detach() for h in heads]))
        self.head_bias = nn.Parameter(torch.stack([h.bias.detach() for h in heads]))
        # a_<t: elementwise max of the gates of the tasks learned so far (at s = smax).
        self.cumulative = BufferList(torch.zeros(units) for units in backbone.gate_sizes)
        self.register_buffer("n_masked", torch.zeros((), dtype=torch.long))
        self._n_masked = 0  # host mirror of n_masked
        # The backbone's own head is unused (each task has its own), so it is not optimised.
        self.feature_params = list(backbone.parameters())[:-2]
        self.set_trained_parameters(
            [*self.feature_params, *self.embeddings, self.head_weight, self.head_bias])
        self._progress = 0.0
        self._update_masks: list[tuple[Tensor, Tensor]] = []

    def after_load(self) -> None:
        super().after_load()
        self._n_masked = int(self.n_masked)

    # ------------------------------------------------------------------ gates and heads
    def gates(self, t: int, s: float) -> list[Tensor]:
        return [torch.sigmoid(s * e[t]) for e in self.embeddings]

    def task_logits(self, x: Tensor, t: int, s: float) -> tuple[Tensor, list[Tensor]]:
        """Logits of task t's head (masked to its classes on class splits) and the gates."""
        gates = self.gates(t, s)
        feats = self.backbone.features(x, gates=gates)
        logits = F.linear(feats, self.head_weight[t], self.head_bias[t])
        return self.mask_logits(logits, t), gates

    def regulariser(self, gates: list[Tensor]) -> Tensor:
        return attention_regulariser(gates, list(self.cumulative) if self._n_masked else None)

    def forward(self, x: Tensor, t: int) -> Tensor:
        return self.task_logits(x, int(t), self.smax)[0]

    def validation_loss(self, x, y, t):
        logits, gates = self.task_logits(x, int(t), self.smax)
        return F.cross_entropy(logits, y) + self.lamb * self.regulariser(gates)

    @torch.no_grad()
    def predict(self, x, t, allowed=None, variant=None):
        """Task t's gates (s = smax) and head: HAT always needs the task id, so the
        task-agnostic evaluation only widens the classes the head may choose from."""
        gates = self.gates(t, self.smax)
        logits = F.linear(self.backbone.features(x, gates=gates), self.head_weight[t],
                          self.head_bias[t])
        return self.restrict(logits, t, allowed).argmax(dim=1)

    # ------------------------------------------------------------------ training
    def update_masks(self, t: int) -> list[tuple[Tensor, Tensor]]:
        """(parameter, factor) pairs: how much of an optimizer update each entry may keep."""
        pairs = []
        if self._n_masked:
            conditioned = self.backbone.gate_param_masks(list(self.cumulative))
            pairs += [(p, 1 - m) for p, m in zip(self.feature_params, conditioned)
                      if m is not None]
        own = torch.zeros(self.head_weight.shape[0], device=self.head_weight.device)
        own[t] = 1.0  # only task t's head and embedding rows
        pairs += [(self.head_weight, own.view(-1, 1, 1)), (self.head_bias, own.view(-1, 1))]
        pairs += [(e, own.view(-1, 1)) for e in self.embeddings]
        return pairs

    def before_task(self, t: int, datamodule) -> None:
        super().before_task(t, datamodule)
        self.optimizer.state.clear()  # the reference builds a fresh optimizer per task
        self._update_masks = self.update_masks(t)

    def training_step(self, batch, batch_idx):
        n_batches = getattr(self.trainer, "num_training_batches", 0) if self._trainer else 0
        n_batches = n_batches if n_batches and math.isfinite(n_batches) else 1
        # A run resumed inside an epoch starts its loader (and batch_idx) at a later batch.
        dm = getattr(self._trainer, "datamodule", None) if self._trainer else None
        offset = getattr(getattr(dm, "train_loader", None), "epoch_start_batch", 0)
        self._progress = (offset + batch_idx) / n_batches
        return super().training_step(batch, batch_idx)

    def objective(self, x, y, t):
        """Task t's cross-entropy under its gates at the annealed s, plus the regulariser."""
        logits, gates = self.task_logits(x, self._task, anneal_s(self._progress, self.smax))
        return F.cross_entropy(logits, y) + self.lamb * self.regulariser(gates)

    def step(self, optimizer) -> None:
        """Compensate the embedding gradients, clip, step, mask the update, clamp."""
        s = anneal_s(self._progress, self.smax)
        with torch.no_grad():
            for e in self.embeddings:
                if e.grad is not None:
                    e.grad.mul_(embedding_compensation(e, s, self.smax, self.cosh_clamp))
            self.clip_gradients_()
            before = [p.detach().clone() for p, _ in self._update_masks]
        optimizer.step()
        with torch.no_grad():
            for (p, factor), old in zip(self._update_masks, before):
                p.copy_(torch.lerp(old, p, factor))  # old + factor * (new - old)
            for e in self.embeddings:
                e.clamp_(-self.embedding_clamp, self.embedding_clamp)

    @torch.no_grad()
    def after_task(self, t: int, datamodule) -> None:
        super().after_task(t, datamodule)
        for c, g in zip(self.cumulative, self.gates(t, self.smax)):
            c.copy_(torch.maximum(c, g) if self._n_masked else g)
        self._n_masked += 1
        self.n_masked.fill_(self._n_masked)

    def task_metrics(self) -> dict[str, float]:
        used = [(c > self.usage_threshold) for c in self.cumulative]
        stats = {f"hat/used_layer{l}": float(u.float().mean()) for l, u in enumerate(used)}
        stats["hat/used_all"] = float(sum(u.sum() for u in used)) / sum(u.numel() for u in used)
        return stats
