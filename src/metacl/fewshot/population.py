"""Few-shot meta-learners trained together as one program (hydra/launcher=population).

The members are separate runs of one MetaLearner that differ only in their seed (its
initialisation and its meta-training episodes). ``MetaPopulation`` follows the contract of
metacl.methods.population::

    pop = MetaPopulation(members)                  # stacked weights and Adam state
    losses = pop.observe(batches, randoms, epoch)  # one meta-batch of episodes per member; (N,)
    pop.write_back()                               # weights and optimizer state -> each member

One meta-update of the population is the members' ``training_step``s, with the heavy parts
done once for all members:

* the meta-gradient: when the method vmaps over the tasks of a meta-batch (``use_vmap``: on a
  GPU, or an MLP on the CPU), ``torch.func.vmap`` over the members around that per-task vmap,
  backpropagated once for all of them (the loss is the sum of the members' meta-losses, so
  member i's rows of the gradient are its own). Otherwise (convolutional networks on the CPU,
  where the method itself loops over tasks because vmap's grouped convolutions are slower)
  each member's own ``meta_step`` runs in turn, under its own random state: the same
  operations as its separate run, so its gradient is bit-identical.
* the update: one torch Adam over the stacked (N, ...) tensors. Adam is elementwise, so with
  the members' shared learning rate and step count it is every member's own Adam; clipping
  the meta-gradient by value (``meta_grad_clip``) is elementwise too, hence per member. The
  learning-rate schedule is each member's own StepLR, stepped after every update as in its
  run; the stacked Adam takes its rate from member 0's (all members share the schedule).
* ``write_back`` copies row i into member i's parameters and its Adam state (``exp_avg``,
  ``exp_avg_sq``, ``step``), so its checkpoints and a resumed run are its separate run's.

A parameter without a gradient (ProtoNet's unused linear head) gets none here either, so Adam
leaves it and keeps no state for it, as in a separate run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import vmap

from metacl.checkpoint import optimizers_of
from metacl.data.episodic import Episodes
from metacl.methods.population import has_random_layers, stack, write_back

# Optimizers whose update is elementwise (one instance over stacked members is per-member).
ELEMENTWISE = (torch.optim.Adam, torch.optim.AdamW)
SHARED_STATE = ("step",)  # optimizer state entries that are one value for all elements


def blocker(method) -> str | None:
    """Why this built meta-learner cannot train in a population (None: it can)."""
    from metacl.fewshot.base import MetaLearner

    cls = type(method)
    name = cls.__name__
    if cls.population_class is None:
        return f"{name} has no population implementation"
    if cls.training_step is not MetaLearner.training_step:
        return f"{name} has its own training_step"
    if cls.configure_optimizers is not MetaLearner.configure_optimizers:
        return f"{name} has its own optimizers"
    if vmapped(method) and has_random_layers(method.backbone):
        return "its backbone has dropout or batch-norm running statistics (vmapped members)"
    return None


def vmapped(method) -> bool:
    """Members' meta-gradients in one vmap: where the method vmaps over tasks itself and its
    meta_step is the base one (the mean of task_loss over the meta-batch)."""
    from metacl.fewshot.base import MetaLearner

    return method.use_vmap and type(method).meta_step is MetaLearner.meta_step


def split_optimizers(method) -> tuple[torch.optim.Optimizer, list]:
    """The method's Adam and its LR schedulers (built on first use, as a Trainer would)."""
    found = optimizers_of(method)
    opts = [o for o in found if isinstance(o, torch.optim.Optimizer)]
    if len(opts) != 1 or not isinstance(opts[0], ELEMENTWISE):
        raise ValueError(f"a population needs one Adam per member, found {found}")
    return opts[0], [s for s in found if s is not opts[0]]


def group_settings(opt: torch.optim.Optimizer) -> dict:
    if len(opt.param_groups) != 1:
        raise ValueError("a population needs one parameter group per optimizer")
    return {k: v for k, v in opt.param_groups[0].items() if k != "params"}


def stack_state(states: list[dict], like: Tensor) -> dict:
    """One stacked optimizer state from the members' states of one parameter."""
    if not any(states):
        return {}
    if not all(states) or len({tuple(s) for s in states}) != 1:
        raise ValueError("population members have different optimizer states")
    out = {}
    for key, value in states[0].items():
        values = [s[key] for s in states]
        if key in SHARED_STATE or not torch.is_tensor(value):
            if any(not torch.equal(torch.as_tensor(v), torch.as_tensor(value)) for v in values):
                raise ValueError(f"population members are at different optimizer {key}s")
            out[key] = value.clone() if torch.is_tensor(value) else value
        else:
            out[key] = torch.stack([v.detach() for v in values]).to(like.device)
    return out


