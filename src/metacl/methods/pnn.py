"""Progressive Neural Networks (Rusu et al. 2016), the fully connected form HAT compares with.

One column per task, each a ReLU MLP with the backbone's layer sizes (`column_hidden`
overrides them: the reference shrinks the columns so that all of them together stay near the
size of the other approaches' network). Hidden layer l of column t reads layer l-1 of its own
column and, through lateral weights U_l^{t<-j}, layer l-1 of every earlier column j:

    h_l^t = relu(W_l^t h_{l-1}^t + b_l^t + sum_{j<t} U_l^{t<-j} h_{l-1}^j)

and task t is read from its own head on h_L^t (masked to its classes on class splits). Training
task t updates only column t (its weights, laterals and head): the earlier columns' activations
enter detached and the optimizer holds column t's parameters alone, so earlier tasks' outputs
never change. Needs an MLP backbone (its input size and hidden sizes); its weights are unused.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacl.errors import ConfigError
from metacl.methods.base import MASK_VALUE, ContinualMethod
from metacl.models.backbones import MLP


def _linear(fan_in: int, fan_out: int, bias: bool = True) -> list[nn.Parameter]:
    layer = nn.Linear(fan_in, fan_out, bias=bias)  # PyTorch's default init
    return [layer.weight] + ([layer.bias] if bias else [])


class Column(nn.Module):
    """Column t: its own layers, laterals from the t earlier columns, and its head."""

    def __init__(self, t: int, n_in: int, hidden: tuple[int, ...], n_out: int):
        super().__init__()
        sizes = (n_in, *hidden)
        self.layers = nn.ParameterList()
        for fan_in, fan_out in itertools.pairwise(sizes):
            self.layers.extend(_linear(fan_in, fan_out))
        # laterals[l-1][j]: layer l-1 of column j -> layer l of this column (l >= 1)
        self.laterals = nn.ParameterList(
            _linear(hidden[l - 1], hidden[l], bias=False)[0]
            for l in range(1, len(hidden)) for _ in range(t))
        self.head = nn.ParameterList(_linear(hidden[-1], n_out))
        self.t, self.depth = t, len(hidden)

    def forward(self, x: Tensor, earlier: list[list[Tensor]]) -> tuple[Tensor, list[Tensor]]:
        """Logits and this column's hidden activations; `earlier[j]` holds column j's."""
        hs, h = [], x
        for l in range(self.depth):
            out = F.linear(h, self.layers[2 * l], self.layers[2 * l + 1])
            if l > 0:
                for j in range(self.t):
                    out = out + F.linear(earlier[j][l - 1], self.laterals[(l - 1) * self.t + j])
            h = F.relu(out)
            hs.append(h)
        return F.linear(h, self.head[0], self.head[1]), hs


class PNN(ContinualMethod):
    def __init__(self, backbone, task_info, lr: float = 0.05,
                 column_hidden: list[int] | None = None, grad_clip_norm: float | None = 10000.0,
                 **kwargs):
        super().__init__(backbone, task_info, **kwargs)
        if not isinstance(backbone, MLP):
            raise ConfigError(f"method=pnn builds MLP columns and needs model=mlp or mlp_hat, "
                              f"not {type(backbone).__name__}")
        hidden = tuple(int(h) for h in (column_hidden or backbone.hidden))
        n_in = math.prod(task_info.input_shape)
        self.columns = nn.ModuleList(Column(t, n_in, hidden, task_info.n_outputs)
                                     for t in range(task_info.n_tasks))
        self.lr, self.grad_clip_norm = lr, grad_clip_norm
        self._task = 0
        self.optimizer = self._column_optimizer(0)

    def _column_optimizer(self, t: int) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.columns[t].parameters(), lr=self.lr)

    def configure_optimizers(self):
        return self.optimizer

    def before_task(self, t: int, datamodule) -> None:
        super().before_task(t, datamodule)
        self._task = t
        self.optimizer = self._column_optimizer(t)  # only the new column learns

    def task_logits(self, x: Tensor, t: int) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        earlier = []
        with torch.no_grad():  # frozen columns: their activations enter as constants
            for j in range(t):
                earlier.append(self.columns[j](x, earlier)[1])
        return self.columns[t](x, earlier)[0]

    def forward(self, x, t):
        return self.mask_logits(self.task_logits(x, int(t)), int(t))

    def observe(self, x, y, t):
        opt = self.optimizers()
        for _ in range(self.glances):
            opt.zero_grad()
            loss = self.loss(self.task_logits(x, self._task), y, self._task)
            self.manual_backward(loss)
            if self.grad_clip_norm:
                nn.utils.clip_grad_norm_(self.columns[self._task].parameters(),
                                         self.grad_clip_norm)
            opt.step()
        return loss.detach()

    @torch.no_grad()
    def predict(self, x, t, allowed=None, variant=None):
        logits = self.task_logits(x, t)
        if allowed is None:
            return self.mask_logits(logits, t).argmax(dim=1)
        return logits.masked_fill(~allowed, MASK_VALUE).argmax(dim=1)
