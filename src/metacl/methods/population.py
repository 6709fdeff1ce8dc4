"""Several members of one method trained as one program (hydra/launcher=population).

A population is N runs of one method that differ only in their seed and in the float
hyperparameters the method lists in `population_keys` (docs/sweeps.md, "Population runs").
Every member stays a full method object with its own memory, class order and random state;
a Population holds the members' trained tensors stacked along a leading member dimension and
does the dense arithmetic of an incoming batch for all members at once. The host-side and
random work (replay draws, shuffles, reservoir insertions) still runs member by member, each
under its own random state (`randoms[i]`, a context manager), in the order its separate run
does it, so every member reproduces its separate run.

The contract the population loop (metacl.population.loop) relies on::

    pop = Method.population_class(members)      # reads the members' state
    losses = pop.observe(batches, randoms, epoch)   # one incoming batch each; (N,) losses
    pop.write_back()                            # stacked state -> the members' own tensors

`batches[i]` may be None (member i has no batch at this step: its task is shorter); members
whose batches differ in shape are computed in separate sub-stacks (`shape_groups`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from metacl.methods.base import MASK_VALUE

Params = tuple[Tensor, ...]


# ---------------------------------------------------------------------------------- helpers
def stack(members: Sequence[Sequence[Tensor]]) -> Params:
    """Members' parameter lists (same shapes, same order) as (N, *shape) tensors, detached
    copies: stack([list(m.backbone.parameters()) for m in methods])."""
    members = [list(ps) for ps in members]
    if not members:
        raise ValueError("stack: no members")
    if len({len(ps) for ps in members}) != 1:
        raise ValueError(f"stack: members have different numbers of tensors "
                         f"({sorted({len(ps) for ps in members})})")
    return tuple(torch.stack([p.detach() for p in ps]) for ps in zip(*members))

def unstack(stacked: Sequence[Tensor]) -> list[Params]:
    """Member n's tensors, as views of the stacked ones."""
    return [tuple(s[n] for s in stacked) for n in range(stacked[0].shape[0])]

@torch.no_grad()
def write_back(stacked: Sequence[Tensor], members: Sequence[Sequence[Tensor]]) -> None:
    """Copy member n's slice of the stacked tensors into members[n]'s tensors, in place."""
    if len(members) != stacked[0].shape[0]:
        raise ValueError(f"write_back: {stacked[0].shape[0]} stacked members, {len(members)} "
                         "parameter lists")
    for n, params in enumerate(members):
        params = list(params)
        if len(params) != len(stacked):
            raise ValueError(f"write_back: member {n} has {len(params)} tensors, "
                             f"{len(stacked)} are stacked")
        torch._foreach_copy_(params, [s[n] for s in stacked])

def per_member(value: float | Tensor, like: Tensor) -> float | Tensor:
    """A python float as is; an (N,) tensor shaped (N, 1, ..., 1) to broadcast over `like`.

    A tensor less precise than `like` is refused: float32 0.3 is not the 0.3 of a float64 run
    (a python float is exact in both)."""
    if not isinstance(value, Tensor):
        return value
    if value.is_floating_point() and torch.finfo(value.dtype).eps > torch.finfo(like.dtype).eps:
        raise ValueError(f"a per-member hyperparameter in {value.dtype} for {like.dtype} "
                         f"tensors loses precision; give it as a {like.dtype} tensor")
    return value.to(device=like.device, dtype=like.dtype).view(-1, *(1,) * (like.dim() - 1))

def masked_loss(logits: Tensor, y: Tensor, class_mask: Tensor | None, t: Tensor | int) -> Tensor:
    """`ContinualMethod.loss` with the mask passed in: cross-entropy on the logits of the
    sample's task's classes (the others filled with MASK_VALUE); class_mask None: all classes.
    `t` is a task index or a (B,) tensor of per-sample tasks."""
    if class_mask is not None:
        mask = class_mask[t]
        if mask.dim() == 1:
            mask = mask.expand_as(logits)
        logits = logits.masked_fill(~mask, MASK_VALUE)
    return F.cross_entropy(logits, y)

def clip_members_(tensors: Sequence[Tensor], max_norm: float | Tensor | None) -> None:
    """`clip_by_total_norm_` for each member of (N, ...) stacked gradients, by the member's own
    total norm: coef = min(1, max_norm / (norm + 1e-6)), as `nn.utils.clip_grad_norm_`.
    max_norm: a float (None or 0: no clipping, as clip_by_total_norm_) or an (N,) tensor (every
    member clipped). In place, no host sync."""
    if max_norm is None or not tensors:
        return
    if not isinstance(max_norm, Tensor) and not max_norm:
        return
    norms = [torch.linalg.vector_norm(t.flatten(1), dim=1) for t in tensors]  # each (N,)
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), dim=0)
    if isinstance(max_norm, Tensor):
        max_norm = per_member(max_norm, total)
    coef = (max_norm / (total + 1e-6)).clamp_(max=1.0)
    for t in tensors:
        t.mul_(per_member(coef, t))





def member_column(values: Sequence[float], like: Tensor) -> Tensor:
    """(N,) tensor of one hyperparameter's value per member."""
    return torch.tensor([float(v) for v in values], dtype=like.dtype, device=like.device)








def shape_groups(items: Sequence[tuple | None]) -> list[list[int]]:
    """Indices of the non-None items, grouped by the shapes of their tensors."""
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        if item is not None:
            groups.setdefault(tuple(tuple(v.shape) for v in item), []).append(i)
    return list(groups.values())


