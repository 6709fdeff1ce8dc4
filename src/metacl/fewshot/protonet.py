"""Prototypical Networks (Snell, Swersky & Zemel 2017).

The backbone's features embed an episode; each class's prototype is the mean embedding of its
support examples, and a query is classified by the softmax over negative squared Euclidean
distances to the prototypes. Meta-training minimises that cross-entropy on the query set with
Adam; there is no inner loop, so evaluation reports a single step (step 0 is the prototype
classifier itself). Snell et al. train with more ways than they test (dataset.train_ways) and
halve the learning rate every 2000 episodes (method.lr_step).

The support and query images of an episode go through the network as one batch, so batch
norm uses the statistics of the whole episode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metacl.errors import ConfigError
from metacl.fewshot.base import MetaLearner
from metacl.fewshot.population import MetaPopulation


class ProtoNet(MetaLearner):
    precisions = ("32-true", "bf16-mixed")  # bf16 checked: docs/methods.md, "Precisions"
    population_class = MetaPopulation  # seed populations

    def __init__(self, backbone, episode_info=None, **kwargs):
        super().__init__(backbone, episode_info, **kwargs)
        if not self.info.classification:
            raise ConfigError("method ProtoNet classifies; it cannot run on the sinusoid "
                              "regression dataset")

    def logits(self, params, sx: Tensor, sy: Tensor, qx: Tensor, ways: int) -> Tensor:
        """Negative squared distances of the queries to the class prototypes (Q, ways)."""
        embedded = self.backbone.features(torch.cat([sx, qx]), params)
        support, query = embedded[: sx.shape[0]], embedded[sx.shape[0] :]
        onehot = F.one_hot(sy, ways).to(support.dtype)  # (S, ways)
        prototypes = onehot.t() @ support / onehot.sum(0)[:, None]
        return -(query[:, None, :] - prototypes[None, :, :]).pow(2).sum(-1)

    def task_loss(self, state, sx, sy, qx, qy):
        return F.cross_entropy(self.logits(state[0], sx, sy, qx, self.info.train_ways), qy)

    def task_eval(self, state, sx, sy, qx, qy):
        logits = self.logits(state[0], sx, sy, qx, self.info.ways)
        return (F.cross_entropy(logits, qy).detach()[None],
                (logits.argmax(-1) == qy).float().mean()[None])
