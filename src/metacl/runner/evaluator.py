"""The one evaluation loop: continual accuracy rows, validation losses (the HAT schedule) and
few-shot episodes. Batches follow the model's device, whatever device the data live on."""

from __future__ import annotations

import torch


class Evaluator:
    """Evaluates a method on a datamodule's held-out data, leaving its train/eval mode as
    it was."""

    def __init__(self, dm):
        self.dm = dm

    @staticmethod
    def _batches(loader, device: torch.device):
        for x, y, _ in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    @torch.no_grad()
    def accuracy(self, method, n_trained: int, variant: str | None = None,
                 split: str = "test") -> tuple[list[float], list[float] | None]:
        """Accuracy on every task: task-aware, and task-agnostic on class splits.

        Task-agnostic predictions may choose any class of the tasks trained so far (all classes
        before training). `variant` picks one of the method's `eval_variants`; `split="val"`
        evaluates on the held-out validation split instead (hyperparameter search).
        """
        was_training = method.training
        method.eval()
        multi_head = self.dm.task_info.multi_head
        device = method.device
        mask = method.class_mask.to(device)
        allowed = mask[:n_trained].any(0) if n_trained else torch.ones_like(mask[0])
        loaders = self.dm.eval_dataloaders(split)
        # Correct counts per task stay on the device: one host sync for the whole row.
        correct = torch.zeros(2, len(loaders), device=device)
        for u, loader in enumerate(loaders):
            for x, y in self._batches(loader, device):
                correct[0, u] += (method.predict(x, u, variant=variant) == y).sum()
                if multi_head:
                    pred = method.predict(x, u, allowed=allowed, variant=variant)
                    correct[1, u] += (pred == y).sum()
        counts = correct.tolist()
        sizes = [len(loader.y) for loader in loaders]
        aware = [c / n for c, n in zip(counts[0], sizes)]
        agnostic = [c / n for c, n in zip(counts[1], sizes)]
        method.train(was_training)
        return aware, (agnostic if multi_head else None)

    @torch.no_grad()
    def mean_loss(self, method, tasks, split: str = "val") -> float:
        """Mean `method.validation_loss` over the samples of `tasks` (a plateau schedule)."""
        was_training = method.training
        method.eval()
        loaders = self.dm.eval_dataloaders(split)
        total = torch.zeros((), device=method.device)
        n = 0
        for u in tasks:
            for x, y in self._batches(loaders[u], method.device):
                total += method.validation_loss(x, y, u) * len(y)
                n += len(y)
        method.train(was_training)
        return float(total) / max(n, 1)

    def episodes(self, method, split: str) -> dict[str, torch.Tensor | None]:
        """Adapt on each fixed episode of `split` and score the query set after every inner
        step: {"loss": (E, S + 1), "acc": (E, S + 1) or None} (few-shot)."""
        losses, accs = [], []
        for episodes in self.dm.eval_episodes(split).batches(method.eval_batch_size):
            episodes = type(episodes)(*(t.to(method.device) for t in episodes))
            out = method.adapt_and_evaluate(episodes)
            losses.append(out["loss"])
            accs.append(out["acc"])
        return {"loss": torch.cat(losses),
                "acc": torch.cat(accs) if method.classification else None}
