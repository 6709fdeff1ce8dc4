"""La-MAML's glance and outer step as one compiled program (`method.compile: true`).

On a GPU one glance of the CIFAR setting is thousands of small kernel launches (inner steps,
second-order backward, K meta-losses, clipping, two updates) around ~20 GFLOP of arithmetic:
launch-bound. Here the whole glance is one pure function of tensors,

    step(w, alpha, x, y, bx, by, bt, task) -> (L_meta, w_new, alpha_new)

(the method's `functional_glance`: for La-MAML `lamaml_func.glance`, the functional form of
the literal loop that population runs vmap; La-ER adds its replay-loss gradient; followed by
`outer_step` below), given to `torch.compile(fullgraph=True, dynamic=False)` by
`metacl.methods.compiled.CompiledProgram` (which MER and Meta-BGD use too):
Inductor fuses the elementwise work into few kernels, and on CUDA the "reduce-overhead" mode
records the program as a CUDA graph and replays it once per glance. The step reads no value
back to the host. What stays outside the program, eagerly, in the method's observe: the shuffle, the
replay draw (both on the device, from the run's random stream, so the draws are a separate
eager run's) and the reservoir insertion.

Static shapes: the program is compiled for the steady-state shapes, a full incoming batch
(`batch_size`) and a full meta-batch (`replay_batch_size` + `batch_size`). The other shapes (a
task's last, shorter batch; the first batches while the memory holds fewer than
`replay_batch_size` samples) run the same function uncompiled: no recompilation, and the
maths is the same (tests/test_lamaml_compiled.py checks compiled against eager, and both
against the method's other paths).

Dropout: a compiled program draws its own dropout masks (Inductor's random streams), so a
backbone with dropout trains correctly but not with an eager run's masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from metacl.methods.compiled import CompiledProgram, clip_total_norm

__all__ = ["CompiledGlance", "clip_total_norm", "outer_step"]


def outer_step(w: Sequence[Tensor], a: Sequence[Tensor], gw: Sequence[Tensor],
               ga: Sequence[Tensor], *, opt_lr: float, opt_wt: float,
               grad_clip_norm: float | None, learn_lr: bool, sync_update: bool
               ) -> tuple[list[Tensor], list[Tensor]]:
    """`LaMAML.outer_step`, out of place: clip both gradients, alpha <- alpha - opt_lr *
    grad_alpha (learn_lr), then w <- w - relu(alpha_new) * grad_w (or opt_wt * grad_w)."""
    gw = clip_total_norm(gw, grad_clip_norm)
    a = list(a)
    if learn_lr and ga:
        a = [ai - opt_lr * gi for ai, gi in zip(a, clip_total_norm(ga, grad_clip_norm))]
    if sync_update:
        w = [wi - opt_wt * gi for wi, gi in zip(w, gw)]
    else:
        w = [wi - ai.clamp_min(0.0) * gi for wi, ai, gi in zip(w, a, gw)]
    return w, a


class CompiledGlance(CompiledProgram):
    """One La-MAML method's compiled glance + outer step (see the module docstring).

    `__call__(weights, alphas, x, y, bx, by, bt)` updates `weights` and `alphas` (lists of
    tensors, written in place) and returns the glance's meta-loss.
    """

    def __init__(self, method, mode: str | None = None):
        m = self.method = method
        forward = m.backbone
        class_mask = m.class_mask if m.task_info.multi_head else None
        gradients = m.functional_glance  # La-MAML's, or a subclass's own (La-ER)
        outer_options = {"opt_lr": m.opt_lr, "opt_wt": m.opt_wt,
                         "grad_clip_norm": m.grad_clip_norm, "learn_lr": m.learn_lr,
                         "sync_update": m.sync_update}

        def step(w, a, x, y, bx, by, bt, task):
            loss, gw, ga = gradients(forward, w, a, x, y, bx, by, bt, class_mask, task)
            new_w, new_a = outer_step(w, a, gw, ga, **outer_options)
            return loss, new_w, new_a

        super().__init__(step, mode)

    def __call__(self, weights: list[Tensor], alphas: list[Tensor], x: Tensor, y: Tensor,
                 bx: Tensor, by: Tensor, bt: Tensor) -> Tensor:
        task = self.method.task_counter  # a 0-d tensor: a new task is data, not a recompile
        w, a = tuple(p.detach() for p in weights), tuple(p.detach() for p in alphas)
        steady = (x.shape[0], bx.shape[0]) == self.method.steady_shapes()
        loss, new_w, new_a = self.run(steady, x.device, w, a, x, y, bx, by, bt, task)
        with torch.no_grad():  # out of the program's buffers (a CUDA graph reuses them)
            torch._foreach_copy_(list(w), list(new_w))
            torch._foreach_copy_(list(a), list(new_a))
            return loss.detach().clone()
