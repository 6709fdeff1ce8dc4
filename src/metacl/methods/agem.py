"""Averaged GEM (Chaudhry et al., 2019).

Memory: the same per-task episodic memory as GEM (`n_memories` slots per task, a ring buffer
holding each task's most recent samples, written once per incoming batch before its updates).

For each incoming batch, `glances` times:
  1. the reference gradient g_ref of the loss on `ref_batch_size` samples drawn uniformly from
     the memories of all tasks trained before the current one (each sample's logits masked to
     its own task's classes on class splits);
  2. the gradient g of the loss on the incoming batch;
  3. if <g, g_ref> < 0:  g <- g - (<g, g_ref> / <g_ref, g_ref>) g_ref   (otherwise g is kept);
  4. one SGD step with g.

With `grad_clip_norm` set, g and g_ref are each clipped to that norm before the projection (as
La-MAML clips the gradients it compares); the projected gradient is used as is.

Differences from La-MAML's `agem.py` (deliberate):
  * task 0's memory is a reference like every other past task's. La-MAML's copy starts its
    "current task" at 0 and only registers a task when the task id changes, so task 0 never
    enters its list of observed tasks: nothing is projected while task 1 trains, and task 0's
    memory is never protected afterwards.
  * g_ref is the gradient on a random memory batch, as in the A-GEM paper (whose code draws
    256 samples), instead of the mean of per-task memory gradients. With 10 memories per task
    and up to 25 past tasks the batch is the whole memory, so the two differ only in how the
    gradients are clipped.
  * La-MAML's script passes --memory_strength to A-GEM, but its projection never reads it;
    there is no such hyperparameter here.

The projection is written with tensor ops (no branch on the host), so a step never waits for
the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metacl.memory import RingBuffer
from metacl.methods.base import SGDMethod
from metacl.methods.gem import clip_rows, projected_step


def agem_project(g: Tensor, g_ref: Tensor) -> Tensor:
    """g if <g, g_ref> >= 0, else g minus its component along g_ref (in g's precision, also
    under bf16 autocast)."""
    with torch.autocast(g.device.type, enabled=False):
        dot = g @ g_ref
        coef = dot.clamp(max=0.0) / (g_ref @ g_ref).clamp_min(1e-12)
        return g - coef * g_ref


class AGEM(SGDMethod):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"

    def __init__(self, backbone, task_info, lr: float = 0.03, n_memories: int = 10,
                 ref_batch_size: int = 256, grad_clip_norm: float | None = 2.0, **kwargs):
        super().__init__(backbone, task_info, lr=lr, grad_clip_norm=grad_clip_norm, **kwargs)
        self.n_memories = n_memories
        self.ref_batch_size = ref_batch_size
        self.memory = RingBuffer(task_info.n_tasks, n_memories, task_info.input_shape)
        self._g_ref: Tensor | None = None  # this glance's reference gradient

    def reference_grad(self) -> Tensor | None:
        """Clipped gradient on a random batch of the past tasks' memories (None if empty)."""
        if not self.memory.stored_tasks(below=self._task):
            return None
        mx, my, mt = self.memory.sample(self.ref_batch_size, below=self._task)
        params = list(self.backbone.parameters())
        grads = torch.autograd.grad(self.loss(self.backbone(mx), my, mt), params)
        return clip_rows(torch.cat([g.reshape(-1) for g in grads]), self.grad_clip_norm)

    def observe(self, x, y, t):
        # Tasks are streamed one at a time, so the whole batch belongs to the current task.
        self.memory.add(x, y, self._task)
        return super().observe(x, y, t)  # glances: g_ref (glance_batch), g, project, step

    def glance_batch(self, x, y, t):
        self._g_ref = self.reference_grad()  # 1. before the incoming batch's gradient
        return x, y, t

    def step(self, optimizer):
        if self._g_ref is None:  # nothing to protect yet: a plain clipped step
            return super().step(optimizer)
        projected_step(self, optimizer, lambda g: agem_project(g, self._g_ref))
