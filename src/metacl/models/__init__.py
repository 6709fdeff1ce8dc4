"""Backbone networks with a functional forward (fast weights, vmap, second-order grads)."""

from metacl.models.backbones import BACKBONES, MLP, Backbone, PcCNN, ResNet18, build_backbone

__all__ = ["BACKBONES", "MLP", "Backbone", "PcCNN", "ResNet18", "build_backbone"]
