"""The loss gradient of an MLP on one small batch, back-propagated by hand (no autograd).

For methods whose update is a long sequence of tiny SGD steps (MER: ~55 single-sample steps
per incoming sample), autograd's per-step bookkeeping costs more than the arithmetic. This
writes the gradient of the mean cross-entropy straight into a preallocated flat vector whose
views have the parameters' shapes, in ~4 tensor operations per layer. tests/test_models.py
checks it against autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metacl.models.backbones import MLP


class MLPGrad:
    """grad(w, x, onehot, mask) -> loss; the gradient lands in `self.g` (flat, parameter order).

    w: the weights as parameter-shaped tensors (`list(mlp.parameters())` order); x: (B, D)
    flattened inputs; onehot: (B, C) float targets; mask: None or (B, C) additive logit mask
    (0 on allowed classes, a large negative value elsewhere: `ContinualMethod.mask_logits`
    applied to zeros).
    """

    def __init__(self, mlp: MLP, like: Tensor):
        if not mlp.plain:
            raise ValueError("MLPGrad computes a plain ReLU MLP's gradient (no dropout)")
        shapes = [tuple(p.shape) for p in mlp.parameters()]
        numels = [p.numel() for p in mlp.parameters()]
        self.g = torch.zeros(sum(numels), device=like.device, dtype=like.dtype)
        self.g_views = [seg.view(s) for seg, s in zip(self.g.split(numels), shapes)]
        self.n_layers = len(shapes) // 2

    def grad(self, w: list[Tensor], x: Tensor, onehot: Tensor, mask: Tensor | None) -> Tensor:
        hs = [x]
        for layer in range(self.n_layers - 1):
            hs.append(torch.addmm(w[2 * layer + 1], hs[-1], w[2 * layer].t()).relu_())
        logits = torch.addmm(w[-1], hs[-1], w[-2].t())
        if mask is not None:
            logits = logits + mask
        n = x.shape[0]
        logp = torch.log_softmax(logits, 1)
        loss = torch.mul(logp, onehot).sum().div_(-n)
        delta = logp.exp_().sub_(onehot)
        if n > 1:
            delta.div_(n)
        g = self.g_views
        for layer in range(self.n_layers - 1, -1, -1):
            torch.mm(delta.t(), hs[layer], out=g[2 * layer])
            torch.sum(delta, 0, out=g[2 * layer + 1])
            if layer:  # relu': sign of the relu output
                delta = torch.mm(delta, w[2 * layer]).mul_(torch.sign(hs[layer]))
        return loss
