"""Gradient Episodic Memory (Lopez-Paz & Ranzato, 2017), as La-MAML runs it.

Memory: every task keeps its last `n_memories` training samples in a ring buffer
(metacl.memory.RingBuffer); an incoming batch is written to it once, before its updates.

For each incoming batch, `glances` times:
  1. for every past task k (each task trained before the current one), the gradient g_k of the
     loss on task k's memory (logits masked to task k's classes on class splits);
  2. the gradient g of the loss on the incoming batch;
  3. if some <g, g_k> < 0, replace g by the closest vector (in L2) that has a non-negative dot
     product with every g_k (paper eq. 10). It is found through the dual QP (eq. 11), with
     G the (K, P) matrix of the g_k:

         min_v  1/2 v^T G G^T v + g^T G^T v   s.t.  v >= memory_strength,      g~ = G^T v + g

     solved by `quadprog` on the host in double precision (only the K x K Gram matrix and the
     K dot products leave the device). `memory_strength` (the paper's bias gamma, the
     reference code's margin) lower-bounds v, pushing the update further into the cone of the
     past gradients. As in the reference, 1e-3 is added to the diagonal of G G^T.
  4. one SGD step with g (or g~).

With `grad_clip_norm` set, each g_k and g is clipped to that norm before the projection, as
La-MAML's copy of GEM does (the original GEM code does not clip); the projected gradient is
then used as is.

The past-task gradients come from one `torch.func.vmap` over tasks of the gradient of the
masked memory loss (one batched forward/backward instead of one per past task). Backbones
with buffers (batch-norm running statistics, which vmap cannot update in place) fall back to
a loop over past tasks.
"""

from __future__ import annotations

import numpy as np
import quadprog
import torch
import torch.nn.functional as F
from torch import Tensor

from metacl.memory import RingBuffer
from metacl.methods.base import SGDMethod

QP_EPS = 1e-3  # added to the diagonal of G G^T so the QP is strictly convex (as GEM's code)


# ---------------------------------------------------------------------- flat gradients
def flat_grad(params: list[Tensor]) -> Tensor:
    """The parameters' .grad as one vector (zeros for parameters without a gradient)."""
    return torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params
    ])


def set_flat_grad(params: list[Tensor], flat: Tensor) -> None:
    """Write a gradient vector back into the parameters' .grad."""
    offset = 0
    for p in params:
        n = p.numel()
        view = flat[offset:offset + n].view_as(p)
        if p.grad is None:
            p.grad = view.clone()
        else:
            p.grad.copy_(view)
        offset += n


def clip_rows(G: Tensor, max_norm: float | None) -> Tensor:
    """Scale each row of G to L2 norm <= max_norm (clip_grad_norm_'s rule, row by row)."""
    if not max_norm:
        return G
    scale = (max_norm / (G.norm(dim=-1, keepdim=True) + 1e-6)).clamp(max=1.0)
    return G * scale


def projected_step(method: SGDMethod, optimizer, project) -> None:
    """GEM's and A-GEM's update: the clipped flat gradient, projected by `project(g)`, then
    the optimizer's step."""
    params = method.trained_parameters()
    g = clip_rows(flat_grad(params), method.grad_clip_norm)
    set_flat_grad(params, project(g))
    optimizer.step()


