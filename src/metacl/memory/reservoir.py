"""Reservoir-sampling replay memory (Vitter's algorithm R), as ER, MER and La-MAML use.

Stored as tensors on the model's device and registered as buffers, so the memory, its fill level
and its age counter are part of the owning method's state_dict. Insertion and sampling are
vectorised: no Python loop over samples and no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metacl.reload import ReloadHooks


class ReservoirBuffer(ReloadHooks):
    def __init__(self, capacity: int, input_shape: tuple[int, ...], dtype=torch.float32):
        super().__init__()
        self.capacity = int(capacity)
        # One spare row at the end absorbs writes that the reservoir rejects, so an insertion
        # is a single index_copy_ whatever the random draw decided.
        self.register_buffer("x", torch.zeros(self.capacity + 1, *input_shape, dtype=dtype))
        self.register_buffer("y", torch.zeros(self.capacity + 1, dtype=torch.long))
        self.register_buffer("t", torch.zeros(self.capacity + 1, dtype=torch.long))
        self.register_buffer("age", torch.zeros((), dtype=torch.long))  # samples ever offered
        self._age = 0  # host mirror of `age`; it only depends on batch sizes, never on draws

    def after_load(self):
        self._age = int(self.age)

    def __len__(self) -> int:
        return min(self._age, self.capacity)

    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor, t: Tensor) -> None:
        n = x.shape[0]
        if self.capacity == 0 or n == 0:
            return
        device = self.x.device
        # Algorithm R: sample number k (0-based) goes to slot k while the memory fills, then to a
        # uniform slot in [0, k] which is kept only if it falls inside the memory.
        k = torch.arange(self._age, self._age + n, device=device)
        draw = (torch.rand(n, device=device) * (k + 1).to(torch.float64)).long().clamp_max(k)
        slot = torch.where(k < self.capacity, k, draw)
        slot = torch.where(slot < self.capacity, slot, self.capacity)
        # Sequential semantics: when two samples of the batch pick the same slot, the later wins.
        later = torch.triu(slot[:, None] == slot[None, :], diagonal=1).any(dim=1)
        slot = torch.where(later, self.capacity, slot)
        self.x.index_copy_(0, slot, x.to(self.x.dtype))
        self.y.index_copy_(0, slot, y)
        self.t.index_copy_(0, slot, t.expand(n) if t.dim() == 0 else t)
        self._age += n
        self.age.fill_(self._age)

    def sample(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Up to n distinct stored samples, uniformly at random."""
        size = len(self)
        idx = torch.randperm(size, device=self.x.device)[: min(n, size)]
        pick = (self.x, self.y, self.t)
        return tuple(v.index_select(0, idx) for v in pick)  # faster than v[idx] on CPU

    def all(self) -> tuple[Tensor, Tensor, Tensor]:
        size = len(self)
        return self.x[:size], self.y[:size], self.t[:size]
