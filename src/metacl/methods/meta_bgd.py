"""Meta-BGD: C-MAML's look-ahead objective optimised by Bayesian Gradient Descent.

The La-MAML paper's baseline (Gupta et al. 2020, reference `model/meta-bgd.py`), which puts
C-MAML's meta-loss under the BGD optimizer of Zeno et al. 2018 ("Task Agnostic Continual
Learning Using Online Variational Bayes"). Every trained tensor theta (each weight, and each
inner step size alpha when `learn_lr`) has a factorised Gaussian posterior N(mu, sigma^2):
mu is the backbone's parameter itself (and `alpha`), sigma lives in the buffers `std.*`
(`alpha_std.*`), initialised to `std_init`. For one incoming batch (x, y), `glances` times::

    for m = 1..train_mc_iters                                  # Monte-Carlo samples
        shuffle (x, y);  (X_m, Y_m) <- replay_batch_size memory samples + (x, y)
        eps_m ~ N(0, I);  theta <- mu + sigma * eps_m          # weights and step sizes
        L_m  <- C-MAML look-ahead loss at theta: inner SGD steps w_k = w_{k-1} - alpha * g_k over
                `inner_batches` chunks of (x, y), mean over k of loss(f(X_m; w_k), Y_m)
        g_m  <- B * clip(dL_m/dw) (and B * dL_m/dalpha),  B = the incoming batch size
    E[g] <- mean_m g_m,   E[g eps] <- mean_m g_m * eps_m
    mu    <- mu - mean_eta * sigma^2 * E[g]
    sigma <- sigma * sqrt(1 + (sigma * E[g eps] / 2)^2) - sigma^2 * E[g eps] / 2

the memory being offered (x, y) on the first Monte-Carlo sample of the first glance of the first
epoch. Between updates the backbone holds mu, so evaluation (`predict`) uses the mean weights.

The inner trajectory, meta-batch, reservoir memory and meta-gradients are La-MAML's
(`metacl.methods.lamaml.LaMAML`): during a Monte-Carlo sample the parameters hold the sampled
theta and `glance_gradients` differentiates the look-ahead loss with respect to them. What
the reference does and we keep: second order (its inner loop always keeps the graph), inner step
alpha itself (no relu) with inner gradients clamped to +-grad_clip_norm, the weight gradient
(not alpha's) clipped to total norm grad_clip_norm before BGD sees it, gradients scaled by the
batch size (BGD expects summed, not averaged, losses), a fresh shuffle and replay draw for every
Monte-Carlo sample, and alpha among BGD's parameters (its `Learner.named_parameters()` includes
the step sizes, so they are sampled and get their own mean and std). docs/methods/meta_bgd.md.

`compile: true` (for GPUs): one Monte-Carlo sample's gradients (the look-ahead loss at theta,
its second-order gradients, the clip and the batch-size scale) are one pure function of theta,
compiled once (metacl.methods.compiled; a CUDA graph on CUDA) for the steady shapes; theta is
passed in rather than written into the parameters. The shuffles, replay draws, noise and the
BGD update stay eager. tests/test_meta_bgd.py checks it against the eager path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metacl.errors import ConfigError
from metacl.methods.common import BufferList
from metacl.methods.compiled import CompiledProgram, clip_total_norm
from metacl.methods.lamaml import LaMAML, clip_by_total_norm_


@torch.no_grad()
def bgd_update_(means: list[Tensor], stds: list[Tensor], e_grad: list[Tensor],
                e_grad_eps: list[Tensor], mean_eta: float) -> None:
    """Zeno et al.'s BGD step, in place: the mean first (with the old sigma), then sigma."""
    var = torch._foreach_mul(stds, stds)
    torch._foreach_addcmul_(means, var, e_grad, value=-mean_eta)  # mu -= eta sigma^2 E[g]
    half = torch._foreach_mul(torch._foreach_mul(stds, e_grad_eps), 0.5)  # sigma E[g eps] / 2
    root = torch._foreach_sqrt(torch._foreach_add(torch._foreach_mul(half, half), 1.0))
    # sigma * sqrt(1 + half^2) - sigma * half
    torch._foreach_copy_(stds, torch._foreach_mul(torch._foreach_sub(root, half), stds))


