"""La-MAML, C-MAML and Sync-La-MAML (Gupta, Yadav & Paull, NeurIPS 2020).

One class covers the three variants of the paper; they differ in two flags:

=================  ==========  ===========  ==============================================
variant            learn_lr    sync_update  outer weight step
=================  ==========  ===========  ==============================================
La-MAML            true        false        w <- w - relu(alpha_new) * grad_w   (async)
Sync-La-MAML       true        true         w <- w - opt_wt * grad_w            (SGD)
C-MAML             false       true         w <- w - opt_wt * grad_w, alpha stays fixed
=================  ==========  ===========  ==============================================

Algorithm (one incoming batch (x, y) of task tau; repeated `glances` times)::

    shuffle (x, y)
    (X_m, Y_m) <- replay_batch_size samples of the memory  +  (x, y)      # the meta-batch
    w_0 <- w
    for k = 1..K over chunks (x_k, y_k) of (x, y)                           # the inner loop
        g_k  <- grad of loss(f(x_k; w_{k-1}), y_k) restricted to tau's classes
                (detached unless second_order; clamped if inner_grad_clamp)
        w_k  <- w_{k-1} - lr(alpha) * g_k          lr = relu (inner_lr_relu) or identity
        L_k  <- loss(f(X_m; w_k), Y_m), each sample on its own task's classes
    L_meta <- mean_k L_k                                                    # look-ahead loss
    clip_grad_norm(d L_meta / d w), clip_grad_norm(d L_meta / d alpha)
    if learn_lr:    alpha <- alpha - opt_lr * d L_meta / d alpha
    if sync_update: w <- w - opt_wt * d L_meta / d w
    else:           w <- w - relu(alpha) * d L_meta / d w
    on the first glance of the first epoch: offer (x, y) to the reservoir memory

K is the incoming batch size (`inner_batches: null`, one sample per step, the reference's MNIST
code) or `inner_batches` chunks (its CIFAR code's `--cifar_batches`).

Two implementations of the same update (docs/methods/lamaml.md, "Speed"):

* `_glance_autograd`: the loop above, literally, with autograd through the inner loop
  (`create_graph` when second_order). Used for second order, and as the reference in tests.
* `_glance_first_order` (first order, `vectorize: true`): the inner gradients are constants, so
  w_k = w - lr(alpha) * S_k with S_k = g_1 + ... + g_k, and the exact meta-gradients only need
  G_k = dL_meta/dw_k (the 1/K of the mean included):  dL_meta/dw = sum_k G_k and
  dL_meta/dalpha = -sum_k G_k * S_k * lr'(alpha). The inner loop keeps no graph and writes S_k
  and w_k into preallocated (K+1, P) stacks of flat parameter vectors; the K meta-losses take
  ONE `torch.func.vmap`-ed forward/backward over the stack; the chain rule is a few flat tensor
  ops; the outer step updates flat working copies of w and alpha (written back to the
  parameters once per incoming batch). Each parameter is stored in the flat vectors in the
  memory order in which the vmapped backward produces its gradient (found once by a probe),
  so that no operation ever has to transpose a (K, P) stack.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import vmap

from metacl.errors import ConfigError
from metacl.memory import ReservoirBuffer
from metacl.methods.base import ContinualMethod
from metacl.methods.lamaml_compiled import CompiledGlance
from metacl.methods.lamaml_mlp import MLPGlance
from metacl.methods.lamaml_population import LaMAMLPopulation

# Dropout under vmap: each stacked fast-weight set draws its own masks, as the loop over them
# (vectorize=false) does; models without random operations are unaffected.
VMAP_RANDOMNESS = "different"
from metacl.models.backbones import MLP


# ---------------------------------------------------------------------------------- helpers
def _owner(cls: type, name: str) -> type:
    """The class in cls's MRO that defines attribute `name`."""
    return next(c for c in cls.__mro__ if name in vars(c))


