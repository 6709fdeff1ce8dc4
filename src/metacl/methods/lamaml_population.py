"""La-MAML, C-MAML and Sync-La-MAML members trained together (metacl.methods.population).

The algorithm box is LaMAML.observe's; per glance::

    every member, under its own random state:  shuffle its batch, draw its replay samples,
        (first glance of the first epoch) offer the batch to its reservoir
    all members at once:  the glance's meta-gradients dL/dw, dL/dalpha        (N stacked rows)
    all members at once:  clip each member's gradients, alpha <- alpha - opt_lr * grad_alpha,
        w <- w - relu(alpha) * grad_w (or opt_wt * grad_w when sync_update)

The state is one flat row per member for the weights (W, N x P) and for alpha (A). The glance
is the hand-written member-batched MLP glance (lamaml_mlp.MLPGlance with N members) where a
single run uses the hand-written one, otherwise `lamaml_func.glance` under torch.func.vmap
over the members (any backbone, first or second order). opt_lr and opt_wt may differ per
member; alpha_init differs through the members' own initial alpha.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import vmap

from metacl.methods.lamaml_mlp import MLPGlance
from metacl.methods.population import (
    clip_members_,
    member_column,
    per_member,
    shape_groups,
    stacked_inputs,
)


class LaMAMLPopulation:
    meta_every_step = True  # the meta-loss after every inner step (La-ER: the last only)

    def __init__(self, members: Sequence):
        self.members = list(members)
        m0 = self.first = self.members[0]
        self.n = len(self.members)
        self.glances = m0.glances
        like = next(m0.backbone.parameters())
        self.opt_lr = member_column([m.opt_lr for m in self.members], like)
        self.opt_wt = member_column([m.opt_wt for m in self.members], like)
        self.shapes = [tuple(p.shape) for p in m0.backbone.parameters()]
        self.numels = [p.numel() for p in m0.backbone.parameters()]
        self.class_mask = (torch.stack([m.class_mask for m in self.members])
                           if m0.task_info.multi_head else None)
        self._mlp: dict[int, MLPGlance] = {}
        self.use_mlp = m0.mlp_path and self.meta_every_step
        if self.use_mlp:  # the state lives in the full-size glance's buffers (its layout)
            full = self._mlp_glance(self.n)
            self.W, self.A, self.views = full.w, full.a, full.views
        else:
            size = sum(self.numels)
            self.W = like.new_zeros(self.n, size)
            self.A = like.new_zeros(self.n, size)
            self.views = self._param_views
        with torch.no_grad():
            for i, m in enumerate(self.members):
                torch._foreach_copy_(self.views(self.W[i]), list(m.backbone.parameters()))
                torch._foreach_copy_(self.views(self.A[i]), list(m.alpha))
        forward = m0.backbone
        options = {"inner_batches": m0.inner_batches, "second_order": m0.second_order,
                   "inner_grad_clamp": m0.inner_grad_clamp, "inner_lr_relu": m0.inner_lr_relu,
                   "meta_every_step": self.meta_every_step}

        def one(w, a, x, y, bx, by, bt, mask, task, need_w, need_alpha):
            from metacl.methods import lamaml_func  # imports lamaml (a cycle at load time)

            return lamaml_func.glance(forward, w, a, x, y, bx, by, bt, mask, task,
                                      need_w=need_w, need_alpha=need_alpha, **options)

        self._one = one

    # ------------------------------------------------------------------ layout
    def _param_views(self, row: Tensor) -> list[Tensor]:
        return [seg.view(s) for seg, s in zip(row.split(self.numels), self.shapes)]

    def _stacked_views(self, rows: Tensor) -> tuple[Tensor, ...]:
        k = rows.shape[0]
        return tuple(seg.view(k, *s) for seg, s in zip(rows.split(self.numels, 1), self.shapes))

    def _mlp_glance(self, n: int) -> MLPGlance:
        if n not in self._mlp:
            m0 = self.first
            like = next(m0.backbone.parameters())
            self._mlp[n] = MLPGlance(m0.backbone, m0.batch_size, like, members=n)
        return self._mlp[n]

    # ------------------------------------------------------------------ the algorithm box
    def observe(self, batches, randoms, epoch: int) -> Tensor:
        losses = self.W.new_full((self.n,), float("nan"))
        current = list(batches)
        for glance in range(self.glances):
            drawn: list[tuple | None] = [None] * self.n
            for i, m in enumerate(self.members):
                if current[i] is None:
                    continue
                with randoms[i]:
                    current[i], drawn[i] = self.draw(m, current[i], glance, epoch)
            for index in shape_groups(drawn):
                losses[index] = self.update(index, stacked_inputs(drawn, index))
        self.after_glances(current, randoms)
        return losses

    def draw(self, m, batch, glance: int, epoch: int):
        """One member's random work of one glance, in its separate run's order: shuffle,
        replay draw, and (first glance of the first epoch) the reservoir insertion."""
        x, y, t = batch
        perm = torch.randperm(x.shape[0], device=x.device)
        x, y, t = x.index_select(0, perm), y.index_select(0, perm), t.index_select(0, perm)
        bx, by, bt = m.meta_batch(x, y, t)
        if glance == 0 and epoch == 0:
            m.memory.add(x, y, t)
        return (x, y, t), (x, y, bx, by, bt)

    def after_glances(self, current, randoms) -> None:
        """After an incoming batch's glances (La-ER offers it to the memory here)."""

    @torch.no_grad()
    def update(self, index: list[int], inputs: list[Tensor]) -> Tensor:
        loss, gw, ga = self.gradients(index, inputs)
        W, A = self._rows(self.W, index), self._rows(self.A, index)
        if W.device.type == "cpu" and (not self.use_mlp or len(index) == 1):
            # Each member's own outer step on its rows: the same operations, in the same order,
            # as its separate run (a few more small operations per glance, no rounding drift).
            # Several members of the hand-written MLP glance, which rounds differently from a
            # single run's anyway, take one batched step: ~5% of a 4-member glance faster.
            for j, i in enumerate(index):
                self.members[i].outer_step([W[j]], [A[j]], [gw[j]],
                                           None if ga is None else [ga[j]])
        else:  # one batched step for all members (per-member clipping and rates)
            self.batched_outer_step(index, W, A, gw, ga)
        self._put_rows(self.W, W, index)
        self._put_rows(self.A, A, index)
        return loss

    def batched_outer_step(self, index, W, A, gw, ga) -> None:
        m0 = self.first
        clip_members_([gw], m0.grad_clip_norm)
        opt_lr, opt_wt = self.opt_lr[index], self.opt_wt[index]
        if m0.learn_lr:
            clip_members_([ga], m0.grad_clip_norm)
            A.addcmul_(ga, per_member(opt_lr, ga), value=-1.0)
        if m0.sync_update:
            W.sub_(gw * per_member(opt_wt, gw))
        else:
            W.addcmul_(gw, A.clamp_min(0.0), value=-1.0)

    def _rows(self, state: Tensor, index: list[int]) -> Tensor:
        return state if len(index) == self.n else state[index]

    def _put_rows(self, state: Tensor, rows: Tensor, index: list[int]) -> None:
        if len(index) < self.n:
            state[index] = rows

    # ------------------------------------------------------------------ meta-gradients
    def gradients(self, index, inputs, need_w: bool = True, need_alpha: bool | None = None):
        """(meta-loss, dL/dw, dL/dalpha) of the members `index`, as (n,) and (n, P) rows."""
        m0 = self.first
        need_alpha = m0.learn_lr if need_alpha is None else need_alpha
        x, y, bx, by, bt = inputs
        if self.use_mlp:
            return self._mlp_gradients(index, x, y, bx, by, bt, need_alpha)
        mask = None if self.class_mask is None else self.class_mask[index]
        W, A = self._rows(self.W, index), self._rows(self.A, index)
        with torch.enable_grad():
            loss, gw, ga = vmap(self._one, in_dims=(0, 0, 0, 0, 0, 0, 0,
                                                    None if mask is None else 0,
                                                    None, None, None))(
                self._stacked_views(W), self._stacked_views(A), x, y, bx, by, bt, mask,
                m0.current_task, need_w, need_alpha)
        flat = lambda grads: torch.cat([g.flatten(1) for g in grads], 1)
        return (loss, flat(gw) if need_w else None, flat(ga) if need_alpha else None)

    def _mlp_gradients(self, index, x, y, bx, by, bt, need_alpha):
        m0 = self.first
        glance = self._mlp_glance(len(index))
        if len(index) < self.n:
            glance.w.copy_(self.W[index])
            glance.a.copy_(self.A[index])
        mask_inner = mask_meta = None
        if self.class_mask is not None:
            info = m0.task_info
            mask_inner = torch.stack([self.members[i].mask_logits(
                bx.new_zeros(info.n_outputs), m0.current_task) for i in index])
            mask_meta = torch.stack([self.members[i].mask_logits(
                bx.new_zeros(bx.shape[1], info.n_outputs), bt[j])
                for j, i in enumerate(index)])
        with torch.autocast(x.device.type, enabled=False):
            loss = glance.glance(x, y, bx, by, mask_inner, mask_meta, True, need_alpha,
                                 m0.inner_lr_relu, True)
        return loss, glance.gw, glance.ga if need_alpha else None

    # ------------------------------------------------------------------ the members
    def write_back(self) -> None:
        with torch.no_grad():
            for i, m in enumerate(self.members):
                torch._foreach_copy_(list(m.backbone.parameters()), self.views(self.W[i]))
                torch._foreach_copy_(list(m.alpha), self.views(self.A[i]))
