"""PathNet (Fernando et al. 2017) as HAT compares with it (Serra et al. 2018, whose reference
code runs it on its AlexNet; the MLP form here is ours, built the same way).

Every hidden layer l of the model becomes `n_modules` (M) small modules, each a copy of the
layer shrunk by `module_scale`. A path picks `modules_per_path` (N) distinct modules per layer;
a layer's output along a path is the sum of its N modules' outputs (each: conv/linear, ReLU,
dropout, and pooling after a conv). Each task has its own head on the last layer.

Training task t evolves a population of `population` (P) paths by binary tournaments:

1. the paths take turns; path p trains alone (SGD on its modules and task t's head) for
   `turn_batches` batches, then is scored: its loss on task t's validation split (the
   reference), or, without a validation split, its mean training loss over the turn (the
   PathNet paper's fitness);
2. the lowest loss seen in the task makes p the winner, and every parameter is snapshotted;
3. after all P turns (a generation) the snapshot is restored, so the losers' training is undone,
   and each loser's path is overwritten by a copy of the winner's in which every entry mutates
   with probability `mutation_prob` (1/(N·L)) by an integer offset in ±`mutation_range` modulo M
   (redrawn among the offsets that keep the layer's modules distinct).

At the end of the task the snapshot is restored once more and the winner's path becomes task
t's path; its modules are frozen: later tasks may route through them but never update them
(they enter detached). Before each later task, every module in no earlier task's path is
re-initialised, as the paper and the reference do.

Everything that evolves (population, turn position, winner, best loss, snapshot, task paths,
frozen modules) is a buffer, and every random draw uses torch's global generator, so a
checkpoint taken after any batch resumes bit for bit.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacl.errors import ConfigError
from metacl.methods.base import SGDMethod
from metacl.models.alexnet import AlexNet
from metacl.models.backbones import MLP


class ModuleLayer(nn.Module):
    """The M modules of one layer, stored stacked so that a path is one indexing."""

    def __init__(self, n_modules: int, fan_in: int, width: int, kernel: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.conv = kernel is not None
        k = (kernel, kernel) if self.conv else ()
        self.fan_in, self.width, self.dropout = fan_in, width, dropout
        self.weight = nn.Parameter(torch.empty(n_modules, width, fan_in, *k))
        self.bias = nn.Parameter(torch.empty(n_modules, width))
        self.reinit(torch.ones(n_modules, dtype=torch.bool))

    def n_params(self) -> int:
        return self.weight.numel() + self.bias.numel()

    @torch.no_grad()
    def reinit(self, which: Tensor) -> None:
        """PyTorch's default nn.Linear / nn.Conv2d initialisation of the modules in `which`."""
        bound = 1 / math.sqrt(self.weight[0, 0].numel())
        which = which.to(self.weight.device)
        n, device = int(which.sum()), self.weight.device
        self.weight[which] = torch.empty(n, *self.weight.shape[1:], device=device).uniform_(
            -bound, bound)
        self.bias[which] = torch.empty(n, self.width, device=device).uniform_(-bound, bound)

    def forward(self, x: Tensor, modules: Tensor, frozen: Tensor) -> Tensor:
        """Sum of the outputs of `modules` (N indices); the `frozen` ones enter detached."""
        w, b = self.weight[modules], self.bias[modules]
        keep = frozen.view(-1, *([1] * (w.dim() - 1)))
        w = torch.where(keep, w.detach(), w)
        b = torch.where(frozen.view(-1, 1), b.detach(), b)
        n = len(modules)
        if self.conv:  # the N modules' filters as one convolution
            out = F.conv2d(x, w.reshape(n * self.width, *w.shape[2:]), b.reshape(-1))
            out = F.max_pool2d(F.dropout(F.relu(out), self.dropout, self.training), 2)
        else:
            out = F.linear(x, w.reshape(n * self.width, self.fan_in), b.reshape(-1))
            out = F.dropout(F.relu(out), self.dropout, self.training)
        return out.view(out.shape[0], n, self.width, *out.shape[2:]).sum(dim=1)


def layer_plan(backbone, scale: float) -> tuple[list[tuple], int]:
    """(fan_in, width, kernel or None, dropout) per layer with widths scaled, and the
    number of the conv layers, for an MLP or the AlexNet-like model."""
    def shrink(w: int) -> int:
        return max(1, int(scale * w))

    plan: list[tuple] = []
    if isinstance(backbone, AlexNet):
        c_in, size, _ = backbone.input_shape
        for c, k, p in zip(backbone.channels, backbone.kernels, backbone.conv_dropout):
            plan.append((c_in, shrink(c), k, p))
            c_in, size = shrink(c), (size - k + 1) // 2
        fan_in = c_in * size * size
        for _ in range(2):
            plan.append((fan_in, shrink(backbone.hidden), None, backbone.fc_dropout))
            fan_in = shrink(backbone.hidden)
        return plan, len(backbone.channels)
    fan_in = math.prod(backbone.input_shape)
    for h in backbone.hidden:
        plan.append((fan_in, shrink(h), None, backbone.dropout))
        fan_in = shrink(h)
    return plan, 0


