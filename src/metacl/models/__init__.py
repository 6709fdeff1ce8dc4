"""Backbone networks with a functional forward (fast weights, vmap, second-order grads).
Configs name them by class (conf/model/*.yaml `_target_`)."""

from metacl.models.backbones import MLP, Backbone, PcCNN, ResNet18

__all__ = ["MLP", "Backbone", "PcCNN", "ResNet18"]
