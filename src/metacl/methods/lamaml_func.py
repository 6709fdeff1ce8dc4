"""La-MAML's glance as a pure function of the weights, for torch.func.vmap over population members.

A population run (issue #16) trains N members of a multirun (seeds, float hyperparameters) as one
batched program. The La-MAML family (`metacl.methods.lamaml`: La-MAML, C-MAML, Sync-La-MAML;
`metacl.methods.la_er`: La-ER) reads and writes its weights through module state; here the same
update is a function of explicit tensors, so that `torch.func.vmap` maps it over a leading member
dimension::

    w, a = stack([m.backbone.parameters() for m in members]), stack([m.alpha for m in members])
    loss, gw, ga = vmap_glance(backbone, w, a, x, y, bx, by, bt, class_mask, task, **options)
    outer_step(w, a, gw, ga, opt_lr=..., opt_wt=..., grad_clip_norm=..., learn_lr=...,
               sync_update=...)
    write_back(w, [list(m.backbone.parameters()) for m in members])

`glance` is the maths of `LaMAML._glance_autograd` (the literal loop, see lamaml.py's docstring):
inner SGD steps from w on the chunks of the incoming batch (`inner_chunks`), each on the loss
restricted to the current task's classes, with step size relu(alpha) (`inner_lr_relu`) or alpha,
inner gradients clamped to +-inner_grad_clamp; the meta-loss is the mean over the fast weight
sets w_1..w_K (or w_K alone, `meta_every_step=False`) of the loss on the meta-batch, each sample
on its own task's classes; its gradients with respect to w and alpha are returned.

* second order: the inner gradients are functions of the fast weights (`torch.func.grad` nested
  in `torch.func.grad_and_value`), so the meta-gradient includes the Hessian terms;
* first order: the inner gradients are constants. The inner loop keeps running sums
  S_k = g_1 + ... + g_k and w_k = w - lr(alpha) * S_k; the gradients G_k = dL/dw_k of the
  meta-loss at the fast weights (all at once, or one after each inner step: `stack_steps`)
  give the meta-gradients by the chain rule: dL/dw = sum_k G_k, dL/dalpha =
  -sum_k G_k * S_k * lr'(alpha). Same values as the literal loop up to rounding
  (w - lr*(g_1 + g_2) instead of (w - lr*g_1) - lr*g_2).

`stack_steps` (default true) evaluates the K meta-losses as one forward vmapped over the
stacked fast weight sets, false one by one (LaMAML's `vectorize`), which never forms the
(members, K, ...) stacks.

Masks: `class_mask` is a member's (n_tasks, n_outputs) bool mask (`TaskInfo.class_mask()`),
or None for single-head scenarios; logits outside a task's classes are set to MASK_VALUE as
`ContinualMethod.mask_logits` does. vmap cannot map over a None argument: `vmap_glance` picks
the in_dims; with a hand-made vmap, give the mask in_dim None when it is None.

Gradients a call does not need (`need_w` / `need_alpha` false) come back as empty tuples, not
None: vmap needs every output to be a pytree of tensors.

Limits: the backbone must be a pure function of (x, params): dropout draws under vmap need
`randomness="different"` (and then do not reproduce a separate run's draws), and batch-norm
running statistics (ResNet18 with track_running_stats) are in-place buffer writes that vmap
refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vmap

from metacl.methods.lamaml import VMAP_RANDOMNESS, inner_chunks
from metacl.methods.population import (
    clip_members_,
    masked_loss,
    per_member,
    stack,
    unstack,
    write_back,
)

Params = tuple[Tensor, ...]
Forward = Callable[[Tensor, Sequence[Tensor]], Tensor]

__all__ = ["glance", "loss_and_grad", "masked_loss", "outer_step", "stack", "unstack",
           "vmap_glance", "vmap_loss_and_grad", "write_back"]


# ---------------------------------------------------------------------------------- loss


# ---------------------------------------------------------------------------------- glance
def glance(forward: Forward, w: Sequence[Tensor], a: Sequence[Tensor], x: Tensor, y: Tensor,
           bx: Tensor, by: Tensor, bt: Tensor, class_mask: Tensor | None, task: int, *,
           inner_batches: int | None, second_order: bool, inner_grad_clamp: float | None,
           inner_lr_relu: bool, need_w: bool = True, need_alpha: bool = True,
           meta_every_step: bool = True, stack_steps: bool = True
           ) -> tuple[Tensor, Params, Params]:
    """One glance of one member: (meta-loss, dL/dw, dL/dalpha), the gradients as tuples shaped
    like w and a (empty tuples where need_w / need_alpha is false).

    forward(x, params): the backbone's functional call. w, a: the weights and the step sizes.
    (x, y): the incoming batch (inner loop, loss on `task`'s classes); (bx, by, bt): the
    meta-batch and each sample's task. `task` is a python int (the same for every member).
    stack_steps: the K meta-losses as one forward vmapped over the stacked fast weight sets
    (fewer, larger operations: GPUs), or one forward per inner step (LaMAML's
    vectorize=false; no (K, ...) stacks: less memory, and faster on a CPU where the stacks of
    many members outgrow the caches).
    """
    w, a = tuple(w), tuple(a)
    chunks = inner_chunks(x, y, inner_batches)

    def lr(alpha: Params) -> Params:
        return tuple(ai.relu() for ai in alpha) if inner_lr_relu else alpha

    def inner_loss(fast: Params, xk: Tensor, yk: Tensor) -> Tensor:
        return masked_loss(forward(xk, fast), yk, class_mask, task)

    def inner_grad(fast: Params, xk: Tensor, yk: Tensor) -> Params:
        g = grad(inner_loss)(fast, xk, yk)
        if inner_grad_clamp is None:
            return g
        return tuple(gi.clamp(-inner_grad_clamp, inner_grad_clamp) for gi in g)

    def meta_loss(fast: Params) -> Tensor:
        return masked_loss(forward(bx, fast), by, class_mask, bt)

    def stacked_loss(stacked: Params) -> Tensor:
        """Mean over the K fast weight sets of (K, *shape) `stacked` of the meta-batch loss."""
        k = stacked[0].shape[0]
        logits = vmap(lambda ps: forward(bx, ps), randomness=VMAP_RANDOMNESS)(stacked)
        # Equal-sized meta-batches: the mean over the K*B rows is the mean of the K means.
        return masked_loss(logits.flatten(0, 1), by.repeat(k), class_mask, bt.repeat(k))

    if not second_order:
        run = _first_order_stacked if stack_steps else _first_order_loop
        return run(w, a, lr(a), chunks, inner_grad, meta_loss, stacked_loss, inner_lr_relu,
                   need_w, need_alpha, meta_every_step)

    def meta(w_: Params, a_: Params) -> Tensor:
        steps = lr(a_)
        fast, trajectory = w_, []
        for xk, yk in chunks:  # the inner gradients stay functions of the fast weights
            g = inner_grad(fast, xk, yk)
            fast = tuple(f - s * gi for f, s, gi in zip(fast, steps, g))
            trajectory.append(fast)
        if not meta_every_step:
            return meta_loss(fast)
        if stack_steps and len(trajectory) > 1:
            return stacked_loss(tuple(torch.stack(ps) for ps in zip(*trajectory)))
        return torch.stack([meta_loss(f) for f in trajectory]).mean()

    argnums = (0,) * need_w + (1,) * need_alpha
    if not argnums:
        return meta(w, a), (), ()
    grads, loss = grad_and_value(meta, argnums=argnums)(w, a)
    return loss, grads[0] if need_w else (), grads[-1] if need_alpha else ()


# First order: the inner gradients g_k are constants, w_k = w - lr(alpha) * S_k with
# S_k = g_1 + ... + g_k, so with G_k = dL_meta/dw_k (the mean's 1/K included):
#
#     dL_meta/dw = sum_k G_k        dL_meta/dalpha = -sum_k G_k * S_k * lr'(alpha)
#
# (lr' = 1, or relu' = [alpha > 0]): the chain rule of `LaMAML._glance_first_order`, without a
# graph through the inner loop. The sums over k are taken step by step with out-of-place ops
# (vmap has no batching rule for addcmul_ or the torch._foreach_* ops): G's memory layout is
# the backward's (transposed for linear weights), and a reduction over a stacked dimension of
# such a layout is ~10x slower on a CPU than these additions, which keep it.
def _inner_trajectory(w, lr, chunks, inner_grad):
    """Yields (S_k, w_k) for k = 1..K: w_k = w - lr * S_k."""
    s, fast = None, w
    for xk, yk in chunks:
        g = inner_grad(fast, xk, yk)
        s = g if s is None else tuple(si + gi for si, gi in zip(s, g))
        fast = tuple(torch.addcmul(wi, li, si, value=-1.0) for wi, li, si in zip(w, lr, s))
        yield s, fast


def _accumulate(gw, ga, g, s, need_w, need_alpha):
    """gw += g; ga += g * s (None: start)."""
    if need_w:
        gw = tuple(gi.clone() for gi in g) if gw is None else tuple(
            acc + gi for acc, gi in zip(gw, g))
    if need_alpha:
        ga = tuple(gi * si for gi, si in zip(g, s)) if ga is None else tuple(
            torch.addcmul(acc, gi, si) for acc, gi, si in zip(ga, g, s))
    return gw, ga


def _finish(gw, ga, a, inner_lr_relu, need_w, need_alpha, scale=None):
    """(gw, -ga * lr'(alpha)), both times `scale` (1/K) when given; () for what is not needed."""
    if not need_w:
        gw = ()
    elif scale is not None:
        gw = tuple(g * scale for g in gw)
    if not need_alpha:
        return gw, ()
    factor = -1.0 if scale is None else -scale
    ga = tuple(g * factor for g in ga)
    if inner_lr_relu:
        ga = tuple(g * (ai > 0) for g, ai in zip(ga, a))
    return gw, ga


def _first_order_stacked(w, a, lr, chunks, inner_grad, meta_loss, stacked_loss, inner_lr_relu,
                         need_w, need_alpha, meta_every_step):
    """G for all k from one gradient of the meta-loss of the stacked fast weights."""
    steps = list(_inner_trajectory(w, lr, chunks, inner_grad))
    if not meta_every_step:
        steps = steps[-1:]
    if len(steps) == 1:
        G, loss = grad_and_value(meta_loss)(steps[0][1])
        G = tuple(gi.unsqueeze(0) for gi in G)
    else:
        stacked = tuple(torch.stack(ps) for ps in zip(*(fast for _, fast in steps)))
        G, loss = grad_and_value(stacked_loss)(stacked)
    gw = ga = None
    for k, (s, _) in enumerate(steps):
        gw, ga = _accumulate(gw, ga, tuple(gi[k] for gi in G), s, need_w, need_alpha)
    return (loss, *_finish(gw, ga, a, inner_lr_relu, need_w, need_alpha))


def _first_order_loop(w, a, lr, chunks, inner_grad, meta_loss, stacked_loss, inner_lr_relu,
                      need_w, need_alpha, meta_every_step):
    """G_k after each inner step, summed at once: no (K, ...) stack is ever formed."""
    if not meta_every_step:
        *_, (s, fast) = _inner_trajectory(w, lr, chunks, inner_grad)
        g, loss = grad_and_value(meta_loss)(fast)
        return (loss, *_finish(*_accumulate(None, None, g, s, need_w, need_alpha), a,
                               inner_lr_relu, need_w, need_alpha))
    gw = ga = None
    losses = []
    for s, fast in _inner_trajectory(w, lr, chunks, inner_grad):
        g, loss = grad_and_value(meta_loss)(fast)
        gw, ga = _accumulate(gw, ga, g, s, need_w, need_alpha)
        losses.append(loss)
    k = len(losses)
    return (torch.stack(losses).mean(),
            *_finish(gw, ga, a, inner_lr_relu, need_w, need_alpha, None if k == 1 else 1.0 / k))


def loss_and_grad(forward: Forward, w: Sequence[Tensor], bx: Tensor, by: Tensor, bt: Tensor,
                  class_mask: Tensor | None) -> tuple[Tensor, Params]:
    """(loss, dloss/dw) of the plain meta-batch loss at w: La-ER's weight gradient
    (`LaMAML.loss_gradient`)."""
    def loss(w_: Params) -> Tensor:
        return masked_loss(forward(bx, w_), by, class_mask, bt)

    g, value = grad_and_value(loss)(tuple(w))
    return value, g


def _mask_dim(class_mask: Tensor | None) -> int | None:
    return None if class_mask is None else 0


def vmap_glance(forward: Forward, w: Params, a: Params, x: Tensor, y: Tensor, bx: Tensor,
                by: Tensor, bt: Tensor, class_mask: Tensor | None, task: int,
                randomness: str = "error", **options) -> tuple[Tensor, Params, Params]:
    """`glance` for N stacked members: every tensor argument has a leading member dimension
    (class_mask (N, n_tasks, n_outputs), or None); returns (N,) losses and (N, ...) gradients.
    `options`: glance's keyword arguments."""
    def one(w_, a_, x_, y_, bx_, by_, bt_, mask_):
        return glance(forward, w_, a_, x_, y_, bx_, by_, bt_, mask_, task, **options)

    in_dims = (0, 0, 0, 0, 0, 0, 0, _mask_dim(class_mask))
    return vmap(one, in_dims=in_dims, randomness=randomness)(w, a, x, y, bx, by, bt, class_mask)


def vmap_loss_and_grad(forward: Forward, w: Params, bx: Tensor, by: Tensor, bt: Tensor,
                       class_mask: Tensor | None, randomness: str = "error"
                       ) -> tuple[Tensor, Params]:
    """`loss_and_grad` for N stacked members."""
    def one(w_, bx_, by_, bt_, mask_):
        return loss_and_grad(forward, w_, bx_, by_, bt_, mask_)

    in_dims = (0, 0, 0, 0, _mask_dim(class_mask))
    return vmap(one, in_dims=in_dims, randomness=randomness)(w, bx, by, bt, class_mask)


# ---------------------------------------------------------------------------------- outer step


@torch.no_grad()
def outer_step(w: Sequence[Tensor], a: Sequence[Tensor], grad_w: Sequence[Tensor],
               grad_a: Sequence[Tensor] | None, *, opt_lr: float | Tensor,
               opt_wt: float | Tensor, grad_clip_norm: float | Tensor | None, learn_lr: bool,
               sync_update: bool) -> None:
    """`LaMAML.outer_step` for stacked members, in place on the (N, ...) tensors w and a: clip
    both gradients per member (grad_w and grad_a are scaled in place), step alpha (learn_lr),
    then the weights: sync by opt_wt, async by relu(alpha_new). opt_lr / opt_wt: python floats
    (every member) or (N,) tensors (one value per member)."""
    w, a, grad_w = list(w), list(a), list(grad_w)
    clip_members_(grad_w, grad_clip_norm)
    if learn_lr and grad_a:
        grad_a = list(grad_a)
        clip_members_(grad_a, grad_clip_norm)
        if isinstance(opt_lr, Tensor):
            for ai, gi in zip(a, grad_a):
                ai.addcmul_(gi, per_member(opt_lr, ai), value=-1.0)
        else:
            torch._foreach_add_(a, grad_a, alpha=-opt_lr)
    if sync_update:
        if isinstance(opt_wt, Tensor):
            for wi, gi in zip(w, grad_w):
                wi.addcmul_(gi, per_member(opt_wt, wi), value=-1.0)
        else:
            torch._foreach_add_(w, grad_w, alpha=-opt_wt)
    else:
        steps = torch._foreach_clamp_min(a, 0.0)  # relu(alpha_new)
        torch._foreach_addcmul_(w, grad_w, steps, value=-1.0)


# ---------------------------------------------------------------------------------- members


