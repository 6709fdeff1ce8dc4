"""Conv4: the four-block convolutional learner of MAML (Finn et al. 2017) and ProtoNets.

Two layouts, as in the MAML reference code:

* Omniglot (28x28): 64 filters, 3x3 convolutions with stride 2, batch norm, ReLU; the 2x2 map
  left after four blocks is averaged into a 64-d feature vector.
* miniImageNet (84x84): 32 filters, 3x3 convolutions with stride 1, batch norm, ReLU, 2x2 max
  pooling; the 5x5 map is flattened into an 800-d feature vector.

``channels``/``max_pool`` left at None pick the layout from the input size (up to 32 px:
Omniglot, larger: miniImageNet). A linear head on the features gives the logits.

Batch norm always normalises with the statistics of the batch it sees, in training and in
evaluation, during inner-loop adaptation and in the outer loop, like the reference (TF's
``batch_norm`` left in training mode). There are no running statistics, so nothing is written in
place and the forward is a pure function of (x, params): it runs on fast weights and under
``torch.func.vmap`` over tasks. One difference from the reference: its TF batch norm learns only
the offset (``scale=False``); here both the scale and the offset are learned.

Batch norm under ``torch.func.vmap``: PyTorch's batching rule for the fused batch-norm backward
gives wrong *second-order* gradients (vmapped second-order MAML disagreed with the per-task
loop by up to 10% of the gradient; pytorch/functorch#534). Inside ``vmap_safe_batch_norm()``
Conv4 computes batch norm from elementary ops (mean, variance, scale, shift), which vmap
differentiates exactly; outside it uses the fused kernel, about twice as fast on the CPU. Both
compute the same function.

Initialisation: convolutions Glorot-uniform (the reference's ``xavier_initializer_conv2d``) with
zero biases; batch-norm scale 1 and offset 0; the head uses PyTorch's ``nn.Linear`` default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacl.models.backbones import Backbone, _conv_out

__all__ = ["Conv4", "batch_norm", "vmap_safe_batch_norm"]

_EXPLICIT_BN: ContextVar[bool] = ContextVar("metacl_explicit_batch_norm", default=False)


@contextlib.contextmanager
def vmap_safe_batch_norm():
    """Within this block, batch norm is built from elementary ops (exact under vmap)."""
    token = _EXPLICIT_BN.set(True)
    try:
        yield
    finally:
        _EXPLICIT_BN.reset(token)


def batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Batch norm with the statistics of ``x`` (N, C, ...), biased variance, affine."""
    if not _EXPLICIT_BN.get():
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    dims = (0, *range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    scale = torch.rsqrt(var + eps) * weight.reshape(shape)
    return x * scale + (bias.reshape(shape) - mean * scale)


class Conv4(Backbone):
    """Four conv-BN-ReLU blocks, then a linear head (see the module docstring)."""

    n_blocks = 4

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_outputs: int,
        channels: int | None = None,
        max_pool: bool | None = None,
        bn_eps: float = 1e-3,
        **hparams,
    ) -> None:
        super().__init__(input_shape, n_outputs, **hparams)
        if len(self.input_shape) != 3:
            raise ValueError(f"Conv4 needs a (C, H, W) input shape, got {self.input_shape}")
        in_ch, h, w = self.input_shape
        large = max(h, w) > 32
        self.max_pool = bool(large if max_pool is None else max_pool)
        self.channels = int(channels if channels is not None else (32 if large else 64))
        self.bn_eps = float(bn_eps)  # TF's batch_norm default, as the reference

        for i in range(self.n_blocks):
            weight = torch.empty(self.channels, in_ch if i == 0 else self.channels, 3, 3)
            nn.init.xavier_uniform_(weight)
            self._add(weight, torch.zeros(self.channels),  # conv weight, bias
                      torch.ones(self.channels), torch.zeros(self.channels))  # BN scale, offset
            if self.max_pool:
                h, w = h // 2, w // 2  # 2x2 max pooling, stride 2, no padding ('VALID')
            else:
                h, w = _conv_out(h, stride=2), _conv_out(w, stride=2)
        if h < 1 or w < 1:
            raise ValueError(f"input {self.input_shape} is too small for Conv4's four blocks")
        self.out_hw = (h, w)
        # Max-pool layout: flatten (32 * 5 * 5 = 800 on 84x84); strided: average over space.
        self.feature_dim = self.channels * h * w if self.max_pool else self.channels
        head = nn.Linear(self.feature_dim, self.n_outputs)
        self._add(head.weight, head.bias)

    def _features(self, x: Tensor, params: Iterator[Tensor]) -> Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)
        stride = 1 if self.max_pool else 2
        for _ in range(self.n_blocks):
            x = F.conv2d(x, next(params), next(params), stride=stride, padding=1)
            x = batch_norm(x, next(params), next(params), self.bn_eps)
            x = F.relu(x)
            if self.max_pool:
                x = F.max_pool2d(x, 2)
        if self.max_pool:
            return x.reshape(x.shape[0], -1)
        return x.mean(dim=(2, 3))
