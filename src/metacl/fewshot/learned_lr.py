"""Learned per-parameter learning rates: Meta-SGD's alpha (and, in spirit, La-MAML's).

Both methods keep one learnable learning rate per weight (a tensor shaped like the weight) and
take inner steps ``theta' = theta - alpha * grad``; the outer loop learns alpha together with
theta. La-MAML additionally clips alpha at zero when it updates the weights, which
``nonnegative=True`` provides. The rates are ordinary parameters, so an optimizer, a checkpoint
and ``torch.func`` transforms see them like any weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PerParameterLR"]


class PerParameterLR(nn.Module):
    """One learnable learning rate per element (or per tensor) of each given parameter.

    ``per="element"``: alpha has the shape of its parameter (Meta-SGD, La-MAML);
    ``per="tensor"``: one scalar per parameter tensor.
    """

    def __init__(self, params: Iterable[Tensor], init: float, per: str = "element",
                 nonnegative: bool = False) -> None:
        super().__init__()
        if per not in ("element", "tensor"):
            raise ValueError(f"per={per!r}; allowed: 'element', 'tensor'")
        self.per, self.nonnegative = per, bool(nonnegative)
        self.alphas = nn.ParameterList(
            nn.Parameter(torch.full_like(p.detach(), float(init)) if per == "element"
                         else torch.tensor(float(init), dtype=p.dtype, device=p.device))
            for p in params
        )

    def rates(self, alphas: Sequence[Tensor] | None = None) -> list[Tensor]:
        """The rates to multiply gradients with (alpha, or relu(alpha) if nonnegative).

        ``alphas``: the tensors to use instead of the module's own (functional calls).
        """
        alphas = list(self.alphas) if alphas is None else list(alphas)
        return [F.relu(a) for a in alphas] if self.nonnegative else alphas

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor],
             alphas: Sequence[Tensor] | None = None) -> list[Tensor]:
        """``[p - rate * g]``: differentiable w.r.t. params, grads and the rates."""
        return [p - r * g for p, r, g in zip(params, self.rates(alphas), grads, strict=True)]