def member_state(state: dict, i: int) -> dict:
    return {k: (v[i].clone() if k not in SHARED_STATE and torch.is_tensor(v) else
                (v.clone() if torch.is_tensor(v) else v)) for k, v in state.items()}


class MetaPopulation:
    """N members of a MetaLearner with the base training_step (module docstring)."""

    def __init__(self, members: Sequence[nn.Module]):
        self.members = list(members)
        m0 = self.members[0]
        self.n = len(self.members)
        self.params = [list(m.parameters()) for m in self.members]
        self.clip = m0.meta_grad_clip
        self.vmapped = vmapped(m0)
        found = [split_optimizers(m) for m in self.members]
        self.member_opts = [opt for opt, _ in found]
        self.schedulers = [scheds for _, scheds in found]
        settings = group_settings(self.member_opts[0])
        for opt, params in zip(self.member_opts, self.params):
            group = opt.param_groups[0]["params"]
            same = len(group) == len(params) and all(a is b for a, b in zip(group, params))
            if group_settings(opt) != settings or not same:
                raise ValueError("population members need the same Adam over all parameters")
        self.W = list(stack(self.params))
        for w, p in zip(self.W, self.params[0]):
            w.requires_grad_(self.vmapped and p.requires_grad)
        opt0 = self.member_opts[0]
        self.optimizer = type(opt0)(self.W, **opt0.defaults)
        self.optimizer.param_groups[0].update(settings)
        for j, w in enumerate(self.W):
            state = stack_state([opt.state.get(ps[j], {}) for opt, ps in
                                 zip(self.member_opts, self.params)], w)
            if state:
                self.optimizer.state[w] = state
        if self.vmapped:
            self._losses = vmap(self._member_loss(m0))

    def _member_loss(self, m0):
        """One member's meta-loss as a function of its (unstacked) weights and meta-batch:
        MetaLearner.meta_step's vmapped branch, on the method's functional state."""
        where = {id(p): j for j, p in enumerate(self.params[0])}
        layout = [[where[id(t)] for t in group] for group in m0.functional_state()]

        def loss(W, sx, sy, qx, qy, classes):
            state = tuple([W[j] for j in group] for group in layout)
            episodes = Episodes(sx, sy, qx, qy, classes)
            return m0.map_tasks(m0.task_loss, state, episodes).mean()

        return loss

    # ------------------------------------------------------------------ one meta-batch
    def observe(self, batches: Sequence[Episodes | None], randoms, epoch: int) -> Tensor:
        if any(b is None for b in batches):
            raise ValueError("every member of a few-shot population takes a meta-batch at "
                             "every step (they share Adam's step count)")
        if self.vmapped:
            grads, losses = self._vmapped_grads(batches)
        else:
            grads, losses = self._looped_grads(batches, randoms)
        for w, g in zip(self.W, grads):
            w.grad = g
        if self.clip:
            nn.utils.clip_grad_value_(self.W, float(self.clip))
        self.optimizer.param_groups[0]["lr"] = self.member_opts[0].param_groups[0]["lr"]
        self.optimizer.step()
        for opt, scheds in zip(self.member_opts, self.schedulers):
            opt._opt_called = True  # its update happened here (torch's scheduler checks it)
            for sched in scheds:
                sched.step()
        return losses

    def _vmapped_grads(self, batches) -> tuple[list[Tensor | None], Tensor]:
        data = [torch.stack(parts) for parts in zip(*batches)]
        losses = self._losses(tuple(self.W), *data)
        trained = [w for w in self.W if w.requires_grad]
        found = iter(torch.autograd.grad(losses.sum(), trained, allow_unused=True))
        grads = [next(found) if w.requires_grad else None for w in self.W]
        return grads, losses.detach()

    def _looped_grads(self, batches, randoms) -> tuple[list[Tensor | None], Tensor]:
        write_back(self.W, self.params)
        losses, rows = [], []
        for m, params, batch, random in zip(self.members, self.params, batches, randoms):
            for p in params:
                p.grad = None
            with random:
                losses.append(m.meta_step(batch))
            rows.append([p.grad for p in params])
            for p in params:
                p.grad = None
        grads = []
        for g in zip(*rows):
            if all(x is None for x in g):
                grads.append(None)
            elif any(x is None for x in g):
                raise ValueError("population members differ in which weights get gradients")
            else:
                grads.append(torch.stack(g))
        return grads, torch.stack(losses)

    # ------------------------------------------------------------------ the members' own state
    @torch.no_grad()
    def write_back(self) -> None:
        write_back(self.W, self.params)
        for i, (opt, params) in enumerate(zip(self.member_opts, self.params)):
            for w, p in zip(self.W, params):
                state = self.optimizer.state.get(w)
                if state:
                    opt.state[p] = member_state(state, i)