def clip_by_total_norm_(tensors: list[Tensor], max_norm: float | None) -> None:
    """In-place `nn.utils.clip_grad_norm_` on a list of gradients (same eps), no host sync."""
    if not max_norm or not tensors:
        return
    if len(tensors) == 1:
        total = torch.linalg.vector_norm(tensors[0])
    else:
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))
    coef = (max_norm / (total + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(tensors, coef)


def inner_chunks(x: Tensor, y: Tensor, inner_batches: int | None) -> list[tuple[Tensor, Tensor]]:
    """Split the incoming batch into the inner loop's steps.

    None: one sample per step (La-MAML's MNIST code). n: the reference's CIFAR slicing, chunks
    of ceil(B / n) samples; chunks that would be empty (B not divisible) are dropped.
    """
    size = 1 if inner_batches is None else max(1, math.ceil(x.shape[0] / inner_batches))
    return list(zip(x.split(size), y.split(size)))


class FlatParams:
    """Maps parameter-shaped tensors onto one flat (P,) vector, each parameter in a chosen
    memory order (`orders[i]`: its dimensions from outermost to innermost in memory).
    """

    def __init__(self, params: list[Tensor], orders: list[tuple[int, ...]] | None = None):
        self.shapes = [tuple(p.shape) for p in params]
        self.orders = orders or [tuple(range(p.dim())) for p in params]
        self.stored = [tuple(s[d] for d in o) for s, o in zip(self.shapes, self.orders)]
        self.inverse = [tuple(sorted(range(len(o)), key=o.__getitem__)) for o in self.orders]
        self.numels = [p.numel() for p in params]
        self.size = sum(self.numels)

    def views(self, flat: Tensor) -> list[Tensor]:
        """Parameter-shaped views of a (P,) vector."""
        return [seg.view(st).permute(inv) for seg, st, inv
                in zip(flat.split(self.numels), self.stored, self.inverse)]

    def stacked(self, rows: Tensor) -> list[Tensor]:
        """Per-parameter (K, *shape) views of a (K, P) matrix."""
        k = rows.shape[0]
        return [seg.view(k, *st).permute(0, *(1 + d for d in inv)) for seg, st, inv
                in zip(rows.split(self.numels, dim=1), self.stored, self.inverse)]

    def stored_stacked(self, rows: Tensor) -> list[Tensor]:
        """Per-parameter (K, *stored shape) views of a (K, P) matrix (memory order)."""
        k = rows.shape[0]
        return [seg.view(k, *st) for seg, st in zip(rows.split(self.numels, dim=1), self.stored)]

    def to_stored(self, i: int, stack: Tensor) -> Tensor:
        """A (K, *shape) tensor of parameter i, permuted to the stored dimension order."""
        return stack.permute(0, *(1 + d for d in self.orders[i]))


class _Trajectory:
    """Preallocated buffers of the first-order fast path for K inner steps (flat, stored order).

    W: (K+1, P) fast weights, row 0 is the working copy of w; S: (K+1, P) running sums of the
    inner gradients (S[0] = 0); g: the current inner gradient; a: alpha; gw, ga: meta-gradients.
    Views are made once: parameter-shaped views of every row (those of W marked as autograd
    leaves, for the inner forward) and per-parameter (K, *shape) stacks of W[1:] (leaves for the
    vmapped meta-loss). Writing into the buffers under no_grad updates every view in place.
    """

    def __init__(self, flat: FlatParams, k: int, like: Tensor):
        opts = {"device": like.device, "dtype": like.dtype}
        self.flat, self.k = flat, k
        self.views = flat.views
        self.W = torch.zeros(k + 1, flat.size, **opts)
        self.S = torch.zeros(k + 1, flat.size, **opts)  # row 0 stays zero
        self.g = torch.zeros(flat.size, **opts)
        self.a = torch.zeros(flat.size, **opts)
        self.gw = torch.zeros(flat.size, **opts)
        self.ga = torch.zeros(flat.size, **opts)
        self.w = self.W[0]
        self.w_views, self.a_views = flat.views(self.w), flat.views(self.a)
        self.g_views, self.gw_views = flat.views(self.g), flat.views(self.gw)
        self.W_leaves = [[v.requires_grad_() for v in flat.views(row)] for row in self.W]
        self.all_leaves = [v.requires_grad_() for v in flat.stacked(self.W[1:])]
        self.S_all = flat.stored_stacked(self.S[1:])
        self.S_last = flat.stored_stacked(self.S[k:])
        self.gw_out = [v[0] for v in flat.stored_stacked(self.gw[None])]
        self.ga_out = [v[0] for v in flat.stored_stacked(self.ga[None])]


# ---------------------------------------------------------------------------------- method
class LaMAML(ContinualMethod):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"
    # observe() takes the meta-loss at every inner step (La-ER, which does not, turns this off):
    # then an MLP learner with single-sample, unclamped first-order inner steps gets the
    # hand-written glance of lamaml_mlp.py.
    hand_written_mlp = True
    # Population runs: members may differ in these (docs/sweeps.md); lamaml_population.py.
    population_keys = ("opt_lr", "opt_wt", "alpha_init")
    population_class = LaMAMLPopulation

    def __init__(
        self,
        backbone: nn.Module,
        task_info,
        batch_size: int = 10,
        n_epochs: int = 1,
        glances: int = 5,
        memories: int = 200,
        replay_batch_size: int = 10,
        alpha_init: float = 0.15,
        opt_lr: float = 0.3,
        opt_wt: float = 0.1,
        learn_lr: bool = True,
        sync_update: bool = False,
        inner_batches: int | None = None,
        second_order: bool = False,
        grad_clip_norm: float | None = 2.0,
        inner_grad_clamp: float | None = None,
        inner_lr_relu: bool = True,
        use_old_task_memory: bool = False,
        vectorize: bool = True,
        compile: bool = False,
    ):
        super().__init__(backbone, task_info, batch_size=batch_size, n_epochs=n_epochs,
                         glances=glances)
        if inner_batches is not None and inner_batches < 1:
            raise ConfigError(f"inner_batches={inner_batches}: use null (one sample per inner "
                              "step) or a positive number of chunks")
        self.memories = memories
        self.replay_batch_size = int(replay_batch_size)
        self.alpha_init = alpha_init
        self.opt_lr = opt_lr
        self.opt_wt = opt_wt
        self.learn_lr = learn_lr
        self.sync_update = sync_update
        self.inner_batches = inner_batches
        self.second_order = second_order
        self.grad_clip_norm = grad_clip_norm
        self.inner_grad_clamp = inner_grad_clamp
        self.inner_lr_relu = inner_lr_relu
        self.use_old_task_memory = use_old_task_memory
        self.vectorize = vectorize
        self.compile = bool(compile)
        # A class with its own observe must also write its glance as a pure function.
        if self.compile and not issubclass(_owner(type(self), "functional_glance"),
                                           _owner(type(self), "observe")):
            raise ConfigError(f"method.compile=true: {type(self).__name__} has its own update "
                              "but no functional_glance to compile; allowed: compile=true with "
                              "method=lamaml, cmaml, sync_lamaml or la_er")
        if self.compile and type(self).loss is not ContinualMethod.loss:
            raise ConfigError(f"method.compile=true: {type(self).__name__} changes the loss; "
                              "the compiled glance computes the plain masked cross-entropy")

        # One learnable step size per weight, same shapes as the weights (in state_dict).
        self.alpha = nn.ParameterList(
            nn.Parameter(torch.full_like(p, alpha_init), requires_grad=learn_lr)
            for p in backbone.parameters()
        )
        self.memory = ReservoirBuffer(memories, task_info.input_shape)
        # use_old_task_memory: replay only from a snapshot of the memory taken when the task
        # started (the reference's CIFAR code; see docs for why its MNIST code never does).
        self.old_memory = (ReservoirBuffer(memories, task_info.input_shape)
                           if use_old_task_memory else None)
        self.optimizer = torch.optim.SGD(self.backbone.parameters(), lr=opt_wt)
        self._flat: FlatParams | None = None  # fast path: parameter layout in flat vectors
        self._workspace_cache: dict = {}  # fast path: preallocated _Trajectory buffers
        self._ws: _Trajectory | None = None  # the workspace of the update in progress
        self._compiled = CompiledGlance(self) if self.compile else None  # lamaml_compiled.py

    @classmethod
    def precisions_for(cls, method_cfg) -> tuple[tuple[str, ...], str]:
        # The compiled program honours autocast (the hand-written MLP glance does not), and
        # was checked against the eager paths in float32 only.
        if method_cfg.get("compile"):
            return ("32-true",), "method.compile=true"
        return super().precisions_for(method_cfg)

    def population_blocker(self) -> str | None:
        if self.compile:
            return "method.compile=true (a single run's compiled program)"
        return super().population_blocker()

    # ------------------------------------------------------------------ Lightning plumbing
    def configure_optimizers(self):
        # Lightning wants an optimizer; the updates themselves are applied in `outer_step`.
        return self.optimizer

    def before_task(self, t: int, datamodule) -> None:
        super().before_task(t, datamodule)
        if self.old_memory is not None and t > 0:
            self.old_memory.load_state_dict(self.memory.state_dict())

    def _first_epoch(self) -> bool:
        trainer = self._trainer
        return trainer is None or trainer.current_epoch == 0

    @property
    def fast_path(self) -> bool:
        return self.vectorize and not self.second_order and not self.compile

    @property
    def mlp_path(self) -> bool:
        return (self.fast_path and self.hand_written_mlp and isinstance(self.backbone, MLP)
                and self.backbone.plain
                and self.inner_batches is None and self.inner_grad_clamp is None
                and type(self).loss is ContinualMethod.loss)

    # ------------------------------------------------------------------ the algorithm box
    def replay_source(self) -> ReservoirBuffer:
        if self.old_memory is not None and self._task > 0:
            return self.old_memory
        return self.memory

    def meta_batch(self, x: Tensor, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Replayed samples followed by the incoming batch."""
        source = self.replay_source()
        if len(source) == 0 or self.replay_batch_size == 0:
            return x, y, t
        mx, my, mt = source.sample(self.replay_batch_size)
        return torch.cat([mx, x]), torch.cat([my, y]), torch.cat([mt, t])

    def observe(self, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        push = self._first_epoch()
        weights, alphas = self.begin_update(x, y)
        for glance in range(self.glances):
            perm = torch.randperm(x.shape[0], device=x.device)
            x, y, t = x.index_select(0, perm), y.index_select(0, perm), t.index_select(0, perm)
            bx, by, bt = self.meta_batch(x, y, t)
            meta_loss = self.glance_step(weights, alphas, x, y, bx, by, bt)
            if glance == 0 and push:
                self.memory.add(x, y, t)
        self.end_update()
        return meta_loss

    def glance_step(self, weights, alphas, x, y, bx, by, bt) -> Tensor:
        """The meta-gradients of one glance, then the outer step; returns L_meta."""
        if self._compiled is not None:  # functional_glance + outer step, one program
            return self._compiled(weights, alphas, x, y, bx, by, bt)
        meta_loss, grad_w, grad_a = self.glance_gradients(
            x, y, bx, by, bt, need_alpha=self.learn_lr, incoming_in_meta=True)
        self.outer_step(weights, alphas, grad_w, grad_a)
        return meta_loss

    def steady_shapes(self) -> tuple[int, int]:
        """(incoming, meta-batch) rows once the memory is full: the shapes compiled programs
        (method.compile) are built for; other shapes run the same function eagerly."""
        return self.batch_size, self.batch_size + min(self.replay_batch_size, self.memories)

    def functional_glance(self, forward, w, a, x, y, bx, by, bt, class_mask, task):
        """glance_step's (loss, dL/dw, dL/dalpha) as a pure function of tensors, for
        method.compile (lamaml_compiled.py). A subclass with its own update overrides both."""
        from metacl.methods import lamaml_func  # imports this module

        return lamaml_func.glance(
            forward, w, a, x, y, bx, by, bt, class_mask, task,
            inner_batches=self.inner_batches, second_order=self.second_order,
            inner_grad_clamp=self.inner_grad_clamp, inner_lr_relu=self.inner_lr_relu,
            need_alpha=self.learn_lr, meta_every_step=True, stack_steps=self.vectorize)

    @torch.no_grad()
    def outer_step(self, weights, alphas, grad_w, grad_a) -> None:
        """Clip both gradients, step alpha (learn_lr), then the weights (sync or async)."""
        clip_by_total_norm_(grad_w, self.grad_clip_norm)
        if self.learn_lr and grad_a is not None:
            clip_by_total_norm_(grad_a, self.grad_clip_norm)
            torch._foreach_add_(alphas, grad_a, alpha=-self.opt_lr)
        if self.sync_update:
            torch._foreach_add_(weights, grad_w, alpha=-self.opt_wt)
        else:
            steps = torch._foreach_clamp_min(alphas, 0.0)  # relu(alpha_new)
            torch._foreach_addcmul_(weights, grad_w, steps, value=-1.0)

    # ------------------------------------------------------------------ working copies
    def begin_update(self, x: Tensor, y: Tensor, meta_every_step: bool = True
                     ) -> tuple[list[Tensor], list[Tensor]]:
        """The tensors the glances update: the parameters, or (fast path) flat copies of them."""
        if not self.fast_path:
            self._ws = None
            return list(self.backbone.parameters()), list(self.alpha)
        k = len(inner_chunks(x, y, self.inner_batches))
        mlp = self.mlp_path and meta_every_step
        ws = self._mlp_workspace(k) if mlp else self._workspace(k)
        with torch.no_grad():
            torch._foreach_copy_(ws.w_views, list(self.backbone.parameters()))
            torch._foreach_copy_(ws.a_views, list(self.alpha))
        self._ws = ws
        if mlp:  # a population of one: this run is member 0
            return [ws.w[0]], [ws.a[0]]
        return [ws.w], [ws.a]

    def end_update(self) -> None:
        if self._ws is not None:
            with torch.no_grad():
                torch._foreach_copy_(list(self.backbone.parameters()), self._ws.w_views)
                torch._foreach_copy_(list(self.alpha), self._ws.a_views)
            self._ws = None

    def glance_gradients(self, x, y, bx, by, bt, need_w=True, need_alpha=True,
                         meta_every_step=True, incoming_in_meta=False):
        """(L_meta detached, dL/dw, dL/dalpha) for one glance, in the form begin_update chose:
        per-parameter lists, or one-element lists of flat vectors (fast path)."""
        if isinstance(self._ws, MLPGlance):
            if not meta_every_step:
                raise RuntimeError("the hand-written MLP glance takes the meta-loss at every "
                                   "inner step; set hand_written_mlp = False in this subclass")
            # Explicit float32 BLAS calls into preallocated buffers: autocast (bf16-mixed)
            # does not apply to them.
            with torch.autocast(x.device.type, enabled=False):
                return self._glance_mlp(self._ws, x, y, bx, by, bt, need_w, need_alpha,
                                        incoming_in_meta)
        if self._ws is not None:
            return self._glance_first_order(self._ws, x, y, bx, by, bt, need_w, need_alpha,
                                            meta_every_step)
        return self._glance_autograd(x, y, bx, by, bt, need_w, need_alpha, meta_every_step)

    def loss_gradient(self, bx: Tensor, by: Tensor, bt: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(loss, its gradient) of the plain loss at the current weights, in the form
        begin_update chose (La-ER's weight gradient)."""
        ws = self._ws
        weights = list(self.backbone.parameters()) if ws is None else ws.W_leaves[0]
        with torch.enable_grad():
            loss = self.loss(self.backbone(bx, weights), by, bt)
            grads = list(torch.autograd.grad(loss, weights))
        if ws is None:
            return loss.detach(), grads
        with torch.no_grad():
            torch._foreach_copy_(ws.gw_views, grads)
        return loss.detach(), [ws.gw]

    def meta_gradients(self, x, y, bx, by, bt, need_w=True, need_alpha=True,
                       meta_every_step=True):
        """One glance's meta-gradients as per-parameter lists, whichever path is configured."""
        self.begin_update(x, y, meta_every_step)
        try:
            loss, gw, ga = self.glance_gradients(x, y, bx, by, bt, need_w, need_alpha,
                                                 meta_every_step)
            if self._ws is not None:
                views = self._ws.views
                gw = [v.clone() for v in views(gw[0])] if need_w else None
                ga = [v.clone() for v in views(ga[0])] if need_alpha else None
        finally:
            self._ws = None  # nothing was updated: no write-back
        return loss, gw, ga

    # ------------------------------------------------------------------ the literal version
    def _glance_autograd(self, x, y, bx, by, bt, need_w, need_alpha, meta_every_step):
        weights = list(self.backbone.parameters())
        alpha = list(self.alpha)
        with torch.enable_grad():
            lr = [a if need_alpha else a.detach() for a in alpha]
            lr = [a.relu() for a in lr] if self.inner_lr_relu else lr
            fast, trajectory = weights, []
            for xk, yk in inner_chunks(x, y, self.inner_batches):
                inner = self.loss(self.backbone(xk, fast), yk, self._task)
                grads = torch.autograd.grad(inner, fast, create_graph=self.second_order)
                if self.inner_grad_clamp is not None:
                    c = self.inner_grad_clamp
                    grads = [g.clamp(-c, c) for g in grads]
                fast = [f - step * g for f, step, g in zip(fast, lr, grads)]
                trajectory.append(fast)
            if not meta_every_step:
                trajectory = trajectory[-1:]
            meta_loss = self._meta_loss(bx, by, bt, trajectory)
            inputs = (weights if need_w else []) + (alpha if need_alpha else [])
            grads = torch.autograd.grad(meta_loss, inputs)
        n = len(weights) if need_w else 0
        return (meta_loss.detach(), list(grads[:n]) if need_w else None,
                list(grads[n:]) if need_alpha else None)

    def _meta_loss(self, bx, by, bt, trajectory: list[list[Tensor]]) -> Tensor:
        """Mean over the fast-weight sets of the meta-batch loss."""
        if len(trajectory) == 1 or not self.vectorize:
            losses = [self.loss(self.backbone(bx, fast), by, bt) for fast in trajectory]
            return torch.stack(losses).mean()
        stacked = [torch.stack(ps) for ps in zip(*trajectory)]
        logits = vmap(lambda ps: self.backbone(bx, ps), randomness=VMAP_RANDOMNESS)(stacked)
        k = len(trajectory)
        return self.loss(logits.flatten(0, 1), by.repeat(k), bt.repeat(k))

    # ------------------------------------------------------------------ the fast version
    def _workspace(self, k: int) -> _Trajectory:
        like = next(self.backbone.parameters())
        key = (k, like.device, like.dtype)
        if key not in self._workspace_cache:
            if self._flat is None or self._workspace_cache.get("device") != like.device:
                self._flat = self._probe_layout()
                self._workspace_cache = {"device": like.device}
            self._workspace_cache[key] = _Trajectory(self._flat, k, like)
        return self._workspace_cache[key]

    def _mlp_workspace(self, k: int) -> MLPGlance:
        like = next(self.backbone.parameters())
        key = ("mlp", k, like.device, like.dtype)
        if key not in self._workspace_cache:
            self._workspace_cache[key] = MLPGlance(self.backbone, k, like)
        return self._workspace_cache[key]

    @torch.no_grad()
    def _glance_mlp(self, ws: MLPGlance, x, y, bx, by, bt, need_w, need_alpha,
                    incoming_in_meta):
        mask_inner = mask_meta = None
        if self.task_info.multi_head:  # additive masks: 0 on the task's classes, MASK_VALUE off
            mask_inner = self.mask_logits(bx.new_zeros(1, self.task_info.n_outputs), self._task)
            mask_meta = self.mask_logits(bx.new_zeros(bx.shape[0], self.task_info.n_outputs), bt)
            mask_meta = mask_meta.unsqueeze(0)
        # a population of one member (inputs and results with a leading member dimension)
        loss = ws.glance(x.unsqueeze(0), y.unsqueeze(0), bx.unsqueeze(0), by.unsqueeze(0),
                         mask_inner, mask_meta, need_w, need_alpha, self.inner_lr_relu,
                         incoming_in_meta)
        return loss[0], [ws.gw[0]] if need_w else None, [ws.ga[0]] if need_alpha else None

    def _probe_layout(self) -> FlatParams:
        """Store each parameter in the memory order of its vmapped meta-gradient.

        One throw-away vmapped forward/backward over two copies of the weights shows the
        strides autograd gives G (for a linear layer, the transpose of the weight's layout).
        """
        params = [p.detach() for p in self.backbone.parameters()]
        stacked = [p.expand(2, *p.shape).clone().requires_grad_() for p in params]
        x = torch.ones(2, *self.task_info.input_shape, device=params[0].device,
                       dtype=params[0].dtype)
        training = self.backbone.training
        self.backbone.eval()  # dropout off: the probe draws no random numbers
        try:
            with torch.enable_grad():
                out = vmap(lambda ps: self.backbone(x, ps), randomness=VMAP_RANDOMNESS)(stacked)
                grads = torch.autograd.grad(out.square().sum(), stacked)
        except RuntimeError as err:
            self.backbone.train(training)
            raise ConfigError(
                f"method.vectorize=true evaluates {type(self.backbone).__name__} under "
                f"torch.func.vmap, which failed ({err}); set method.vectorize=false (e.g. "
                "ResNet18 with batch-norm running statistics)") from err
        self.backbone.train(training)
        orders = [tuple(sorted(range(p.dim()), key=lambda d, g=g: -g.stride(d + 1)))
                  for p, g in zip(params, grads)]
        return FlatParams(params, orders)

    def _glance_first_order(self, ws: _Trajectory, x, y, bx, by, bt, need_w, need_alpha,
                            meta_every_step):
        flat, W, S, g = ws.flat, ws.W, ws.S, ws.g
        lr = ws.a.clamp_min(0.0) if self.inner_lr_relu else ws.a

        # Inner loop: K sequential SGD steps from w on the incoming chunks, no graph kept.
        clamp = self.inner_grad_clamp
        chunks = inner_chunks(x, y, self.inner_batches)
        for k, (xk, yk) in enumerate(chunks, start=1):
            leaves = ws.W_leaves[k - 1]  # views of W[k-1] that autograd treats as leaves
            with torch.enable_grad():
                inner = self.loss(self.backbone(xk, leaves), yk, self._task)
                grads = torch.autograd.grad(inner, leaves)
            with torch.no_grad():
                torch._foreach_copy_(ws.g_views, grads)
                if clamp is not None:
                    g.clamp_(-clamp, clamp)
                torch.add(S[k - 1], g, out=S[k])  # S_k = S_{k-1} + g_k
                torch.addcmul(ws.w, lr, S[k], value=-1.0, out=W[k])  # w_k = w - lr * S_k

        # Meta-loss at every fast weight set at once: one vmapped forward/backward.
        with torch.enable_grad():
            if meta_every_step and ws.k > 1:
                stacked = ws.all_leaves
                logits = vmap(lambda ps: self.backbone(bx, ps),
                              randomness=VMAP_RANDOMNESS)(stacked)
                meta_loss = self.loss(logits.flatten(0, 1), by.repeat(ws.k), bt.repeat(ws.k))
                G = torch.autograd.grad(meta_loss, stacked)  # G[i][k] = dL/d(w_k)_i
            else:  # a single fast weight set (La-ER, or K = 1): no vmap needed
                leaves = ws.W_leaves[ws.k]
                meta_loss = self.loss(self.backbone(bx, leaves), by, bt)
                G = [gi.unsqueeze(0) for gi in torch.autograd.grad(meta_loss, leaves)]

        # Chain rule through w_k = w - lr(alpha) * S_k, S_k = g_1 + ... + g_k.
        with torch.no_grad():
            G = [flat.to_stored(i, gi) for i, gi in enumerate(G)]  # memory order: no transposes
            if need_w:
                for gi, out in zip(G, ws.gw_out):
                    torch.sum(gi, 0, out=out)
            if need_alpha:
                for gi, si, out in zip(G, ws.S_all if meta_every_step else ws.S_last, ws.ga_out):
                    torch.sum(gi.mul_(si), 0, out=out)
                ws.ga.neg_()
                if self.inner_lr_relu:
                    ws.ga.mul_(ws.a > 0)
        return (meta_loss.detach(), [ws.gw] if need_w else None,
                [ws.ga] if need_alpha else None)
