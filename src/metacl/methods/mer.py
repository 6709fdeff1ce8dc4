"""Meta-Experience Replay (Riemer et al., 2019), Algorithm 1 ("MER with reservoir sampling").

The stream is processed one sample at a time, whatever `batch_size` the loader uses. For each
incoming sample (x, y):

    theta_0 <- theta
    for i in 1..batches_per_example:
        B_i <- (x, y) followed by `replay_batch_size` distinct samples drawn from the memory
        theta_A <- theta
        for each sample of B_i in turn:              # plain SGD, batch of one, step size lr
            theta <- theta - lr * clip(grad loss(sample; theta), grad_clip_norm)
        theta <- theta_A + beta * (theta - theta_A)  # within-batch Reptile
    theta <- theta_0 + gamma * (theta - theta_0)     # across-batch Reptile
    offer (x, y) to the reservoir memory

Each sample's loss is masked to its own task's classes on class splits. The memory is a
reservoir of `memories` samples shared by all tasks (metacl.memory.ReservoirBuffer), updated
after every sample as in Algorithm 1, so a sample can be replayed by the next one of its batch.

Speed: the ~55 single-sample steps per incoming sample dominate. With an MLP learner (MER's
and La-MAML's MNIST runs) `observe` runs them on a flat working copy of the weights with a
hand-written backward (metacl.models.mlp_grad), no autograd and no optimizer; the update is
the same (tests compare both paths). Other backbones take the autograd path.

`compile: true` (for GPUs): one single-sample step (forward, gradient, clip, SGD update) is a
pure function of the weights, compiled once (metacl.methods.compiled: on CUDA a CUDA graph
replayed for each of the steps) and used for every backbone; the replay draws, the Reptile
interpolations and the memory stay eager. tests/test_mer_compiled.py checks it against both
eager paths.

Reference details kept: the incoming sample is the first of every batch; each single-sample
SGD step is clipped to `grad_clip_norm` (La-MAML's copy; MER's own code does not clip). One
difference: MER's code reshuffles the memory before each draw, so a batch can repeat a
memory; here the samples of one batch are distinct. `glances` is not used (the number of
updates per sample is set by batches_per_example and replay_batch_size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad_and_value

from metacl.errors import ConfigError
from metacl.memory import ReservoirBuffer
from metacl.methods.base import ContinualMethod, SGDMethod
from metacl.methods.compiled import CompiledProgram, clip_total_norm
from metacl.methods.population import masked_loss
from metacl.models.backbones import MLP
from metacl.models.mlp_grad import MLPGrad


class MER(SGDMethod):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"

    def __init__(self, backbone, task_info, lr: float = 0.1, memories: int = 200,
                 replay_batch_size: int = 10, batches_per_example: int = 5, beta: float = 0.01,
                 gamma: float = 1.0, grad_clip_norm: float | None = 10.0,
                 compile: bool = False, **kwargs):
        super().__init__(backbone, task_info, lr=lr, grad_clip_norm=grad_clip_norm, **kwargs)
        self.replay_batch_size = int(replay_batch_size)
        self.batches_per_example = int(batches_per_example)
        self.beta = beta
        self.gamma = gamma
        self.memory = ReservoirBuffer(memories, task_info.input_shape)
        self.compile = bool(compile)
        if self.compile and (type(self).loss is not ContinualMethod.loss
                             or type(self).observe is not MER.observe):
            raise ConfigError(f"method.compile=true: {type(self).__name__} changes MER's loss "
                              "or update; the compiled step is MER's plain masked "
                              "cross-entropy SGD step")
        self._compiled = CompiledProgram(self.functional_step) if self.compile else None

    @classmethod
    def precisions_for(cls, method_cfg) -> tuple[tuple[str, ...], str]:
        # The compiled step honours autocast and was checked in float32 only.
        if method_cfg.get("compile"):
            return ("32-true",), "method.compile=true"
        return super().precisions_for(method_cfg)

    def functional_step(self, w, x, y, t):
        """One single-sample step as a pure function: (loss, w - lr * clip(grad))."""
        class_mask = self.class_mask if self.task_info.multi_head else None

        def loss(w_):
            return masked_loss(self.backbone(x, w_), y, class_mask, t)

        g, value = grad_and_value(loss)(w)
        g = clip_total_norm(g, self.grad_clip_norm)
        return value, tuple(wi - self.lr * gi for wi, gi in zip(w, g))

    @staticmethod
    @torch.no_grad()
    def reptile(params: list[torch.Tensor], start: list[torch.Tensor], weight: float) -> None:
        """theta <- start + weight * (theta - start), in place on params."""
        torch._foreach_lerp_(start, params, weight)
        torch._foreach_copy_(params, start)

    def observe(self, x, y, t):
        if self._compiled is not None:
            return self._observe_compiled(x, y, t)
        if (isinstance(self.backbone, MLP) and self.backbone.plain
                and type(self).loss is ContinualMethod.loss):
            # Explicit float32 BLAS calls into preallocated buffers: autocast (bf16-mixed)
            # does not apply to them.
            with torch.autocast(x.device.type, enabled=False):
                return self._observe_mlp(x, y, t)
        return self._observe_autograd(x, y, t)

    @torch.no_grad()
    def _observe_mlp(self, x, y, t):
        """Algorithm 1 on a flat copy w of the weights, gradients by metacl.models.mlp_grad."""
        params = list(self.backbone.parameters())
        if getattr(self, "_mlp_grad", None) is None or self._mlp_grad.g.device != x.device:
            self._mlp_grad = MLPGrad(self.backbone, params[0])
        step = self._mlp_grad
        w = torch.cat([p.detach().reshape(-1) for p in params])
        w_views = [seg.view_as(p) for seg, p in zip(w.split([p.numel() for p in params]),
                                                     params)]
        n_out, multi_head = self.task_info.n_outputs, self.task_info.multi_head
        total = torch.zeros((), device=x.device)
        n_steps = 0
        for i in range(x.shape[0]):
            xi, yi, ti = x[i:i + 1], y[i:i + 1], t[i:i + 1]
            theta_0 = w.clone()
            for _ in range(self.batches_per_example):
                mx, my, mt = self.memory.sample(self.replay_batch_size)
                bx, by, bt = torch.cat([xi, mx]), torch.cat([yi, my]), torch.cat([ti, mt])
                rows = bx.reshape(len(by), -1).split(1)
                targets = F.one_hot(by, n_out).to(w.dtype).split(1)
                masks = ((self.mask_logits(w.new_zeros(len(by), n_out), bt).split(1))
                         if multi_head else [None] * len(by))
                theta_a = w.clone()
                for xj, oj, mj in zip(rows, targets, masks):
                    total += step.grad(w_views, xj, oj, mj)
                    if self.grad_clip_norm:  # clip_grad_norm_, then SGD(lr)
                        norm = torch.linalg.vector_norm(step.g)
                        coef = (self.grad_clip_norm / (norm + 1e-6)).clamp_(max=1.0)
                        w.addcmul_(step.g, coef, value=-self.lr)
                    else:
                        w.add_(step.g, alpha=-self.lr)
                    n_steps += 1
                w.copy_(theta_a.lerp_(w, self.beta))  # within-batch Reptile
            w.copy_(theta_0.lerp_(w, self.gamma))  # across-batch Reptile
            self.memory.add(xi, yi, ti)
        torch._foreach_copy_(params, w_views)
        return total / max(n_steps, 1)

    def _observe_compiled(self, x, y, t):
        """Algorithm 1 with each single-sample step one compiled program."""
        w = [p.detach() for p in self.backbone.parameters()]

        @torch.no_grad()
        def step(bx, by, bt):
            loss, new_w = self._compiled.run(True, x.device, tuple(w), bx, by, bt)
            torch._foreach_copy_(w, list(new_w))  # out of the program's buffers
            return loss.clone()

        return self._algorithm_1(x, y, t, w, step)

    def _observe_autograd(self, x, y, t):
        opt = self.optimizers()

        def step(bx, by, bt):
            opt.zero_grad()
            loss = self.loss(self.backbone(bx), by, bt)
            self.manual_backward(loss)
            self.step(opt)  # clipped SGD step with step size lr
            return loss.detach()

        return self._algorithm_1(x, y, t, list(self.backbone.parameters()), step)

    def _algorithm_1(self, x, y, t, params, step):
        """Algorithm 1's loops around `step(x_j, y_j, t_j)`, one single-sample update of
        `params` in place returning its loss; the Reptile interpolations act on `params`."""
        total = torch.zeros((), device=x.device)
        n_steps = 0
        for i in range(x.shape[0]):
            xi, yi, ti = x[i:i + 1], y[i:i + 1], t[i:i + 1]
            theta_0 = [p.detach().clone() for p in params]
            for _ in range(self.batches_per_example):
                mx, my, mt = self.memory.sample(self.replay_batch_size)
                bx, by, bt = torch.cat([xi, mx]), torch.cat([yi, my]), torch.cat([ti, mt])
                theta_a = [p.detach().clone() for p in params]
                for j in range(len(by)):
                    total += step(bx[j:j + 1], by[j:j + 1], bt[j:j + 1])
                    n_steps += 1
                self.reptile(params, theta_a, self.beta)
            self.reptile(params, theta_0, self.gamma)
            self.memory.add(xi, yi, ti)
        return total / max(n_steps, 1)
