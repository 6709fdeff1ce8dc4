"""Learning without Forgetting (Li & Hoiem 2016).

When task t > 0 starts, the model is frozen into `old` (a FrozenCopy). Each step minimises

    CE(y | logits masked to the sample's task classes) + alpha * KD_T(logits, old(x); old classes)

where KD_T is the temperature-T distillation cross-entropy between the softmax of the current
and the frozen model's logits restricted to the classes of the previous tasks (LwF's "old
task outputs", recorded on the new task's inputs), computed on the fly on the same augmented
batch. On class splits the CE is over the current task's classes only, as LwF trains its new
head; on domain splits the previous tasks' classes are all classes, so the whole output is
distilled. No exemplars by default (`memory_size: 0`); with a memory its samples join the
batch and are distilled too.
"""

from __future__ import annotations

from metacl.methods.common import FrozenCopy, IncrementalMethod, kd_loss


class LwF(IncrementalMethod):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"

    def __init__(self, backbone, task_info, T: float = 2.0, alpha: float = 1.0, **kwargs):
        super().__init__(backbone, task_info, **kwargs)
        self.T = T
        self.alpha = alpha  # lambda_o in the paper: weight of the distillation term
        self.old = FrozenCopy(self.backbone)

    def before_task(self, t: int, datamodule) -> None:
        super().before_task(t, datamodule)
        if t > 0:
            self.old.update(self.backbone)

    def objective(self, x, y, t):
        logits = self.backbone(x)
        loss = self.loss(logits, y, t)
        if self.old.is_ready and self._task > 0:
            loss = loss + self.alpha * kd_loss(logits, self.old(x), self.T, self.previous_classes)
        return loss
