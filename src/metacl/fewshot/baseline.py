"""Pretrain-then-finetune: the transfer baseline the MAML paper compares against.

Meta-training ignores the episode structure: every image of a meta-batch is classified among
all meta-train classes (a separate pretraining head on the backbone's features), or, for
sinusoids, every point is regressed with the network itself, one model for all tasks. At test
time the network is fine-tuned on each episode's support set with ``inner_steps_test`` SGD
steps of ``inner_lr``, like MAML's evaluation: the whole network (``finetune=all``) or only the
head (``finetune=head``); for classification the head is the backbone's own N-way layer, which
pretraining never touches (a fresh, randomly initialised head).
"""

from __future__ import annotations

import torch
from torch import nn

from metacl.errors import ConfigError
from metacl.fewshot.maml import MAML

FINETUNE = ("all", "head")


class PretrainFinetune(MAML):
    population_class = None  # its own meta_step and head: one run at a time
    def __init__(self, backbone, episode_info=None, inner_lr: float = 0.1,
                 inner_steps_test: int = 10, finetune: str = "all", **kwargs):
        super().__init__(backbone, episode_info, inner_lr=inner_lr, inner_steps=0,
                         inner_steps_test=inner_steps_test, first_order=True, **kwargs)
        if finetune not in FINETUNE:
            raise ConfigError(f"method.finetune={finetune} is invalid; allowed: "
                              f"{', '.join(FINETUNE)}")
        self.finetune = finetune
        self.head_only = finetune == "head"
        self.pretrain_head = None
        if self.info.classification:
            self.pretrain_head = nn.Linear(backbone.feature_dim, self.info.n_train_classes)

    def meta_step(self, episodes):
        x = torch.cat([episodes.support_x, episodes.query_x], dim=1).flatten(0, 1)
        y = torch.cat([episodes.support_y, episodes.query_y], dim=1)
        if self.pretrain_head is not None:
            y = episodes.classes.gather(1, y).flatten()  # episode label -> meta-train class
            loss = nn.functional.cross_entropy(self.pretrain_head(self.backbone.features(x)), y)
        else:
            loss = self.loss_fn(self.backbone(x), y.flatten(0, 1))
        self.backprop(loss)
        return loss.detach()
