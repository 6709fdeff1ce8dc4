"""Progressive Neural Networks (Rusu et al. 2016), the two forms HAT compares with.

One column per task, each a ReLU MLP with the backbone's layer sizes (`column_hidden`
overrides them: the reference shrinks the columns so that all of them together stay near the
size of the other approaches' network). Hidden layer l of column t reads layer l-1 of its own
column and, through lateral weights U_l^{t<-j}, layer l-1 of every earlier column j:

    h_l^t = relu(W_l^t h_{l-1}^t + b_l^t + sum_{j<t} U_l^{t<-j} h_{l-1}^j)

and task t is read from its own head on h_L^t (masked to its classes on class splits). Training
task t updates only column t (its weights, laterals and head): the earlier columns' activations
enter detached and the optimizer holds column t's parameters alone, so earlier tasks' outputs
never change. With an MLP backbone (model=mlp, mlp_hat) the columns are MLPs as above.

With model=alexnet the columns are the reference's AlexNet-like ones (HAT's
networks/alexnet_progressive.py): three convolutions and two fc layers, every width scaled by
`column_scale` (default 1.117 / n_tasks, the reference's, so that all columns together stay
near one AlexNet's size). Layers 2..5 and the head of column t also read the previous layer of
every earlier column through an adapter (Rusu et al. Sec. 2): the earlier activations, each
times a learned scalar, are concatenated, reduced by V (a 1x1 convolution before a conv layer,
a linear map before an fc layer) to the width of one earlier layer, passed through ReLU (not
before the head) and mapped by U (the layer's own kernel size) into the layer's
pre-activation. Only the backbone's sizes and dropout are read; its weights are unused.
"""

from __future__ import annotations

import itertools
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacl.errors import ConfigError
from metacl.methods.base import SGDMethod
from metacl.models.alexnet import AlexNet
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
        hs, h = [], x.reshape(x.shape[0], -1)
        for l in range(self.depth):
            out = F.linear(h, self.layers[2 * l], self.layers[2 * l + 1])
            if l > 0:
                for j in range(self.t):
                    out = out + F.linear(earlier[j][l - 1], self.laterals[(l - 1) * self.t + j])
            h = F.relu(out)
            hs.append(h)
        return F.linear(h, self.head[0], self.head[1]), hs


class Adapter(nn.Module):
    """Lateral input from t earlier columns' layer (width `width_in`) into a layer of width
    `width_out`: U(act(V(concat_j alpha_j h_j))), V a 1x1 conv / linear back to `width_in`."""

    def __init__(self, t: int, width_in: int, width_out: int, kernel: int | None,
                 nonlinear: bool = True):
        super().__init__()
        self.scales = nn.Parameter(torch.randn(t))  # the reference's nn.Embedding(1, t) init
        if kernel is None:
            self.V, self.U = nn.Linear(t * width_in, width_in), nn.Linear(width_in, width_out)
        else:
            self.V = nn.Conv2d(t * width_in, width_in, 1)
            self.U = nn.Conv2d(width_in, width_out, kernel)
        self.nonlinear = nonlinear

    def forward(self, earlier: list[Tensor]) -> Tensor:
        h = self.V(torch.cat([a * h for a, h in zip(self.scales, earlier)], dim=1))
        return self.U(F.relu(h) if self.nonlinear else h)


