"""LUCIR: learning a unified classifier incrementally via rebalancing (Hou et al. 2019).

The classifier is a cosine-normalised layer owned by the method, on top of the backbone's
penultimate features (`backbone.features`; the backbone's own linear head is unused):

    logits_c = sigma * cos(f(x), w_c),   sigma learned (one scalar), so |logits_c| <= |sigma|.

Training on task t (incoming batch + exemplars from a class-balanced herding memory):

    CE(sigma*cos over the seen classes, y)
    + lambda_t * mean_x (1 - cos(f(x), f_old(x)))                          less-forget
    + mr_weight * mean_{x of an old class, k<=K} max(0, m - cos(f, w_y) + cos(f, w_k))   ranking

where f_old are the features of the model frozen when the task started,
lambda_t = lambda_base * sqrt(|C_old| / |C_new|) (adaptive weight; `adapt_lambda: false` keeps
lambda_base), and w_k are the K new-class weights with the highest cosine for that sample (hard
negatives). The ranking loss uses the unscaled cosines, as the reference code does. When a task
starts, the new classes' weights are imprinted (the normalised mean of their normalised
features, scaled to the mean norm of the old weights), and the old classes' weights stay frozen
while it trains (they are restored after every step, so neither gradient, momentum nor weight
decay moves them). The scale sigma keeps learning. ("Old" and "new" classes are those of the
previous tasks not in the current one and the reverse; on domain splits there are none, and
LUCIR reduces to the cosine classifier, less-forget with lambda_base and the memory.)

Prediction: the cosine classifier (masked as every method's head). The NME classifier on the
exemplar means is evaluated as the "nme" variant. Deviation from the paper's ResNet: our
backbones' features come after the last ReLU (the paper removes it so features can be negative).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacl.methods.base import MASK_VALUE
from metacl.methods.common import FrozenCopy, IncrementalMethod


class CosineLinear(nn.Module):
    """sigma * cos(x, w_c) for every class c; sigma is one learned scalar."""

    def __init__(self, in_features: int, out_features: int, sigma: float = 1.0):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.sigma = nn.Parameter(torch.tensor(float(sigma)))

    def cosine(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.sigma * self.cosine(x)


class LUCIR(IncrementalMethod):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"
    eval_variants = ("nme",)

    def __init__(self, backbone, task_info, memory_size: int = 2000, lambda_base: float = 5.0,
                 adapt_lambda: bool = True, margin: float = 0.5, K: int = 2,
                 mr_weight: float = 1.0, sigma: float = 1.0, imprint: bool = True, **kwargs):
        super().__init__(backbone, task_info, memory_size=memory_size, **kwargs)
        self.lambda_base = lambda_base
        self.adapt_lambda = adapt_lambda
        self.margin = margin
        self.K = K
        self.mr_weight = mr_weight
        self.imprint = imprint
        self.classifier = CosineLinear(backbone.feature_dim, task_info.n_outputs, sigma)
        self.optimizer.add_param_group({"params": list(self.classifier.parameters())})
        self.old = FrozenCopy(self.backbone)
        self.cur_lambda = lambda_base
        self._k = 0  # hard negatives used this task (K, at most the number of new classes)
        self._frozen_rows: Tensor | None = None

    # ------------------------------------------------------------------------------ tasks
    def before_task(self, t: int, datamodule) -> None:
        super().before_task(t, datamodule)
        new = self.current_classes & ~self.previous_classes
        n_old, n_cur = int(self.previous_classes.sum()), int(self.current_classes.sum())
        self._k = min(self.K, int(new.sum()))
        self._frozen_rows = None
        if t > 0:
            self.old.update(self.backbone)
            ratio = n_old / max(n_cur, 1)
            self.cur_lambda = self.lambda_base * (math.sqrt(ratio) if self.adapt_lambda else 1.0)
            if self.imprint and bool(new.any()) and n_old > 0:
                self.imprint_weights(datamodule.tasks[t].x_train, datamodule.tasks[t].y_train,
                                     new)
            # The old classes' weights are frozen for the task: restored after every step.
            self._frozen_rows = self.classifier.weight.detach().clone()

    @torch.no_grad()
    def imprint_weights(self, x_raw: Tensor, y: Tensor, new: Tensor) -> None:
        """New class weights: normalised mean of normalised features * mean old weight norm."""
        feats = self.embed(x_raw)
        sums = torch.zeros_like(self.classifier.weight).index_add_(0, y, feats)
        has_data = new & (torch.bincount(y, minlength=new.shape[0]) > 0)
        old_norm = self.classifier.weight[self.previous_classes].norm(dim=1).mean()
        imprinted = F.normalize(sums, dim=1) * old_norm
        self.classifier.weight.copy_(torch.where(has_data[:, None], imprinted,
                                                 self.classifier.weight))

    # ------------------------------------------------------------------------------ training
    def objective(self, x, y, t):
        feats = self.backbone.features(x)
        cos = self.classifier.cosine(feats)
        logits = (self.classifier.sigma * cos).masked_fill(~self.seen_classes, MASK_VALUE)
        loss = F.cross_entropy(logits, y)
        if not (self.old.is_ready and self._task > 0):
            return loss
        # Less-forget constraint on the normalised features.
        old_feats = self.old.features(x)
        loss = loss + self.cur_lambda * (1 - F.cosine_similarity(feats, old_feats, dim=1)).mean()
        # Margin ranking: ground-truth cosine of old-class samples vs the top-K new classes.
        if self._k > 0 and self.mr_weight:
            new = self.current_classes & ~self.previous_classes
            anchor = (self.previous_classes & ~self.current_classes)[y]  # old-class samples
            gt = cos.gather(1, y[:, None])
            hard = cos.masked_fill(~new, -2.0).topk(self._k, dim=1).values
            ranking = F.relu(self.margin - gt + hard) * anchor[:, None]
            n_pairs = (anchor.sum() * self._k).clamp_min(1)
            loss = loss + self.mr_weight * ranking.sum() / n_pairs
        return loss

    @torch.no_grad()
    def after_step(self) -> None:
        if self._frozen_rows is not None:
            keep = (self.previous_classes & ~self.current_classes)[:, None]
            self.classifier.weight.copy_(torch.where(keep, self._frozen_rows,
                                                     self.classifier.weight))

    # ------------------------------------------------------------------------------ prediction
    def head_logits(self, feats: Tensor) -> Tensor:
        return self.classifier(feats)

    @torch.no_grad()
    def predict(self, x, t, allowed=None, variant=None):
        if variant == "nme":
            return self.nme_predict(x, t, allowed)
        return self.restrict(self.head_logits(self.backbone.features(x)), t, allowed).argmax(1)
