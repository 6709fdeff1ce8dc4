"""A class-balanced exemplar memory with a fixed total budget (iCaRL, LUCIR).

The memory holds at most `capacity` samples, split evenly over the exemplar groups seen so far
(a group is one class of one task: a class on class splits, a (task, class) pair when tasks share
labels). With n groups each keeps `capacity // n` exemplars; when new groups arrive the quota
shrinks and every old group keeps the *first* exemplars of its priority order (herding rank), as
in iCaRL's ReduceExemplarSet.

Storage is preallocated and registered as buffers: raw samples `x` (whatever dtype the dataset
stores, uint8 images normally; the owner prepares them for the model), labels `y`, task ids `t`
and each sample's `rank` within its group. Valid entries always occupy the first `len(memory)`
rows, so sampling is one random draw over a prefix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metacl.reload import ReloadHooks


class ClassBalancedMemory(ReloadHooks):
    def __init__(self, capacity: int, input_shape: tuple[int, ...], dtype=torch.uint8):
        super().__init__()
        self.capacity = int(capacity)
        self.register_buffer("x", torch.zeros(self.capacity, *input_shape, dtype=dtype))
        self.register_buffer("y", torch.zeros(self.capacity, dtype=torch.long))
        self.register_buffer("t", torch.zeros(self.capacity, dtype=torch.long))
        self.register_buffer("rank", torch.zeros(self.capacity, dtype=torch.long))
        self.register_buffer("size", torch.zeros((), dtype=torch.long))
        self._size = 0  # host mirror of `size`: the memory changes only between tasks

    def before_load(self, state_dict, prefix):
        stored = state_dict.get(prefix + "x")
        if stored is not None and stored.dtype != self.x.dtype:
            # The memory takes the dtype of the data it stores (uint8 images, float MNIST files).
            self.x = torch.zeros_like(self.x, dtype=stored.dtype)

    def after_load(self):
        self._size = int(self.size)

    def __len__(self) -> int:
        return self._size

    def quota(self, n_groups: int) -> int:
        """Exemplars per group when `n_groups` groups share the budget."""
        return self.capacity // max(int(n_groups), 1)

    @torch.no_grad()
    def reduce(self, per_group: int) -> None:
        """Keep the first `per_group` exemplars (by rank) of every stored group."""
        n = self._size
        keep = torch.nonzero(self.rank[:n] < per_group).flatten()
        for name in ("x", "y", "t", "rank"):
            buf = getattr(self, name)
            buf[: len(keep)] = buf[:n][keep]
        self._size = len(keep)
        self.size.fill_(self._size)

    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor | int, t: Tensor | int, rank: Tensor | None = None) -> None:
        """Append samples; `rank` is each one's priority within its group (default 0, 1, ...)."""
        n = x.shape[0]
        if self._size + n > self.capacity:
            raise ValueError(
                f"memory overflow: {self._size} stored + {n} new > capacity {self.capacity}; "
                "reduce() the old groups first"
            )
        if n == 0:
            return
        if x.dtype != self.x.dtype:
            if self._size:
                raise TypeError(f"memory holds {self.x.dtype} samples, got {x.dtype}")
            self.x = torch.zeros_like(self.x, dtype=x.dtype)
        device = self.y.device
        if rank is None:
            rank = torch.arange(n, device=device)
        rows = slice(self._size, self._size + n)
        self.x[rows] = x.to(device)
        self.y[rows] = torch.as_tensor(y, device=device).expand(n)
        self.t[rows] = torch.as_tensor(t, device=device).expand(n)
        self.rank[rows] = rank.to(device)
        self._size += n
        self.size.fill_(self._size)

    def sample(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Up to n distinct stored samples, uniformly at random."""
        idx = torch.randperm(self._size, device=self.y.device)[: min(int(n), self._size)]
        return self.x[idx], self.y[idx], self.t[idx]

    def all(self) -> tuple[Tensor, Tensor, Tensor]:
        n = self._size
        return self.x[:n], self.y[:n], self.t[:n]

    def class_counts(self, n_classes: int) -> Tensor:
        """(n_classes,) number of stored exemplars of each label."""
        return torch.bincount(self.y[: self._size], minlength=n_classes)
