"""The job's CPU settings: intra-op threads and the C library's malloc (metacl.allocator)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from metacl.allocator import set_cpu_allocator
from metacl.errors import ConfigError

DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before any run changed it


def set_threads(setting, device: torch.device, backbone) -> None:
    """torch intra-op threads: an int, null (torch's default: one per core) or `auto`.

    auto: on CPU, the backbone's `cpu_threads` preference if it declares one (the MLP: 1; its
    operations are too small to split, and measured 1.5x faster with 1 thread than 2), else
    torch's default. See docs/architecture.md.
    """
    if setting == "auto":
        setting = getattr(backbone, "cpu_threads", None) if device.type == "cpu" else None
    if setting is None:  # also undoes an earlier job's setting in the same multirun process
        setting = DEFAULT_THREADS
    if not isinstance(setting, int) or isinstance(setting, bool) or setting < 1:
        raise ConfigError(f"threads={setting!r}: use a positive integer, null (torch's "
                          "default) or auto")
    torch.set_num_threads(setting)


def configure_cpu(cfg: DictConfig, device: torch.device, backbone) -> None:
    set_threads(cfg.get("threads", "auto"), device, backbone)
    set_cpu_allocator(cfg.get("cpu_allocator", "tuned"))