# ---------------------------------------------------------------------- GEM's projection
def gem_project(g: Tensor, G: Tensor, margin: float = 0.5, eps: float = QP_EPS) -> Tensor:
    """GEM's projection of gradient g (P,) against past-task gradients G (K, P).

    Returns g itself when no <g, g_k> is negative; otherwise g~ = g + G^T v with v solving the
    dual QP (see the module docstring). Only the K x K Gram matrix and the K dot products go to
    the host. Under autocast (trainer.precision=bf16-mixed) the products stay in the gradients'
    precision: bf16 dot products would misjudge which constraints are violated.
    """
    with torch.autocast(g.device.type, enabled=False):
        dots = G @ g
        if not bool((dots < 0).any()):  # one host synchronisation per step, as in GEM
            return g
        # The Gram matrix in the gradients' precision (a (P, K) double copy of G would be as
        # large as G again); the QP itself in double precision on the host.
        gram = (G @ G.T).double().cpu().numpy()
    k = len(G)
    gram = 0.5 * (gram + gram.T) + eps * np.eye(k)
    # quadprog minimises 1/2 v^T P v - a^T v subject to C^T v >= b.
    a = -dots.double().cpu().numpy()
    v = quadprog.solve_qp(gram, a, np.eye(k), np.full(k, float(margin)))[0]
    with torch.autocast(g.device.type, enabled=False):
        return g + torch.from_numpy(v).to(G) @ G


class GEM(SGDMethod):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"

    def __init__(self, backbone, task_info, lr: float = 0.03, n_memories: int = 10,
                 memory_strength: float = 0.5, grad_clip_norm: float | None = 5.0, **kwargs):
        super().__init__(backbone, task_info, lr=lr, grad_clip_norm=grad_clip_norm, **kwargs)
        self.n_memories = n_memories
        self.memory_strength = memory_strength
        self.memory = RingBuffer(task_info.n_tasks, n_memories, task_info.input_shape)
        # vmap cannot write batch-norm running statistics: loop over past tasks then.
        self.vectorise = next(self.backbone.buffers(), None) is None
        self._past: list[int] = []  # past tasks with memories, for this incoming batch
        self._G: Tensor | None = None  # this glance's past-task gradients

    # ------------------------------------------------------------------ past-task gradients
    def _memory_loss(self, params, x, y, t, valid):
        """Mean masked loss over the valid slots of one task's memory (vmapped over tasks)."""
        logits = self.mask_logits(self.backbone(x, params=params), t)
        weights = valid.to(logits.dtype)
        losses = F.cross_entropy(logits, y, reduction="none")
        return (losses * weights).sum() / weights.sum().clamp_min(1.0)

    def memory_grads(self, tasks: list[int]) -> Tensor:
        """(len(tasks), P): the gradient of each task's memory loss, clipped row by row."""
        params = [p.detach() for p in self.backbone.parameters()]
        if self.vectorise:
            x, y, valid = self.memory.tasks(tasks)
            # One task id per slot: mask_logits indexes its class mask with a (B,) tensor.
            ids = torch.as_tensor(tasks, device=x.device)[:, None].expand_as(y)
            grad_fn = torch.func.vmap(torch.func.grad(self._memory_loss),
                                      in_dims=(None, 0, 0, 0, 0))
            grads = grad_fn(params, x, y, ids, valid)
            G = torch.cat([g.reshape(len(tasks), -1) for g in grads], dim=1)
        else:
            rows = []
            for u in tasks:
                x, y = self.memory.task(u)
                params = list(self.backbone.parameters())
                grads = torch.autograd.grad(self.loss(self.backbone(x), y, u), params)
                rows.append(torch.cat([g.reshape(-1) for g in grads]))
            G = torch.stack(rows)
        return clip_rows(G, self.grad_clip_norm)

    # ------------------------------------------------------------------ update
    def observe(self, x, y, t):
        # GEM streams one task at a time, so the whole batch belongs to the current task.
        self.memory.add(x, y, self._task)
        self._past = self.memory.stored_tasks(below=self._task)
        return super().observe(x, y, t)  # glances: G (glance_batch), g, project, step

    def glance_batch(self, x, y, t):
        self._G = self.memory_grads(self._past) if self._past else None  # 1.
        return x, y, t

    def step(self, optimizer):
        if self._G is None:  # nothing to protect yet: a plain clipped step
            return super().step(optimizer)
        projected_step(self, optimizer,
                       lambda g: gem_project(g, self._G, self.memory_strength))
