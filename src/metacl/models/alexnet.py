"""HAT's AlexNet-like network (Serra et al. 2018, after Srivastava et al. 2013), gated.

Three convolutions (64, 128, 256 channels; kernels size//8, size//10 and 2, so 4, 3, 2 on
32x32 CIFAR and 3, 2, 2 on 28x28 MNIST; no padding), each followed by ReLU, dropout and 2x2
max-pooling; then two fully connected layers of 2048 units with ReLU and dropout; a linear head.
Dropout is 0.2 after the first two convolutions and 0.5 after the third and the fc layers.
Initialisation is PyTorch's default for ``nn.Conv2d`` / ``nn.Linear``, as the reference.

The five hidden layers are gated (HAT): each gate multiplies its layer's output (a conv gate a
whole channel) after the pooling / dropout, as the reference does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacl.errors import ConfigError
from metacl.models.backbones import Backbone


class AlexNet(Backbone):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_outputs: int,
        channels: Sequence[int] = (64, 128, 256),
        kernels: Sequence[int] | None = None,
        hidden: int = 2048,
        conv_dropout: Sequence[float] = (0.2, 0.2, 0.5),
        fc_dropout: float = 0.5,
        **hparams,
    ) -> None:
        super().__init__(input_shape, n_outputs, **hparams)
        if len(self.input_shape) != 3:
            raise ConfigError(f"model alexnet needs (C, H, W) images, got {self.input_shape}")
        in_ch, size, _ = self.input_shape
        self.channels = tuple(int(c) for c in channels)
        # The reference ties the kernels to the image size: size//8, size//10, 2.
        self.kernels = (tuple(int(k) for k in kernels) if kernels is not None
                        else (max(size // 8, 1), max(size // 10, 1), 2))
        if len(self.channels) != len(self.kernels) or len(conv_dropout) != len(self.channels):
            raise ConfigError(f"model.channels={list(self.channels)}, model.kernels="
                              f"{list(self.kernels)} and model.conv_dropout={list(conv_dropout)} "
                              "must have the same length")
        self.conv_dropout = tuple(float(p) for p in conv_dropout)
        self.fc_dropout = float(fc_dropout)
        self.hidden = int(hidden)
        s = size
        for c_in, c_out, k in zip((in_ch, *self.channels), self.channels, self.kernels):
            conv = nn.Conv2d(c_in, c_out, k)
            self._add(conv.weight, conv.bias)
            s = (s - k + 1) // 2
            if s < 1:
                raise ConfigError(f"model alexnet: input {self.input_shape} is too small for "
                                  f"kernels {list(self.kernels)} with 2x2 pooling")
        self.spatial = s  # side of the last feature map (2 on CIFAR)
        flat = self.channels[-1] * s * s
        for fan_in in (flat, self.hidden):
            fc = nn.Linear(fan_in, self.hidden)
            self._add(fc.weight, fc.bias)
        head = nn.Linear(self.hidden, self.n_outputs)
        self._add(head.weight, head.bias)
        self.feature_dim = self.hidden
        self.gate_sizes = (*self.channels, self.hidden, self.hidden)

    def _features(self, x: Tensor, params: Iterator[Tensor],
                  gates: Sequence[Tensor] | None = None) -> Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)
        layer = 0
        for p in self.conv_dropout:
            x = F.relu(F.conv2d(x, next(params), next(params)))
            x = F.max_pool2d(F.dropout(x, p, self.training), 2)
            if gates is not None:
                x = x * gates[layer].view(1, -1, 1, 1)
            layer += 1
        x = x.reshape(x.shape[0], -1)
        for _ in range(2):
            x = F.dropout(F.relu(F.linear(x, next(params), next(params))), self.fc_dropout,
                          self.training)
            if gates is not None:
                x = x * gates[layer]
            layer += 1
        return x

    def gate_param_masks(self, unit_masks: Sequence[Tensor]) -> list[Tensor | None]:
        n_conv = len(self.channels)
        out: list[Tensor | None] = []
        for layer, post in enumerate(unit_masks):
            weight = self.params[2 * layer]
            if layer == 0:  # the input image is not gated
                mask = post.view(-1, 1, 1, 1).expand_as(weight)
            elif layer < n_conv:
                mask = torch.minimum(post.view(-1, 1, 1, 1), unit_masks[layer - 1].view(1, -1, 1, 1))
                mask = mask.expand_as(weight)
            elif layer == n_conv:  # fc1 reads the flattened (channel, row, col) feature map
                pre = unit_masks[layer - 1].repeat_interleave(self.spatial * self.spatial)
                mask = torch.minimum(post[:, None], pre[None, :])
            else:
                mask = torch.minimum(post[:, None], unit_masks[layer - 1][None, :])
            out += [mask, post]
        return out + [None, None]  # the head