def plan_params(plan: list[tuple], n_modules: int, n_heads: int, n_out: int) -> int:
    per_module = sum(f * w * (k * k if k else 1) + w for f, w, k, _ in plan)
    return n_modules * per_module + n_heads * (plan[-1][1] + 1) * n_out


def matching_scale(backbone, n_modules: int, n_heads: int, n_out: int) -> float:
    """The largest width scale (to 1e-3) whose PathNet has no more parameters than the model."""
    budget = sum(p.numel() for p in backbone.parameters())
    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        fits = plan_params(layer_plan(backbone, mid)[0], n_modules, n_heads, n_out) <= budget
        lo, hi = (mid, hi) if fits else (lo, mid)
    return max(math.floor(lo * 1000) / 1000, 1e-3)


class PathNet(SGDMethod):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"
    # the models it reads sizes from, checked by metacl.validate (class -> config names)
    network_models: ClassVar[dict[str, str]] = {"MLP": "mlp, mlp_hat", "AlexNet": "alexnet"}

    def __init__(self, backbone, task_info, lr: float = 0.05, n_modules: int = 16,
                 modules_per_path: int = 3, population: int = 2, generations: int = 20,
                 turn_batches: int | None = None, mutation_prob: float | None = None,
                 mutation_range: int = 2, module_scale: float | None = None,
                 grad_clip_norm: float | None = 1000.0, **kwargs):
        super().__init__(backbone, task_info, lr=lr, grad_clip_norm=grad_clip_norm, **kwargs)
        if not isinstance(backbone, MLP | AlexNet):
            raise ConfigError(f"method=pathnet builds its modules from model=mlp, mlp_hat or "
                              f"alexnet, not {type(backbone).__name__}")
        if not 1 <= modules_per_path <= n_modules or population < 2 or generations < 1:
            raise ConfigError(f"method=pathnet: modules_per_path={modules_per_path}, n_modules="
                              f"{n_modules}, population={population}, generations={generations};"
                              " allowed: 1 <= modules_per_path <= n_modules, population >= 2, "
                              "generations >= 1")
        T, n_out = task_info.n_tasks, task_info.n_outputs
        self.module_scale = float(module_scale or matching_scale(backbone, n_modules, T, n_out))
        plan, self.n_conv = layer_plan(backbone, self.module_scale)
        self.layers = nn.ModuleList(ModuleLayer(n_modules, f, w, k, p) for f, w, k, p in plan)
        self.input_dropout = getattr(backbone, "input_dropout", 0.0)
        head = [nn.Linear(plan[-1][1], n_out) for _ in range(T)]  # one head per task
        self.head_weight = nn.Parameter(torch.stack([h.weight.detach() for h in head]))
        self.head_bias = nn.Parameter(torch.stack([h.bias.detach() for h in head]))
        L, M, N, P = len(plan), n_modules, modules_per_path, population
        self.M, self.N, self.P = M, N, P
        self.generations = generations
        self.fixed_turn = turn_batches
        self.mutation_prob = 1 / (N * L) if mutation_prob is None else float(mutation_prob)
        self.mutation_range = int(mutation_range)
        self.register_buffer("paths", self.random_paths(P))
        self.register_buffer("task_paths", torch.full((T, L, N), -1, dtype=torch.long))
        self.register_buffer("frozen", torch.zeros(L, M, dtype=torch.bool))
        for name in ("active", "winner", "turn_step", "turn_batches", "generation"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self.register_buffer("best_loss", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("turn_loss", torch.zeros(()))
        self.snapshot = nn.Module()  # the parameters of the best-scoring turn of the task
        for i, p in enumerate(self.evolved()):
            self.snapshot.register_buffer(f"p{i}", p.detach().clone())
        self._val: tuple[Tensor, Tensor] | None = None
        self.set_trained_parameters(self.evolved())

    # ----------------------------------------------------------------- paths
    def evolved(self) -> list[nn.Parameter]:
        return [*self.layers.parameters(), self.head_weight, self.head_bias]

    def random_paths(self, n: int) -> Tensor:
        """n paths of N distinct modules per layer."""
        L = len(self.layers)
        return torch.stack([torch.stack([torch.randperm(self.M)[: self.N] for _ in range(L)])
                            for _ in range(n)])

    def mutate(self, path: Tensor) -> Tensor:
        new = path.clone()
        offsets = range(-self.mutation_range, self.mutation_range + 1)
        for layer in new:
            for k in range(self.N):
                if float(torch.rand(())) >= self.mutation_prob:
                    continue
                v = int(layer[k])
                others = set(layer.tolist()) - {v}
                allowed = [(v + d) % self.M for d in offsets if (v + d) % self.M not in others]
                layer[k] = allowed[int(torch.randint(len(allowed), ()))]
        return new

    def path_of(self, t: int) -> Tensor:
        """Task t's own path once learned; the current winner before that."""
        path = self.task_paths[t]
        return path if int(path[0, 0]) >= 0 else self.paths[self.winner]

    def task_logits(self, x: Tensor, t: int, path: Tensor) -> Tensor:
        h = x.reshape(x.shape[0], *self.task_info.input_shape) if self.n_conv else x.flatten(1)
        if self.input_dropout:
            h = F.dropout(h, self.input_dropout, self.training)
        for l, layer in enumerate(self.layers):
            if l == self.n_conv:
                h = h.flatten(1)
            h = layer(h, path[l], self.frozen[l, path[l]])
        return F.linear(h, self.head_weight[t], self.head_bias[t])

    # ----------------------------------------------------------------- tournament
    @torch.no_grad()
    def path_loss(self, p: int, t: int) -> float:
        """Fitness (lower is better) of path p after its turn on task t."""
        if self._val is None:  # no validation split: the turn's mean training loss
            return float(self.turn_loss) / max(int(self.turn_step), 1)
        was_training = self.training
        self.eval()
        x, y = self._val
        total = sum(F.cross_entropy(self.mask_logits(self.task_logits(xb, t, self.paths[p]), t),
                                    yb, reduction="sum")
                    for xb, yb in zip(x.split(512), y.split(512)))
        self.train(was_training)
        return float(total) / len(y)

    def end_turn(self, t: int) -> None:
        p = int(self.active)
        loss = self.path_loss(p, t)
        if loss < float(self.best_loss):
            self.best_loss.fill_(loss)
            self.winner.fill_(p)
            with torch.no_grad():
                for q, s in zip(self.evolved(), self.snapshot.buffers()):
                    s.copy_(q)
        self.active += 1
        self.turn_step.zero_()
        self.turn_loss.zero_()

    @torch.no_grad()
    def restore_snapshot(self) -> None:
        if math.isfinite(float(self.best_loss)):
            for q, s in zip(self.evolved(), self.snapshot.buffers()):
                q.copy_(s)

    def end_generation(self) -> None:
        self.restore_snapshot()
        w = int(self.winner)
        for p in range(self.P):
            if p != w:
                self.paths[p] = self.mutate(self.paths[w])
        self.active.zero_()
        self.generation += 1

    # ----------------------------------------------------------------- lifecycle
    def before_task(self, t: int, datamodule) -> None:
        super().before_task(t, datamodule)
        if t > 0:  # modules in no earlier task's path start afresh (paper and reference)
            for layer, frozen in zip(self.layers, self.frozen):
                layer.reinit(~frozen)
        self.paths.copy_(self.random_paths(self.P))
        for name in ("active", "winner", "turn_step", "generation"):
            getattr(self, name).zero_()
        self.turn_loss.zero_()
        self.best_loss.fill_(math.inf)
        self.turn_batches.fill_(self.fixed_turn or self._turn_batches(t, datamodule))
        self._val = None
        if getattr(datamodule, "has_validation", False):
            task = datamodule.tasks[t]
            self._val = (datamodule.prepare_batch(task.x_val, False), task.y_val)

    def _turn_batches(self, t: int, datamodule) -> int:
        """The task's batches spread over `generations` generations of P turns each."""
        n = len(datamodule.tasks[t].y_train)
        per_epoch = math.ceil(n / self.batch_size)
        return max(1, per_epoch * self.n_epochs // (self.generations * self.P))

    def after_task(self, t: int, datamodule) -> None:
        if int(self.turn_step) > 0:  # the last, partial turn is scored too
            self.end_turn(t)
        self.restore_snapshot()
        self.task_paths[t] = self.paths[self.winner]
        for l in range(len(self.layers)):
            self.frozen[l, self.task_paths[t, l]] = True
        self._val = None

    def task_metrics(self) -> dict[str, float]:
        return {"pathnet/frozen_modules": float(self.frozen.float().mean())}

    def objective(self, x, y, t):
        """Task t's loss along the path whose turn it is (only its modules and head learn)."""
        task = self._task
        return self.loss(self.task_logits(x, task, self.paths[self.active]), y, task)

    def observe(self, x, y, t):
        loss = super().observe(x, y, t)  # glances of SGD on the active path
        self.turn_loss += loss
        self.turn_step += 1
        if int(self.turn_step) >= int(self.turn_batches):
            self.end_turn(self._task)
            if int(self.active) == self.P:
                self.end_generation()
        return loss

    # ----------------------------------------------------------------- evaluation
    # The plateau schedule (schedule=hat) must not restore its own best epoch: the parameters
    # belong with the paths, and after_task restores the tournament's snapshot.
    keeps_own_best = True

    def forward(self, x, t):
        t = int(t)
        return self.mask_logits(self.task_logits(x, t, self.path_of(t)), t)

    @torch.no_grad()
    def predict(self, x, t, allowed=None, variant=None):
        return self.restrict(self.task_logits(x, t, self.path_of(t)), t, allowed).argmax(dim=1)