class MetaBGD(LaMAML):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"
    population_keys, population_class = (), None  # its own observe: one run at a time

    def __init__(
        self,
        backbone: nn.Module,
        task_info,
        batch_size: int = 10,
        n_epochs: int = 1,
        glances: int = 3,
        memories: int = 200,
        replay_batch_size: int = 10,
        alpha_init: float = 0.1,
        learn_lr: bool = True,
        std_init: float = 0.02,
        mean_eta: float = 50.0,
        train_mc_iters: int = 2,
        inner_batches: int | None = 3,
        second_order: bool = True,
        grad_clip_norm: float | None = 2.0,
        inner_grad_clamp: float | None = 2.0,
        inner_lr_relu: bool = False,
        vectorize: bool = True,
        compile: bool = False,
    ):
        super().__init__(
            backbone, task_info, batch_size=batch_size, n_epochs=n_epochs, glances=glances,
            memories=memories, replay_batch_size=replay_batch_size, alpha_init=alpha_init,
            opt_lr=0.0, opt_wt=0.0, learn_lr=learn_lr, sync_update=True,
            inner_batches=inner_batches, second_order=second_order,
            grad_clip_norm=grad_clip_norm, inner_grad_clamp=inner_grad_clamp,
            inner_lr_relu=inner_lr_relu, use_old_task_memory=False, vectorize=vectorize,
        )
        if int(train_mc_iters) < 1:
            raise ConfigError(f"train_mc_iters={train_mc_iters}: BGD needs at least one "
                              "Monte-Carlo sample per update")
        if std_init <= 0:
            raise ConfigError(f"std_init={std_init}: the posterior std must start positive")
        self.std_init = std_init
        self.mean_eta = mean_eta
        self.train_mc_iters = int(train_mc_iters)
        # The posterior std of every weight (and step size): part of the state_dict.
        self.std = BufferList(torch.full_like(p, std_init) for p in backbone.parameters())
        self.alpha_std = BufferList(torch.full_like(a, std_init) for a in self.alpha
                                    if learn_lr)
        self.compile = bool(compile)  # LaMAML's compiled glance (its outer step) is not used
        if self.compile and (type(self).loss is not LaMAML.loss
                             or type(self).observe is not MetaBGD.observe):
            raise ConfigError(f"method.compile=true: {type(self).__name__} changes Meta-BGD's "
                              "loss or update; the compiled program is Meta-BGD's own")
        self._mc_program = CompiledProgram(self.mc_gradients) if self.compile else None

    def mc_gradients(self, w, a, x, y, bx, by, bt, task):
        """One Monte-Carlo sample's (loss, scaled clipped dL/dw, scaled dL/dalpha) at theta =
        (w, a), a pure function for method.compile: the eager path's maths."""
        class_mask = self.class_mask if self.task_info.multi_head else None
        loss, gw, ga = self.functional_glance(self.backbone, w, a, x, y, bx, by, bt,
                                              class_mask, task)
        scale = float(x.shape[0])
        gw = [g * scale for g in clip_total_norm(gw, self.grad_clip_norm)]
        return loss, gw, [g * scale for g in ga]

    @property
    def fast_path(self) -> bool:
        # BGD evaluates the look-ahead loss at sampled weights written into the parameters, so
        # it uses La-MAML's autograd path (the reference's second order needs it anyway).
        return False

    def sample_noise(self, like: list[Tensor]) -> list[Tensor]:
        """eps ~ N(0, I) for one Monte-Carlo sample, one tensor per posterior."""
        return [torch.randn_like(m) for m in like]

    def observe(self, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        push = self._first_epoch()
        targets = list(self.backbone.parameters()) + (list(self.alpha) if self.learn_lr else [])
        stds = list(self.std) + list(self.alpha_std)
        means = [p.detach().clone() for p in targets]  # mu, while the parameters hold samples
        for glance in range(self.glances):
            grad_sum = [torch.zeros_like(m) for m in means]
            grad_eps_sum = [torch.zeros_like(m) for m in means]
            losses = []
            for mc_iter in range(self.train_mc_iters):
                perm = torch.randperm(x.shape[0], device=x.device)
                x, y, t = x[perm], y[perm], t[perm]
                bx, by, bt = self.meta_batch(x, y, t)
                eps = self.sample_noise(means)
                mc = self._compiled_mc if self._mc_program is not None else self._eager_mc
                loss, grads = mc(targets, means, stds, eps, x, y, bx, by, bt)
                if glance == 0 and mc_iter == 0 and push:
                    self.memory.add(x, y, t)
                with torch.no_grad():
                    torch._foreach_add_(grad_sum, grads)
                    torch._foreach_addcmul_(grad_eps_sum, grads, eps)
                losses.append(loss)
            n = float(self.train_mc_iters)
            bgd_update_(means, stds, torch._foreach_div(grad_sum, n),
                        torch._foreach_div(grad_eps_sum, n), self.mean_eta)
        with torch.no_grad():  # rest at the mean: evaluation and checkpoints see mu
            torch._foreach_copy_(targets, means)
        return torch.stack(losses).mean()

    def _eager_mc(self, targets, means, stds, eps, x, y, bx, by, bt):
        """One Monte-Carlo sample's loss and gradients (the reference's way): theta = mu +
        sigma * eps written into the parameters, the look-ahead gradients by autograd, the
        weight gradient clipped, both scaled by the batch size (BGD expects summed losses)."""
        with torch.no_grad():
            torch._foreach_copy_(targets, torch._foreach_addcmul(means, stds, eps))
        loss, grad_w, grad_a = self.glance_gradients(x, y, bx, by, bt, need_alpha=self.learn_lr)
        with torch.no_grad():
            clip_by_total_norm_(grad_w, self.grad_clip_norm)  # weights only, as the reference
            grads = grad_w + (grad_a if self.learn_lr else [])
            torch._foreach_mul_(grads, float(x.shape[0]))
        return loss, grads

    @torch.no_grad()
    def _compiled_mc(self, targets, means, stds, eps, x, y, bx, by, bt):
        """mc_gradients at theta = mu + sigma * eps: the compiled program for the steady shapes
        (a full incoming batch and meta-batch), the same function eagerly for the others."""
        theta = torch._foreach_addcmul(means, stds, eps)
        n_w = len(self.std)
        w = tuple(theta[:n_w])
        a = tuple(theta[n_w:]) if self.learn_lr else tuple(p.detach() for p in self.alpha)
        steady = (x.shape[0], bx.shape[0]) == self.steady_shapes()
        loss, gw, ga = self._mc_program.run(steady, x.device, w, a, x, y, bx, by, bt,
                                            self.task_counter)
        # out of the program's buffers (a CUDA graph reuses them at its next replay)
        grads = [g.clone() for g in gw] + ([g.clone() for g in ga] if self.learn_lr else [])
        return loss.detach().clone(), grads
