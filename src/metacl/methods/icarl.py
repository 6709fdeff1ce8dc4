"""iCaRL: incremental classifier and representation learning (Rebuffi et al. 2017).

Representation learning (the paper's UpdateRepresentation): every incoming batch is joined by
exemplars from a class-balanced memory (`replay_batch_size` of them, or by default as many as
appending the whole memory to the task's data would give per batch). With `old` the model
frozen when the task started, the loss is the sum over the seen classes of sigmoid binary
cross-entropies, averaged over the batch:

    targets_c = sigmoid(old(x))_c   for c in the previous tasks' classes (distillation)
              = [y == c]            for c in the current task's classes (classification)

`distill_weight` scales the distillation columns (1 = the paper; La-MAML's `memory_strength`).
Classes of tasks not seen yet are left out. On domain splits the current task holds every
class, so nothing is distilled and the memory alone fights forgetting.

Exemplar management (after each task): all groups share `memory_size` evenly; old sets keep
their first exemplars; the new classes' sets are chosen by herding on L2-normalised features.
Classification: nearest mean of exemplars (NME) on normalised features, restricted to the task's
classes (task-aware) or the allowed ones (task-agnostic); the plain sigmoid head is evaluated
too, as the "head" variant (accuracy_matrix_head.csv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metacl.methods.common import FrozenCopy, IncrementalMethod


class ICaRL(IncrementalMethod):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"
    eval_variants = ("head",)

    def __init__(self, backbone, task_info, memory_size: int = 2000, distill_weight: float = 1.0,
                 **kwargs):
        super().__init__(backbone, task_info, memory_size=memory_size, **kwargs)
        self.distill_weight = distill_weight
        self.old = FrozenCopy(self.backbone)

    def before_task(self, t: int, datamodule) -> None:
        super().before_task(t, datamodule)
        if t > 0:
            self.old.update(self.backbone)

    def objective(self, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        logits = self.backbone(x)
        targets = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        # Columns: current task's classes (labels), previous tasks' other classes (old model).
        distilled = self.previous_classes & ~self.current_classes
        weight = self.current_classes.to(logits.dtype)
        if self.old.is_ready and self._task > 0:
            targets = torch.where(distilled, torch.sigmoid(self.old(x)), targets)
            weight = weight + self.distill_weight * distilled.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return (bce * weight).sum(dim=1).mean()

    @torch.no_grad()
    def predict(self, x, t, allowed=None, variant=None):
        if variant == "head":
            return super().predict(x, t, allowed)
        return self.nme_predict(x, t, allowed)