def gather(stacked: Sequence[Tensor], index: list[int], n: int) -> list[Tensor]:
    """The rows `index` of stacked tensors (the tensors themselves when all n are taken)."""
    if len(index) == n:
        return list(stacked)
    idx = torch.tensor(index, device=stacked[0].device)
    return [s.index_select(0, idx) for s in stacked]


@torch.no_grad()
def scatter(stacked: Sequence[Tensor], rows: Sequence[Tensor], index: list[int], n: int) -> None:
    """Write rows back to positions `index` (no-op when they are the tensors themselves)."""
    if len(index) == n:
        return
    idx = torch.tensor(index, device=stacked[0].device)
    for s, r in zip(stacked, rows):
        s.index_copy_(0, idx, r)


def has_random_layers(module: nn.Module) -> bool:
    """Dropout (random masks under vmap) or batch-norm running statistics (in-place updates
    vmap cannot do): such backbones train one run at a time."""
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            return True
    return False


def stacked_inputs(batches: Sequence[tuple], index: list[int]) -> list[Tensor]:
    """(x, y, t) of the members `index`, each stacked along a new member dimension."""
    return [torch.stack(parts) for parts in zip(*(batches[i] for i in index))]


def member_losses_and_grads(forward, W: Sequence[Tensor], x: Tensor, y: Tensor, t: Tensor,
                            class_mask: Tensor | None) -> tuple[Tensor, list[Tensor]]:
    """Every member's loss on its own batch, (N,), and its gradient for its own stacked
    weights. The forward is vmapped over the members; the backward is ordinary autograd of the
    sum of the members' losses (each member's weights only reach its own loss), several times
    cheaper on small networks than vmapping the gradient itself."""
    with torch.enable_grad():
        leaves = [w.detach().requires_grad_() for w in W]
        losses = vmap(lambda p, x, y, t, m: masked_loss(forward(x, list(p)), y, m, t),
                      in_dims=(0, 0, 0, 0, None if class_mask is None else 0))(
            tuple(leaves), x, y, t, class_mask)
        grads = list(torch.autograd.grad(losses.sum(), leaves))
    return losses.detach(), grads


# ---------------------------------------------------------------------------------- SGD
class SGDPopulation:
    """Members of an SGDMethod whose update is SGDMethod's loop unchanged (objective = the
    masked cross-entropy of the backbone, clip, SGD with momentum / weight decay): ER,
    finetune. Per member: glance_batch under its random state; for all members at once: the
    gradient (torch.func.vmap over members), clipping and the SGD step (lr per member)."""

    def __init__(self, members: Sequence[nn.Module]):
        self.members = list(members)
        m0 = self.members[0]
        self.glances = m0.glances
        self.params = [list(m.backbone.parameters()) for m in self.members]
        self.W = stack(self.params)
        self.lr = member_column([m.lr for m in self.members], self.W[0])
        self.momentum, self.weight_decay = float(m0.momentum), float(m0.weight_decay)
        self.grad_clip_norm = m0.grad_clip_norm
        self.multi_head = m0.task_info.multi_head
        self.class_mask = (torch.stack([m.class_mask for m in self.members])
                           if self.multi_head else None)
        self.buffers = self._momentum_buffers()
        self.forward = m0.backbone

    def _momentum_buffers(self) -> list[Tensor] | None:
        """Stacked momentum buffers; zeros where torch's SGD has none yet (its first step sets
        buf = grad, which is momentum * 0 + grad)."""
        if not self.momentum:
            return None
        rows = []
        for m, params in zip(self.members, self.params):
            state = m.optimizer.state
            rows.append([state[p]["momentum_buffer"] if "momentum_buffer" in state.get(p, {})
                         else torch.zeros_like(p) for p in params])
        return stack(rows)

    def observe(self, batches: Sequence[tuple | None], randoms, epoch: int) -> Tensor:
        n = len(self.members)
        losses = self.W[0].new_full((n,), float("nan"))
        for _ in range(self.glances):
            drawn: list[tuple | None] = [None] * n
            for i, (m, batch) in enumerate(zip(self.members, batches)):
                if batch is not None:
                    with randoms[i]:
                        drawn[i] = m.glance_batch(*batch)
            for index in shape_groups(drawn):
                losses[index] = self._step(index, stacked_inputs(drawn, index))
        for i, (m, batch) in enumerate(zip(self.members, batches)):
            if batch is not None:
                with randoms[i]:
                    m.after_glances(*batch)
        return losses

    @torch.no_grad()
    def _step(self, index: list[int], inputs: list[Tensor]) -> Tensor:
        n = len(self.members)
        W = gather(self.W, index, n)
        mask = None if self.class_mask is None else gather([self.class_mask], index, n)[0]
        loss, grads = member_losses_and_grads(self.forward, W, *inputs, mask)
        clip_members_(grads, self.grad_clip_norm)
        if self.weight_decay:
            torch._foreach_add_(grads, W, alpha=self.weight_decay)
        if self.momentum:
            bufs = gather(self.buffers, index, n)
            torch._foreach_mul_(bufs, self.momentum)
            torch._foreach_add_(bufs, grads)
            scatter(self.buffers, bufs, index, n)
            grads = bufs
        lr = self.lr[index] if len(index) < n else self.lr
        torch._foreach_sub_(W, [g * per_member(lr, g) for g in grads])
        scatter(self.W, W, index, n)
        return loss

    def write_back(self) -> None:
        write_back(self.W, self.params)
        if self.buffers is not None:
            for i, (m, params) in enumerate(zip(self.members, self.params)):
                for p, buf in zip(params, self.buffers):
                    m.optimizer.state[p]["momentum_buffer"] = buf[i].clone()
