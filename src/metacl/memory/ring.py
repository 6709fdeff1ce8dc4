"""Per-task ring-buffer memory: GEM's and A-GEM's episodic memory.

Every task owns `n_memories` slots, preallocated for all `n_tasks` when the method is built.
Each incoming sample of task u goes to the next slot of task u's ring, so while a task is
trained its slots hold its most recent `n_memories` samples, and once the task is over they keep
the last ones it saw.

GEM's reference code drops the part of a batch that does not fit before the end of the ring
(it wraps only on the next batch); this buffer wraps inside the batch, so it always holds
exactly the most recent samples. With La-MAML's settings (batch 10, 10 slots) the two agree.

Stored as registered buffers (samples, labels, per-task write counters), so the owning method's
state_dict carries the whole memory. Insertion is one vectorised scatter on the device; the
per-task fill levels are mirrored on the host so that reading a task's memory needs no device
synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metacl.reload import ReloadHooks


class RingBuffer(ReloadHooks):
    def __init__(self, n_tasks: int, n_memories: int, input_shape: tuple[int, ...],
                 dtype=torch.float32):
        super().__init__()
        self.n_tasks, self.n_memories = int(n_tasks), int(n_memories)
        slots = self.n_tasks * self.n_memories
        # Flat storage, task u owning rows [u * n_memories, (u + 1) * n_memories). One spare row
        # at the end absorbs the writes a batch overwrites itself (more samples of one task than
        # slots), so an insertion is a single index_copy_ whatever the batch holds.
        self.register_buffer("x", torch.zeros(slots + 1, *input_shape, dtype=dtype))
        self.register_buffer("y", torch.zeros(slots + 1, dtype=torch.long))
        # Samples ever written to each task's ring (its next slot is count % n_memories).
        self.register_buffer("count", torch.zeros(self.n_tasks, dtype=torch.long))
        self._count = [0] * self.n_tasks  # host mirror of `count`

    def after_load(self):
        self._count = [int(c) for c in self.count.tolist()]

    # ------------------------------------------------------------------ sizes
    def size(self, u: int) -> int:
        """Samples of task u held now."""
        return min(self._count[u], self.n_memories)

    def __len__(self) -> int:
        return sum(self.size(u) for u in range(self.n_tasks))

    def stored_tasks(self, below: int | None = None) -> list[int]:
        """Tasks (below `below`, if given) that have at least one sample stored."""
        stop = self.n_tasks if below is None else min(below, self.n_tasks)
        return [u for u in range(stop) if self._count[u] > 0]

    # ------------------------------------------------------------------ writing
    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor, t: Tensor | int) -> None:
        """Write a batch; t is one task index for the whole batch, or a (B,) tensor.

        With an int task nothing waits for the device; a tensor of task ids costs one host
        synchronisation (to update the host copy of the fill levels).
        """
        n = x.shape[0]
        if self.n_memories == 0 or n == 0:
            return
        device = self.x.device
        if isinstance(t, int):
            tasks = torch.full((n,), t, dtype=torch.long, device=device)
        else:
            tasks = t.to(device=device, dtype=torch.long).expand(n)
        onehot = F.one_hot(tasks, self.n_tasks)  # (n, n_tasks)
        # Position of each sample among the batch's samples of its own task, and how many
        # samples of that task the batch holds.
        rank = (onehot.cumsum(0) - 1).gather(1, tasks[:, None]).squeeze(1)
        per_task = onehot.sum(0)
        slot = (self.count[tasks] + rank) % self.n_memories
        flat = tasks * self.n_memories + slot
        # Sequential semantics: a sample overwritten later in the same batch is not written.
        overwritten = rank < per_task[tasks] - self.n_memories
        flat = torch.where(overwritten, self.n_tasks * self.n_memories, flat)
        self.x.index_copy_(0, flat, x.to(self.x.dtype))
        self.y.index_copy_(0, flat, y.to(device))
        self.count += per_task
        if isinstance(t, int):
            self._count[t] += n
        else:
            for u, c in enumerate(per_task.tolist()):
                self._count[u] += c

    # ------------------------------------------------------------------ reading
    def task(self, u: int) -> tuple[Tensor, Tensor]:
        """Task u's stored samples and labels (in slot order, not arrival order)."""
        start = u * self.n_memories
        stop = start + self.size(u)
        return self.x[start:stop], self.y[start:stop]

    def tasks(self, us: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Several tasks' rings stacked: x (T, n_memories, ...), y (T, n_memories), and a
        (T, n_memories) bool mask of the slots that hold a sample."""
        n, device = self.n_memories, self.x.device
        if us and us == list(range(us[0], us[0] + len(us))):
            # A run of consecutive tasks (GEM's past tasks): a view, nothing copied.
            rows = slice(us[0] * n, (us[0] + len(us)) * n)
            x = self.x[rows].view(len(us), n, *self.x.shape[1:])
            y = self.y[rows].view(len(us), n)
        else:
            slots = torch.tensor(us, dtype=torch.long)[:, None] * n + torch.arange(n)
            slots = slots.to(device)
            x, y = self.x[slots], self.y[slots]
        sizes = [self.size(u) for u in us]
        if all(s == n for s in sizes):
            valid = torch.ones(len(us), n, dtype=torch.bool, device=device)
        else:
            valid = (torch.arange(n)[None, :] < torch.tensor(sizes)[:, None]).to(device)
        return x, y, valid

    def sample(self, n: int, below: int) -> tuple[Tensor, Tensor, Tensor]:
        """Up to n distinct samples drawn uniformly from the memories of tasks 0..below-1.

        Returns x, y and the task of each sample. No host synchronisation.
        """
        below = min(below, self.n_tasks)
        available = sum(self.size(u) for u in range(below))
        k = min(n, available)
        device = self.x.device
        if k == 0:
            return self.x[:0], self.y[:0], self.y[:0]
        m = self.n_memories
        flat = torch.randperm(below * m, device=device)
        if available < below * m:  # some ring is not full: move empty slots to the back
            fill = self.count[:below].clamp_max(m)
            empty = (flat % m) >= fill[flat // m]
            flat = flat[torch.argsort(empty.to(torch.int8), stable=True)]
        flat = flat[:k]
        return self.x[flat], self.y[flat], flat // m
