"""La-ER: experience replay with La-MAML's learned per-parameter step sizes (Gupta et al. 2020).

The paper's ablation (the reference's `eralg4 --learn_lr`): the step sizes alpha are meta-learned
exactly as in La-MAML, but the weights follow plain experience replay. For one incoming batch
of task tau, `glances` times::

    shuffle (x, y);  (X_m, Y_m) <- replay_batch_size memory samples + (x, y)
    w_0 <- w;  for chunks (x_k, y_k):  w_k <- w_{k-1} - alpha * clamp(grad loss(x_k; w_{k-1}))
    L_meta <- loss(f(X_m; w_K), Y_m)                  # at the LAST fast weights only
    alpha  <- alpha - opt_lr * clip(d L_meta / d alpha)
    L_er   <- loss(f(X_m; w), Y_m)                    # ER loss at the current weights
    w      <- w - relu(alpha) * clip(d L_er / d w)

then (after the glances, in every epoch) offer (x, y) to the reservoir memory.

Everything but the outer weight gradient is La-MAML's: the inner trajectory, meta-gradient
(first-order fast path included) and the clipped alpha / relu(alpha) steps come from
`metacl.methods.lamaml.LaMAML`. Differences from La-MAML kept from the reference: the inner
step uses alpha itself (no relu) and clamps each inner gradient element to +-grad_clip_norm,
the meta-loss is taken after the last inner step only, and the memory is offered every sample
in every epoch (after the glances), not only during the first pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metacl.methods.lamaml import LaMAML
from metacl.methods.lamaml_population import LaMAMLPopulation
from metacl.methods.population import member_losses_and_grads


class LaERPopulation(LaMAMLPopulation):
    """La-ER members together: La-MAML's population with La-ER's box (module docstring):
    alpha from the look-ahead loss at the last fast weights, the weights from the replay loss
    at the current weights, the memory offered after the glances."""

    meta_every_step = False

    def draw(self, m, batch, glance: int, epoch: int):
        x, y, t = batch
        perm = torch.randperm(x.shape[0], device=x.device)
        x, y, t = x[perm], y[perm], t[perm]
        bx, by, bt = m.meta_batch(x, y, t)
        return (x, y, t), (x, y, bx, by, bt)

    def after_glances(self, current, randoms) -> None:
        for i, m in enumerate(self.members):
            if current[i] is not None:
                with randoms[i]:
                    m.memory.add(*current[i])

    def gradients(self, index, inputs, need_w: bool = True, need_alpha: bool | None = None):
        _, _, grad_a = super().gradients(index, inputs, need_w=False, need_alpha=True)
        _, _, bx, by, bt = inputs
        mask = None if self.class_mask is None else self.class_mask[index]
        W = self.W if len(index) == self.n else self.W[index]
        loss, grads = member_losses_and_grads(self.first.backbone, self._stacked_views(W),
                                              bx, by, bt, mask)
        return loss, torch.cat([g.flatten(1) for g in grads], 1), grad_a


class LaER(LaMAML):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"
    hand_written_mlp = False  # its glance takes the meta-loss after the last inner step only
    population_keys, population_class = ("opt_lr", "alpha_init"), LaERPopulation

    def __init__(
        self,
        backbone: nn.Module,
        task_info,
        batch_size: int = 10,
        n_epochs: int = 1,
        glances: int = 1,
        memories: int = 200,
        replay_batch_size: int = 10,
        alpha_init: float = 0.1,
        opt_lr: float = 0.1,
        inner_batches: int | None = 5,
        second_order: bool = False,
        grad_clip_norm: float | None = 2.0,
        inner_grad_clamp: float | None = 2.0,
        inner_lr_relu: bool = False,
        vectorize: bool = True,
        compile: bool = False,
    ):
        super().__init__(
            backbone, task_info, batch_size=batch_size, n_epochs=n_epochs, glances=glances,
            memories=memories, replay_batch_size=replay_batch_size, alpha_init=alpha_init,
            opt_lr=opt_lr, opt_wt=0.0, learn_lr=True, sync_update=False,
            inner_batches=inner_batches, second_order=second_order,
            grad_clip_norm=grad_clip_norm, inner_grad_clamp=inner_grad_clamp,
            inner_lr_relu=inner_lr_relu, use_old_task_memory=False, vectorize=vectorize,
            compile=compile,
        )

    def observe(self, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        weights, alphas = self.begin_update(x, y)
        for _ in range(self.glances):
            perm = torch.randperm(x.shape[0], device=x.device)
            x, y, t = x[perm], y[perm], t[perm]
            bx, by, bt = self.meta_batch(x, y, t)
            er_loss = self.glance_step(weights, alphas, x, y, bx, by, bt)
        self.end_update()
        self.memory.add(x, y, t)
        return er_loss

    def glance_step(self, weights, alphas, x, y, bx, by, bt) -> Tensor:
        if self._compiled is not None:  # functional_glance + outer step, one program
            return self._compiled(weights, alphas, x, y, bx, by, bt)
        # The step sizes learn from the look-ahead loss at the end of the inner trajectory.
        _, _, grad_a = self.glance_gradients(x, y, bx, by, bt, need_w=False,
                                             need_alpha=True, meta_every_step=False)
        # The weights follow the plain replay loss (at the weights before this glance).
        er_loss, grad_w = self.loss_gradient(bx, by, bt)
        self.outer_step(weights, alphas, grad_w, grad_a)  # alpha, then relu(alpha) * grad_w
        return er_loss

    def functional_glance(self, forward, w, a, x, y, bx, by, bt, class_mask, task):
        from metacl.methods import lamaml_func  # imports lamaml

        _, _, grad_a = lamaml_func.glance(
            forward, w, a, x, y, bx, by, bt, class_mask, task,
            inner_batches=self.inner_batches, second_order=self.second_order,
            inner_grad_clamp=self.inner_grad_clamp, inner_lr_relu=self.inner_lr_relu,
            need_w=False, need_alpha=True, meta_every_step=False, stack_steps=self.vectorize)
        er_loss, grad_w = lamaml_func.loss_and_grad(forward, w, bx, by, bt, class_mask)
        return er_loss, grad_w, grad_a
