"""MAML (Finn, Abbeel & Levine 2017), second order or first order (FOMAML).

For every task of a meta-batch: take ``inner_steps`` SGD steps on the support loss from the
shared initialisation theta with functional fast weights, theta_k+1 = theta_k - lr * grad L_s;
the meta-loss is the query loss at the last fast weights, averaged over tasks and minimised
with Adam (``meta_lr``). Second order backpropagates through the inner gradients;
``first_order=True`` treats them as constants, so the meta-gradient is the query gradient at
the adapted weights (the inner loop then runs on detached tensors and records no graph).

The inner loss is the *mean* cross-entropy over the support set. The reference TF code sums
the per-example losses and divides by K, i.e. takes N (ways) times the mean, so its
``update_lr`` corresponds to ``inner_lr = ways * update_lr`` here (docs/fewshot.md).

Evaluation adapts with ``inner_steps_test`` steps (first order: nothing is backpropagated into
theta) and reports the query loss/accuracy before adaptation and after every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad

from metacl.fewshot.base import MetaLearner
from metacl.fewshot.population import MetaPopulation


def inner_loop(fast: list[Tensor], rates: Sequence, loss_fn: Callable[[list[Tensor]], Tensor],
               steps: int, second_order: bool, functional: bool = True) -> list[Tensor]:
    """``steps`` SGD steps fast <- fast - rate * grad loss_fn(fast).

    ``second_order=False`` evaluates the gradient on detached weights and detaches it, so the
    result depends on the initial weights (and learned rates) only through the update's sums:
    d fast_K / d fast_0 = identity. ``functional``: gradients by ``torch.func.grad``, which
    works inside ``vmap``; otherwise by ``torch.autograd.grad``, the same values with less
    overhead per call (the per-task loop on the CPU).
    """
    gradient = grad(loss_fn) if functional else None
    for _ in range(steps):
        if second_order:
            if functional:
                g = gradient(fast)
            else:
                g = torch.autograd.grad(loss_fn(fast), fast, create_graph=True)
        elif functional:
            g = [t.detach() for t in gradient([f.detach() for f in fast])]
        else:
            leaves = [f.detach().requires_grad_() for f in fast]
            g = torch.autograd.grad(loss_fn(leaves), leaves)
        fast = [f - r * gi for f, r, gi in zip(fast, rates, g, strict=True)]
    return fast


class MAML(MetaLearner):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"
    # Adapt only the final linear layer in the inner loop (ANIL sets this).
    head_only = False
    # Seed populations (second and first order; subclasses set their own).
    population_class = MetaPopulation

    def __init__(
        self,
        backbone,
        episode_info=None,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        inner_steps_test: int = 10,
        first_order: bool = False,
        **kwargs,
    ):
        super().__init__(backbone, episode_info, **kwargs)
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.inner_steps_test = int(inner_steps_test)
        self.first_order = bool(first_order)

    # ----------------------------------------------------------------- the inner loop
    def rates(self, state) -> list:
        """The inner learning rate of every parameter tensor (Meta-SGD learns them)."""
        return [self.inner_lr] * len(state[0])

    def _views(self, state, sx: Tensor, qx: Tensor, detach_inner: bool, detach_query: bool):
        """(weights adapted in the inner loop, forward on support, forward on query).

        All weights: the network itself. Head only: the body runs once on each set and the
        inner loop sees only its features (its forward is a single linear layer).
        """
        params = state[0]
        if not self.head_only:
            return (list(params), lambda w: self.backbone(sx, w),
                    lambda w: self.backbone(qx, w))
        fs = self.backbone.features(sx, params)
        fq = self.backbone.features(qx, params)
        fs = fs.detach() if detach_inner else fs
        fq = fq.detach() if detach_query else fq
        return list(params[-2:]), (lambda w: F.linear(fs, *w)), (lambda w: F.linear(fq, *w))

    def task_loss(self, state, sx, sy, qx, qy):
        fast, forward_s, forward_q = self._views(state, sx, qx, detach_inner=self.first_order,
                                                 detach_query=False)
        rates = self.rates(state)[-len(fast):]
        fast = inner_loop(fast, rates, lambda w: self.loss_fn(forward_s(w), sy),
                          self.inner_steps, second_order=not self.first_order,
                          functional=self.use_vmap)
        return self.loss_fn(forward_q(fast), qy)

    def task_eval(self, state, sx, sy, qx, qy):
        fast, forward_s, forward_q = self._views(state, sx, qx, detach_inner=True,
                                                 detach_query=True)
        rates = self.rates(state)[-len(fast):]
        losses, accs = [], []
        for step in range(self.inner_steps_test + 1):
            if step:
                fast = inner_loop(fast, rates, lambda w: self.loss_fn(forward_s(w), sy), 1,
                                  second_order=False, functional=self.use_vmap)
            out = forward_q([f.detach() for f in fast])
            losses.append(self.loss_fn(out, qy).detach())
            accs.append(self.accuracy(out, qy))
        return torch.stack(losses), torch.stack(accs)