class ConvColumn(nn.Module):
    """Column t of the AlexNet-like PNN: its layers, adapters from the t earlier columns into
    layers 2..5 and the head, and its head."""

    def __init__(self, t: int, backbone: AlexNet, scale: float, n_out: int):
        super().__init__()
        c_in, size, _ = backbone.input_shape
        widths = [max(1, int(scale * c)) for c in backbone.channels]
        fc = max(1, int(scale * backbone.hidden))
        self.convs = nn.ModuleList()
        for c, k in zip(widths, backbone.kernels):
            self.convs.append(nn.Conv2d(c_in, c, k))
            c_in, size = c, (size - k + 1) // 2
        flat = c_in * size * size
        self.fcs = nn.ModuleList([nn.Linear(flat, fc), nn.Linear(fc, fc)])
        self.head = nn.Linear(fc, n_out)
        self.dropout = (*backbone.conv_dropout, backbone.fc_dropout, backbone.fc_dropout)
        # inputs of layers 1.. (0-based) are the outputs of layers 0..: conv widths, flat, fc
        ins = [*widths[:-1], flat, fc, fc]
        outs = [*widths[1:], fc, fc, n_out]
        kernels = [*backbone.kernels[1:], None, None, None]
        self.laterals = nn.ModuleList(
            Adapter(t, w_in, w_out, k, nonlinear=l < len(outs) - 1)
            for l, (w_in, w_out, k) in enumerate(zip(ins, outs, kernels))) if t else None
        self.t, self.n_conv = t, len(widths)

    def forward(self, x: Tensor, earlier: list[list[Tensor]]) -> tuple[Tensor, list[Tensor]]:
        hs, h = [], x
        layers = [*self.convs, *self.fcs, self.head]
        for l, layer in enumerate(layers):
            out = layer(h)
            if l > 0 and self.t:
                out = out + self.laterals[l - 1]([e[l - 1] for e in earlier])
            if l == len(layers) - 1:
                return out, hs
            h = F.dropout(F.relu(out), self.dropout[l], self.training)
            if l < self.n_conv:
                h = F.max_pool2d(h, 2)
                if l == self.n_conv - 1:
                    h = h.flatten(1)
            hs.append(h)
        raise AssertionError("unreachable")


class PNN(SGDMethod):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"
    # the models it reads sizes from, checked by metacl.validate (class -> config names)
    network_models: ClassVar[dict[str, str]] = {"MLP": "mlp, mlp_hat", "AlexNet": "alexnet"}

    def __init__(self, backbone, task_info, lr: float = 0.05,
                 column_hidden: list[int] | None = None, column_scale: float | None = None,
                 grad_clip_norm: float | None = 10000.0, **kwargs):
        super().__init__(backbone, task_info, lr=lr, grad_clip_norm=grad_clip_norm, **kwargs)
        T, n_out = task_info.n_tasks, task_info.n_outputs
        if isinstance(backbone, AlexNet):
            if column_hidden is not None:
                raise ConfigError("method.column_hidden sizes MLP columns; with model=alexnet "
                                  "set method.column_scale")
            scale = column_scale or 1.117 / T  # the reference's expand factor over the tasks
            self.columns = nn.ModuleList(ConvColumn(t, backbone, scale, n_out) for t in range(T))
        elif isinstance(backbone, MLP):
            hidden = tuple(int(h) for h in column_hidden) if column_hidden else tuple(
                max(1, int((column_scale or 1.0) * h)) for h in backbone.hidden)
            n_in = math.prod(task_info.input_shape)
            self.columns = nn.ModuleList(Column(t, n_in, hidden, n_out) for t in range(T))
        else:
            raise ConfigError(f"method=pnn builds MLP or AlexNet-like columns and needs "
                              f"model=mlp, mlp_hat or alexnet, not {type(backbone).__name__}")
        self.set_trained_parameters(self.columns[0].parameters())

    def before_task(self, t: int, datamodule) -> None:
        super().before_task(t, datamodule)
        self.set_trained_parameters(self.columns[t].parameters())  # only the new column learns

    def task_logits(self, x: Tensor, t: int) -> Tensor:
        x = x.reshape(x.shape[0], *self.task_info.input_shape)
        earlier = []
        with torch.no_grad():  # frozen columns: their activations enter as constants
            for j in range(t):
                earlier.append(self.columns[j](x, earlier)[1])
        return self.columns[t](x, earlier)[0]

    def forward(self, x, t):
        return self.mask_logits(self.task_logits(x, int(t)), int(t))

    def objective(self, x, y, t):
        return self.loss(self.task_logits(x, self._task), y, self._task)

    @torch.no_grad()
    def predict(self, x, t, allowed=None, variant=None):
        return self.restrict(self.task_logits(x, t), t, allowed).argmax(dim=1)
