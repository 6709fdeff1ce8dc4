"""Divergence: a run whose loss or weights become NaN/inf stops with `DivergedError`."""

from __future__ import annotations

import math

import torch


class DivergedError(RuntimeError):
    """The training loss or the weights became NaN or infinite."""


def check_finite_loss(loss: float, task: int, step: int) -> None:
    if not math.isfinite(loss):
        raise DivergedError(f"training loss became {loss} in task {task} (batch {step})")


def check_last_loss(method, task: int, step: int) -> None:
    """The method's last training loss, if it has one (one host sync)."""
    if method.last_loss is not None:
        check_finite_loss(float(method.last_loss), task, step)


def check_finite_weights(method, task: int, step: int | None = None) -> None:
    params = [p for p in method.parameters() if p.is_floating_point()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        where = f"task {task}" + (f" (batch {step})" if step is not None else "")
        raise DivergedError(f"weights became NaN or infinite in {where}")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (so wall-clock timings mean something on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
